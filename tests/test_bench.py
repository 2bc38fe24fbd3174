"""Unified-Bench (python bench.py): pairing as the official Score_i2i.py, the scores JSON, unmatched /
unreadable / ignored files reported, a real embedder path (a random tiny CLIP, checked against
transformers), and the resumable I2T2I run with random tiny UAE models."""
import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from bench import bench_unibench, match_pairs
from common import save_safetensors
from data.shapes import world
from model_decoder import LinearCodec, MMDiT, MMDiTConfig
from model_encoder import Encoder, EncoderConfig
from tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scene(seed):
    return world.sample_scene(np.random.default_rng(seed))


def recoloured(s):
    """The same layout with every object in another colour: object F1 0 against s."""
    colors = list(world.COLORS)
    return dict(s, objects=[dict(o, color=colors[(colors.index(o['color']) + 1) % len(colors)]) for o in s['objects']])


def save(s, path, **kwargs):
    Image.fromarray(world.render(s)).save(path, **kwargs)


def per_image(scores):
    return {k: v for k, v in scores.items() if k not in ('average', 'min', 'max')}


# -----------------------------------------------------------------------------
# pairing

def test_match_pairs_follows_the_official_rules_and_reports_the_rest():
    generated = ['0.png', '1.jpg', '3.jpg', 'recon_0.png', 'recon_2.png', 'recon_3.png', 'x.png', 'a/recon_5.webp']
    reference = ['0.png', '1.png', '2.png', '3.png', '9.png', 'a/5.png']
    pairs, unmatched = match_pairs(generated, reference)
    assert pairs == [('0.png', '0.png'),          # same name
                     ('1.jpg', '1.png'),          # same stem, another extension
                     ('3.jpg', '3.png'),
                     ('recon_2.png', '2.png'),    # recon_ + the reference's stem
                     ('a/recon_5.webp', 'a/5.png')]
    assert set(unmatched['generated']) == {'recon_0.png', 'recon_3.png', 'x.png'}
    assert 'already paired with 0.png' in unmatched['generated']['recon_0.png']  # scored once, not twice
    assert 'already paired with 3.jpg' in unmatched['generated']['recon_3.png']
    assert set(unmatched['reference']) == {'9.png'}
    # the better rule wins whatever the order: the same name beats the same stem
    pairs, unmatched = match_pairs(['0.jpg', '0.png'], ['0.png'])
    assert pairs == [('0.png', '0.png')] and set(unmatched['generated']) == {'0.jpg'}


# -----------------------------------------------------------------------------
# scoring existing pairs

@pytest.fixture
def folders(tmp_path):
    gen, ref = tmp_path / 'gen', tmp_path / 'ref'
    gen.mkdir()
    ref.mkdir()
    scenes = [scene(i) for i in range(5)]
    for i, s in enumerate(scenes):
        save(s, ref / f'{i}.png')
    (ref / 'scenes.jsonl').write_text(''.join(json.dumps({'scene': s}) + '\n' for s in scenes))
    shutil.copy(ref / '0.png', gen / '0.png')                # same name, identical
    save(scenes[1], gen / '1.jpg', quality=95)                 # same stem, another extension
    save(recoloured(scenes[2]), gen / 'recon_2.png')          # recon_ prefix, every colour wrong
    (gen / '3.png').write_bytes(b'not an image')               # unreadable
    save(scenes[0], gen / 'extra.png')                         # no reference
    (gen / 'notes.txt').write_text('not an image either')      # ignored
    return gen, ref                                            # reference 4.png: no generated image


def test_scoring_writes_the_schema_and_reports_every_file(folders, tmp_path, capsys):
    gen, ref = folders
    clip_dir, out = tmp_path / 'clip', tmp_path / 'out'
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16)).eval()
    clip.save_pretrained(clip_dir)
    processor = CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    processor.save_pretrained(clip_dir)
    args = ['--generated', str(gen), '--reference', str(ref), f'--out_dir={out}', '--metrics=pixel,scene,clip',
            f'--clip={clip_dir}', '--device=cpu']
    res = bench_unibench(args)
    assert json.loads((out / 'scores.json').read_text()) == res

    metrics = ('pixel', 'scene', 'clip')
    for m in metrics:
        scores = per_image(res[m])
        assert set(scores) == {'0.png', '1.jpg', 'recon_2.png'}  # keyed by the generated name, as the official
        assert res[m]['average'] == pytest.approx(np.mean(list(scores.values())))
        assert (res[m]['min'], res[m]['max']) == (min(scores.values()), max(scores.values()))
    assert res['overall'] == pytest.approx(np.mean([res[m]['average'] for m in metrics]))
    assert res['pairs'] == 3
    assert res['pixel']['0.png'] == 1.0 and res['pixel']['recon_2.png'] < 0.99
    assert res['scene']['0.png'] == 1.0 and res['scene']['recon_2.png'] == 0.0
    assert str(ref / 'scenes.jsonl') in res['models']['scene']  # the ground truth was used, and it says so
    # clip: cosine of transformers' projected features on the processor's pixels
    with torch.no_grad():
        for key, ref_name in (('0.png', '0.png'), ('1.jpg', '1.png'), ('recon_2.png', '2.png')):
            a, b = (clip(**processor([Image.open(p).convert('RGB')], return_tensors='pt')).image_embeds
                    for p in (gen / key, ref / ref_name))
            assert res['clip'][key] == pytest.approx(F.cosine_similarity(a, b).item(), abs=1e-5)
    assert res['models']['clip'] == str(clip_dir)
    assert res['command'] == 'python bench.py ' + shlex.join(args)

    assert set(res['unmatched']['generated']) == {'extra.png'}
    assert set(res['unmatched']['reference']) == {'4.png'}
    assert set(res['unreadable']) == {str(gen / '3.png')}
    assert set(res['ignored']) == {str(gen / 'notes.txt'), str(ref / 'scenes.jsonl')}
    screen = capsys.readouterr().out
    for name in ('extra.png', '4.png', str(gen / '3.png'), 'notes.txt'):
        assert name in screen

    sheet = (out / 'contact_sheet.html').read_text()
    sources = re.findall(r'<img src="([^"]+)"', sheet)
    assert len(sources) == 6 and all((out / s).resolve().exists() for s in sources)


def test_scene_metric_without_ground_truth_parses_the_reference(folders, tmp_path):
    gen, ref = folders
    os.remove(ref / 'scenes.jsonl')
    res = bench_unibench(['--generated', str(gen), '--reference', str(ref), f'--out_dir={tmp_path / "out"}'])
    assert [m for m in res if m in ('pixel', 'scene', 'clip')] == ['pixel', 'scene']  # the default: no weights
    assert res['scene']['0.png'] == 1.0 and res['scene']['recon_2.png'] == 0.0
    assert 'parse_image(reference) (3 images)' in res['models']['scene']


@pytest.mark.parametrize('extra, error', [
    (['--metrics=clip'], r'--clip=PATH'),
    (['--metrics=pixel,lpips'], r'lpips'),
    (['--metrics=pixel', '--reference=/nonexistent'], r'/nonexistent is not a directory'),
])
def test_bad_options_are_clear_errors(folders, tmp_path, extra, error):
    gen, ref = folders
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        bench_unibench(['--generated', str(gen), '--reference', str(ref), f'--out_dir={tmp_path}', *extra])


def test_usage_errors(tmp_path):
    with pytest.raises(ValueError, match='--generated and --reference go together'):
        bench_unibench(['--generated', str(tmp_path)])
    with pytest.raises(FileNotFoundError, match='--llm=/nonexistent'):  # the toy bench without toy checkpoints
        bench_unibench(['--llm=/nonexistent'])
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'a' / 'x.png')
    with pytest.raises(ValueError, match='no image pair'):
        bench_unibench(['--generated', str(tmp_path / 'a'), '--reference', str(tmp_path / 'b'),
                        f'--out_dir={tmp_path / "out"}'])


# -----------------------------------------------------------------------------
# I2T2I over a folder, with random tiny UAE models

@pytest.fixture(scope='module')
def tiny_uae(tmp_path_factory):
    d = tmp_path_factory.mktemp('uae')
    torch.manual_seed(0)
    with open(os.path.join(REPO, 'config', 'toy_encoder.json')) as f:
        cfg = json.load(f)
    cfg['text_config']['vocab_size'] = 508  # the toy tokenizer's size: a random model samples only ids it decodes
    Encoder(EncoderConfig.from_hf(cfg), Tokenizer.from_pretrained(os.path.join(REPO, 'data', 'shapes'))
            ).save_pretrained(str(d / 'llm'))
    with open(os.path.join(REPO, 'config', 'toy_decoder.json')) as f:
        MMDiT(MMDiTConfig.from_dict(json.load(f))).save_pretrained(str(d / 'dit'))
    save_safetensors({'pooled': torch.randn(64)}, str(d / 'pooled.safetensors'))
    # the toy decoder's latent space, fitted to a few rendered scenes
    rng = np.random.default_rng(0)
    scenes = np.stack([world.render(world.sample_scene(rng)) for _ in range(64)])
    LinearCodec.fit(torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 127.5 - 1, 16, 27).save(str(d / 'codec.safetensors'))
    return [f'--llm={d / "llm"}', f'--dit={d / "dit"}', f'--pooled={d / "pooled.safetensors"}',
            f'--vae={d / "codec.safetensors"}']


def test_images_mode_saves_scores_and_resumes(tmp_path, tiny_uae):
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(3):
        save(scene(i), images / f'{i}.png')
    (images / 'broken.png').write_bytes(b'not an image')
    out = images / 'bench'  # inside the input folder: its reconstructions must not become inputs
    args = ['--images', str(images), f'--out_dir={out}', *tiny_uae, '--max_new_tokens=4', '--steps=2',
            '--batch_size=2', '--device=cpu']
    res = bench_unibench(args)
    records = [json.loads(line) for line in (out / 'captions.jsonl').read_text().splitlines()]
    assert [(r['image'], r['recon']) for r in records] == [(f'{i}.png', f'recon_{i}.png') for i in range(3)]
    assert all(1 <= r['tokens'] <= 4 and isinstance(r['caption'], str) for r in records)
    for i in range(3):
        assert np.asarray(Image.open(out / f'recon_{i}.png')).shape == (48, 48, 3)
    assert set(per_image(res['pixel'])) == set(per_image(res['scene'])) == {'0.png', '1.png', '2.png'}
    assert set(res['unreadable']) == {str(images / 'broken.png')}
    assert res['uae']['steps'] == 2 and res['caption_tokens'] == np.mean([r['tokens'] for r in records])
    assert (out / 'contact_sheet.html').exists()

    # a crash before the second batch (2.png, broken.png) was saved: only that batch is redone,
    # with the same seed, so the reconstruction is the same as without the crash
    first = (out / 'recon_2.png').read_bytes()
    kept = {n: os.stat(out / n).st_mtime_ns for n in ('recon_0.png', 'recon_1.png')}
    os.remove(out / 'recon_2.png')
    (out / 'captions.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records[:2]))
    again = bench_unibench(args)
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept
    assert (out / 'recon_2.png').read_bytes() == first
    assert [json.loads(line) for line in (out / 'captions.jsonl').read_text().splitlines()] == records
    assert again['pixel'] == res['pixel'] and again['scene'] == res['scene']

    # other settings must not be mixed into the same folder
    with pytest.raises(ValueError, match=r'steps: 2 there, 3 now'):
        bench_unibench(args + ['--steps=3'])
    # nor the outputs of weights retrained in place (same paths, other files)
    pooled = next(a.split('=', 1)[1] for a in tiny_uae if a.startswith('--pooled='))
    st = os.stat(pooled)
    os.utime(pooled, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    try:
        with pytest.raises(ValueError, match=r'weights: '):
            bench_unibench(args)
    finally:
        os.utime(pooled, ns=(st.st_atime_ns, st.st_mtime_ns))


# -----------------------------------------------------------------------------
# Toy-GenEval (--task geneval) and understanding (--task understanding)

def obj(shape, color='red', size='large', cell=(0, 0)):
    return dict(shape=shape, color=color, size=size, cell=cell)


def passes(prompt, *objects):
    """world.satisfies on the parse of a rendered scene (what the bench does with a generated image)."""
    img = world.render({'background': 'black', 'objects': list(objects)})
    return world.satisfies(world.parse_image(img), world.parse_caption(prompt))


def test_geneval_pass_rules_on_rendered_scenes():
    assert passes('a circle.', obj('circle', 'green', 'small', (1, 2)))
    assert not passes('a circle.', obj('circle'), obj('square', cell=(2, 2)))  # an extra object
    assert not passes('a red circle.', *[obj('circle', cell=(r, 2 * c)) for r in (0, 2) for c in (0, 1)])  # four
    assert not passes('a red circle.', obj('circle', 'green'))
    # colour attribution: each binding must hold, in either order of the objects
    assert passes('a red circle and a blue square.', obj('square', 'blue'), obj('circle', 'red', cell=(2, 1)))
    assert not passes('a red circle and a blue square.', obj('circle', 'blue'), obj('square', 'red', cell=(2, 1)))
    assert not passes('a circle and a square.', obj('circle'), obj('circle', cell=(1, 1)))
    three = 'a circle, a circle and a circle.'
    assert passes(three, *[obj('circle', cell=(r, 1)) for r in range(3)])
    assert not passes(three, *[obj('circle', cell=(r, 1)) for r in range(2)])
    assert not passes(three, *[obj('circle', cell=(r, 1)) for r in range(3)], obj('circle', cell=(0, 0)))
    where = 'a circle in the top left and a square in the bottom right.'
    assert passes(where, obj('circle', 'white', 'small', (0, 0)), obj('square', 'blue', cell=(2, 2)))
    assert not passes(where, obj('square', cell=(0, 0)), obj('circle', cell=(2, 2)))


def test_geneval_prompts_are_named_captions_of_each_category():
    prompts = world.geneval_prompts(20)
    assert prompts == world.geneval_prompts(20)  # a fixed stream
    # each category from its own stream: fewer prompts are a prefix, whatever the other categories
    short = world.geneval_prompts(5)
    assert short == [p for p in prompts if p['index'] < 5]
    for p in prompts:
        attrs, _ = world.GENEVAL_CATEGORIES[p['category']]
        spec = world.parse_caption(p['prompt'])
        objects = spec['objects']
        assert spec['background'] is None
        assert all((o[a] is not None) == (a in attrs) for o in objects for a in world.ATTRS), p
        n = len(objects)
        shapes, colors = {o['shape'] for o in objects}, {o['color'] for o in objects}
        if p['category'] in ('single_object', 'colors'):
            assert n == 1
        elif p['category'] == 'counting':
            assert 2 <= n <= 4 and len(shapes) == 1
        else:
            assert n == 2 and len(shapes) == 2
            assert p['category'] != 'color_attr' or len(colors) == 2
        if p['category'] == 'position':  # in reading order of the cells, as caption() writes them
            assert objects[0]['cell'] < objects[1]['cell']
    assert [p['prompt'] for p in prompts if p['category'] == 'counting'][:3] == [
        'a triangle and a triangle.', 'a plus, a plus, a plus and a plus.', 'a circle, a circle and a circle.']


def test_understanding_precision_and_recall_on_hand_made_captions():
    from bench import caption_counts, understanding_summary
    true = {'background': 'black', 'objects': [obj('circle', 'red', 'large', [0, 0]),  # cells as JSON gives them
                                               obj('plus', 'blue', 'small', [1, 1])]}
    captions = [
        'a black background with a large red circle in the top left and a small blue plus in the center.',
        'a red circle and a green plus.',            # colours: 2 stated, 1 right; no size, no cell
        'a red circle, a blue plus and a red square.',  # an extra object: its shape and colour are wrong
    ]
    items = [dict(caption_counts(world.parse_caption(c), true), tokens=10) for c in captions]
    one = {'background': 'gray', 'objects': [obj('circle', 'red', 'large', [2, 2])]}
    items.append(dict(caption_counts(world.parse_caption('a red circle.'), one), tokens=4))
    assert understanding_summary(items[:1]) == dict(
        size_precision=1.0, size_recall=1.0, color_precision=1.0, color_recall=1.0, shape_precision=1.0,
        shape_recall=1.0, cell_precision=1.0, cell_recall=1.0, object_precision=1.0, object_recall=1.0,
        background_accuracy=1.0, count_accuracy=1.0, caption_tokens=10.0, images=1)
    s = understanding_summary(items[1:2])
    assert (s['color_precision'], s['color_recall']) == (0.5, 0.5)
    assert (s['size_precision'], s['size_recall']) == (None, 0.0)  # never stated: no precision to speak of
    assert (s['shape_precision'], s['shape_recall'], s['cell_recall']) == (1.0, 1.0, 0.0)
    assert (s['object_precision'], s['object_recall'], s['background_accuracy'], s['count_accuracy']) == (0, 0, 0, 1)
    s = understanding_summary(items[2:3])
    assert (s['shape_precision'], s['shape_recall']) == (2 / 3, 1.0)
    assert (s['color_precision'], s['color_recall'], s['count_accuracy']) == (2 / 3, 1.0, 0.0)
    # pooled over the captions (not a mean of per-caption ratios)
    s = understanding_summary(items)
    assert s['color_precision'] == (2 + 1 + 2 + 1) / (2 + 2 + 3 + 1) and s['color_recall'] == (2 + 1 + 2 + 1) / 7
    assert s['size_precision'] == 1.0 and s['size_recall'] == 2 / 7 and s['images'] == 4
    assert s['caption_tokens'] == 34 / 4 and s['count_accuracy'] == 3 / 4 and s['background_accuracy'] == 1 / 4


TOY = [f'--{k}={os.path.join(REPO, "checkpoints", "toy", v)}' for k, v in
       (('llm', 'llm'), ('dit', 'dit'), ('vae', 'codec.safetensors'), ('pooled', 'pooled.safetensors'))]
ADAPTERS = [f'--{k}={os.path.join(REPO, "checkpoints", "toy", k)}' for k in ('llm_lora', 'dit_lora')]


def test_geneval_end_to_end_on_the_toy_checkpoints(tmp_path, capsys, one_thread):
    from bench import bench_geneval
    args = [*TOY, '--prompts=2', '--steps=3', '--device=cpu']
    summary = bench_geneval(args + [f'--out_dir={tmp_path / "a"}'])
    res = json.loads((tmp_path / 'a' / 'geneval.json').read_text())
    assert res['summary'] == summary and list(summary) == [*world.GENEVAL_CATEGORIES, 'overall', 'images']
    assert summary['images'] == len(res['items']) == 12
    assert summary['overall'] == pytest.approx(np.mean([summary[c] for c in world.GENEVAL_CATEGORIES]))
    sheet = np.asarray(Image.open(tmp_path / 'a' / 'geneval.png'))
    for n, it in enumerate(res['items']):  # the sheet holds the images scored, one row per category
        r, c = divmod(n, 2)
        img = sheet[r * 50:r * 50 + 48, c * 50:c * 50 + 48]
        parsed = world.parse_image(img)
        assert json.loads(json.dumps(parsed)) == it['parsed']
        assert it['passed'] == world.satisfies(parsed, world.parse_caption(it['prompt']))
        same = [i['passed'] for i in res['items'] if i['category'] == it['category']]
        assert summary[it['category']] == np.mean(same)
    assert re.search(r'\| no adapters \| [\d.]+ \|', capsys.readouterr().out)
    # a DiT adapter changes what is drawn; the batch size does not. The shipped DiT adapter is zero (U4G's
    # groups all had equal rewards: docs/results.md, recipes H and I) and G4U's leaves the LLM layers the decoder
    # reads alone, so the test draws with the shipped adapters' files, the DiT's lora_B made non-zero
    lora = tmp_path / 'dit_lora'
    shutil.copytree(os.path.join(REPO, 'checkpoints', 'toy', 'dit_lora'), lora)
    weights = load_file(lora / 'adapter_model.safetensors')
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=gen) * 0.1 if 'lora_B' in k else v for k, v in weights.items()}
    save_safetensors(weights, str(lora / 'adapter_model.safetensors'))
    bench_geneval(args + [ADAPTERS[0], f'--dit_lora={lora}', f'--out_dir={tmp_path / "b"}'])
    assert not np.array_equal(np.asarray(Image.open(tmp_path / 'b' / 'geneval.png')), sheet)
    bench_geneval(args + ['--batch_size=1', f'--out_dir={tmp_path / "c"}'])
    assert np.abs(np.asarray(Image.open(tmp_path / 'c' / 'geneval.png')).astype(int) - sheet).max() <= 1


def test_understanding_reads_the_captions_of_unibench(tmp_path, capsys, one_thread):
    """On a few rendered scenes: --task understanding samples exactly Unified-Bench's captions, and the
    bench's scores.json has the flat summary a report reads."""
    from bench import bench_understanding
    images = tmp_path / 'images'
    images.mkdir()
    scenes = [scene(i) for i in range(3)]
    for i, s in enumerate(scenes):
        save(s, images / f'{i}.png')
    with pytest.raises(ValueError, match='needs images 0.png, 1.png, ... and their scenes'):
        bench_understanding([f'--images={images}', *TOY])
    (images / 'scenes.jsonl').write_text(''.join(json.dumps({'scene': s}) + '\n' for s in scenes))
    common = [f'--images={images}', *TOY, '--device=cpu']  # no G4U adapter: its captions hardly vary with the seed
    res = bench_unibench(common + ['--steps=2', f'--out_dir={tmp_path / "unibench"}'])
    assert res['summary'] == dict(pixel=res['pixel']['average'], object_f1=res['scene']['average'],
                                  attribute_f1=res['scene_attributes']['average'], overall=res['overall'],
                                  caption_tokens=res['caption_tokens'], pairs=3)
    summary = bench_understanding(common + [f'--out_dir={tmp_path / "understanding"}'])
    items = json.loads((tmp_path / 'understanding' / 'understanding.json').read_text())['items']
    recs = [json.loads(line) for line in (tmp_path / 'unibench' / 'captions.jsonl').read_text().splitlines()]
    key = lambda r: (r['image'], r['caption'], r['tokens'])  # noqa: E731
    assert list(map(key, items)) == list(map(key, recs))
    assert summary['caption_tokens'] == res['caption_tokens'] and summary['images'] == 3
    for it, s in zip(items, scenes):
        for a in world.ATTRS:  # the counts are those of the caption against its scene
            assert it[f'{a}_stated'] == sum(o[a] is not None for o in world.parse_caption(it['caption'])['objects'])
        assert it['true'] == len(s['objects'])
    assert 'object_precision' in capsys.readouterr().out
