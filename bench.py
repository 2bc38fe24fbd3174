"""
Unified-Bench: caption every reference image, draw it again from the caption alone (I2T2I), and score
each reconstruction against its original with CLIP, DINOv2, DINOv3, LongCLIP, pixels, or on the toy
world exactly (its parser).

    python bench.py                      # the toy bench: 100 toy test images, toy checkpoints
    python bench.py --images DIR         # I2T2I over DIR (see bench_unibench for the options)
    python bench.py --generated DIR --reference DIR   # score existing reconstructions
    python bench.py --task reward        # the toy decoder from true captions, per detail level
    python bench.py --task geneval       # Toy-GenEval: the decoder from prompts, by category
    python bench.py --task understanding # the encoder's captions of the toy bench, per attribute

Speed benchmarks are bench_speed.py.
"""
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import time

import torch

from common import atomic_write, autocast, configure, keep_freed_memory, pick_device, run, save_json
from embedders import METRICS, SCENE_METRICS, similarities, toy_pixels
from images import IMAGE_EXTENSIONS, load_image


# -----------------------------------------------------------------------------
# task: reward -- does the RL reward rise with caption completeness? (checked before any G4U run)

def bench_reward(args):
    """Decode the images of a split (validation; `--split=test`: the toy Unified-Bench) from their captions
    at each detail level (data/shapes/world.py) and average each candidate reward per level. A reward fit
    for G4U must rank complete captions highest; one that prefers terse captions teaches the encoder to say
    less. Then the exact scores of the reconstructions from the complete captions, attribute by attribute."""
    import numpy as np
    from data.shapes import world
    from embedders import load_embedder
    from pipeline import draw, load_uae
    config = dict({k: UAE[k] for k in UAE_PATH_KEYS + ('negative_prompt', 'steps', 'guidance', 'guidance_min_sigma',
                                                      'shift', 'seed')},
                  device='auto', data_dir='data/shapes/out', split='val', images=100,
                  metrics='pixel,scene,scene_attributes')
    configure(config, args)
    device = pick_device(config['device'])
    enc, dit, codec, pooled = load_uae(config, device)
    images, records = world.load_split(os.path.join(config['data_dir'], config['split']))
    images, records = np.asarray(images[:config['images']]), records[:config['images']]
    metrics = config['metrics'].split(',')
    embedders = {m: load_embedder(m, None, device) for m in metrics if m not in SCENE_METRICS}
    print(f"| caption level | mean tokens | {' | '.join(metrics)} |\n|---|---:|{'---:|' * len(metrics)}")
    for level in world.CAPTION_LEVELS:
        texts = [r['captions'][level] for r in records]
        gen = torch.Generator(device).manual_seed(config['seed'])
        recon = draw(enc, dit, codec, pooled, texts, config['negative_prompt'], None, config['steps'],
                     config['guidance'], config['shift'], gen, guidance_min_sigma=config['guidance_min_sigma'])
        scores = similarities(metrics, embedders, recon, images)
        if level == 'complete':
            exact = [world.score(world.parse_image(im), r['scene']) for im, r in zip(recon, records)]
            scenes = [r['scene'] for r in records]
            ghosts = world.mean_residual(world.empty_cell_residual, recon, scenes)
            halos = world.mean_residual(world.halo_residual, recon, scenes)
        tokens = np.mean([len(enc.tokenizer.encode(t)) for t in texts])
        print(f"| {level} | {tokens:.1f} | {' | '.join(f'{scores[m].mean():.4f}' for m in metrics)} |", flush=True)
    names = ('object_f1', 'shape_f1', 'color_f1', 'size_f1', 'cell_f1')
    print(f"\nfrom the complete captions of {len(records)} {config['split']} images: " +
          ', '.join(f"{k} {np.mean([e[k] for e in exact]):.3f}" for k in names) +
          f", ghosts {ghosts:.3f}, halos {halos:.3f}")


# -----------------------------------------------------------------------------
# task: unibench
#
# Unified-Bench (the paper's, docs/uae.md): caption every reference image, draw it again from the caption
# alone (I2T2I), and score each reconstruction against its original. File types, pairing rules and the
# JSON layout follow the official Score_i2i.py; unlike it, nothing is dropped silently: every
# unmatched, unreadable or ignored file is listed on screen and in the JSON.

# the UAE pipeline's keys with the toy checkpoints as defaults (real ones: config/uae.py); they are the
# settings that make a reconstruction what it is (device and batch size only change the speed).
# guidance_min_sigma: as sample.py's, guidance only above that noise level (model_decoder.sample)
UAE = dict(llm='checkpoints/toy/llm', processor='', llm_lora='', dit='checkpoints/toy/dit', dit_lora='',
           vae='checkpoints/toy/codec.safetensors', pooled='checkpoints/toy/pooled.safetensors',
           negative_prompt='', size=48, steps=20, guidance=2.0, guidance_min_sigma=0.3, shift=3.0, temperature=0.7,
           max_new_tokens=512, top_k=None, top_p=None, repetition_penalty=None, dtype='float32', seed=0)
UAE_PATH_KEYS = ('llm', 'processor', 'llm_lora', 'dit', 'dit_lora', 'vae', 'pooled')
UAE_KEYS = tuple(UAE)
METRIC_PATHS = {'clip': 'a CLIPVisionModelWithProjection or CLIPModel directory',
                'dinov2': 'a Dinov2Model directory', 'dinov3': 'a DINOv3ViTModel directory',
                'longclip': "LongCLIP-L's .pt file"}
REPO = os.path.dirname(os.path.abspath(__file__))
BATCH_SIZE = 20  # images captioned together, one seed per batch: Unified-Bench and --task understanding share it
TOY_BENCH = os.path.join(REPO, 'data', 'shapes', 'out', 'test')  # 0.png ... 99.png + scenes.jsonl


def natural_key(name):
    """'2.png' sorts before '10.png' (re.split with a group alternates text and digits: types line up)."""
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def list_images(directory, skip=None):
    """(image names, other file names) under directory, recursively as the official script, as
    '/'-separated relative paths in natural order. The directory `skip` (absolute) is not entered."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'{directory} is not a directory')
    images, other = [], []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(root, d)) != skip]
        for f in files:
            name = os.path.relpath(os.path.join(root, f), directory).replace(os.sep, '/')
            (images if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS else other).append(name)
    return sorted(images, key=natural_key), sorted(other, key=natural_key)


def match_pairs(generated, reference):
    """Pair generated with reference names by the official rules, the best rule first: the same name;
    the same stem with another extension; the generated stem is 'recon_' + the reference stem.
    A reference pairs with one generated image at most (the official script would score it twice).
    Returns ([(generated, reference)], {'generated': {name: why}, 'reference': {name: why}})."""
    stem = lambda n: os.path.splitext(n)[0]  # noqa: E731

    def without_recon(n):
        folder, base = posixpath.split(stem(n))
        return posixpath.join(folder, base[len('recon_'):]) if base.startswith('recon_') else None

    names, by_stem = set(reference), {}
    for r in reference:
        by_stem.setdefault(stem(r), r)  # two references with one stem: the first, as the official loop
    rules = (lambda g: g if g in names else None, lambda g: by_stem.get(stem(g)),
             lambda g: by_stem.get(without_recon(g)))
    paired, owner, wanted = {}, {}, {}  # generated -> reference, reference -> generated, first match
    for rule in rules:
        for g in generated:
            r = rule(g)
            if g in paired or r is None:
                continue
            wanted.setdefault(g, r)
            if r not in owner:
                paired[g], owner[r] = r, g
    unmatched = {
        'generated': {g: f'its reference {wanted[g]} is already paired with {owner[wanted[g]]}' if g in wanted
                      else 'no reference with the same name, the same stem, or its stem without recon_'
                      for g in generated if g not in paired},
        'reference': {r: 'no generated image matches it' for r in reference if r not in owner}}
    return [(g, paired[g]) for g in generated if g in paired], unmatched


def scene_truths(ref_dir, names):
    """({reference name: ground-truth scene}, path) from a scenes.jsonl beside the references, whose
    line i describes the image with stem i (prepare.py's test split); ({}, None) without one."""
    path = os.path.join(ref_dir, 'scenes.jsonl')
    if not os.path.exists(path):
        return {}, None
    scenes = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                scenes.append(json.loads(line)['scene'])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f'{path} line {i}: not a prepare.py scene record ({type(e).__name__}: {e})') from None
    stems = {n: os.path.splitext(n)[0] for n in names}
    return {n: scenes[int(s)] for n, s in stems.items() if s.isdigit() and int(s) < len(scenes)}, path


def score_pairs(pairs, metrics, embedders, truths, chunk=32):
    """pairs: [(key, generated path, reference path, reference name)] -> ({metric: {key: score}},
    {path: error} of unreadable files, counts for the scene metric). Images are read `chunk` pairs at
    a time, so memory stays flat on large folders."""
    from data.shapes import world
    scores, unreadable = {m: {} for m in metrics}, {}
    scene = dict(truth=0, parsed=0, resized=0, truth_disagrees=0)
    for i in range(0, len(pairs), chunk):
        keys, gens, refs, ref_names = [], [], [], []
        for key, gen_path, ref_path, ref_name in pairs[i:i + chunk]:
            images = []
            for path in (gen_path, ref_path):
                try:
                    images.append(load_image(path))
                except ValueError as e:
                    unreadable[path] = str(e)
            if len(images) == 2:
                keys.append(key)
                gens.append(images[0])
                refs.append(images[1])
                ref_names.append(ref_name)
        if not keys:
            continue
        truth_list = None  # the toy world's truth per pair: scenes.jsonl, else what the parser reads in the reference
        if set(SCENE_METRICS) & set(metrics):
            truth_list = []
            for gen, ref, name in zip(gens, refs, ref_names):
                scene['resized'] += sum(im.size != (world.IMAGE, world.IMAGE) for im in (gen, ref))
                parsed_ref = world.parse_image(toy_pixels(ref, world.IMAGE))
                truth = truths.get(name)
                if truth is None:
                    truth, scene['parsed'] = parsed_ref, scene['parsed'] + 1
                else:
                    scene['truth'] += 1
                    scene['truth_disagrees'] += world.score(parsed_ref, truth)['object_f1'] < 1
                truth_list.append(truth)
        for m, sims in similarities(metrics, embedders, gens, refs, truth_list).items():
            scores[m].update(zip(keys, sims.tolist()))
    return scores, unreadable, scene


def weights_stamp(paths):
    """A short digest of (name, size, mtime) of every file under the given files or directories."""
    import hashlib
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        else:
            files += [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
    stamp = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in sorted(files)]
    return hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]


def check_run(cfg, image_dir, out_dir):
    """out_dir/run.json records the settings of the reconstructions in out_dir: resuming with other
    settings would mix two models' outputs in one score, so that is an error. The weights count as
    settings too (size and modification time of every file): a checkpoint retrained in place is another model."""
    run = {k: os.path.abspath(cfg[k]) if k in UAE_PATH_KEYS and cfg[k] else cfg[k] for k in UAE_KEYS}
    run['images'] = os.path.abspath(image_dir)
    run['weights'] = weights_stamp([cfg[k] for k in UAE_PATH_KEYS if cfg[k]])
    path = os.path.join(out_dir, 'run.json')
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f'{k}: {old.get(k)!r} there, {run.get(k)!r} now' for k in sorted(set(run) | set(old))
                if run.get(k) != old.get(k)]
        if diff:
            raise ValueError(f"{out_dir} holds reconstructions made with other settings ({'; '.join(diff)}): "
                             f"pass another --out_dir, or delete that one to start over")
    else:
        save_json(run, path)
    return run


def write_text(path, text):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def progress(done, total, t0):
    elapsed = time.time() - t0
    eta = f'{elapsed / done * (total - done):.0f} s' if done else '?'
    end = '\n' if done == total or not sys.stderr.isatty() else ''
    print(f'\r[{"#" * round(30 * done / total):<30}] {done}/{total} images  {elapsed:.0f} s  ETA {eta}',
          end=end, file=sys.stderr, flush=True)


def caption_batch(enc, images, cfg, k, device):
    """(captions, Generation, generator) of batch k of a run: the batch's own seed and the sampling settings
    of cfg. The one caption path of Unified-Bench (reconstruct draws next from the same generator) and of
    --task understanding, which so reads the very captions the bench reconstructs from."""
    from pipeline import caption
    gen = torch.Generator(device).manual_seed(cfg['seed'] * 1_000_003 + k)
    with autocast(device, cfg['dtype']):
        texts, out = caption(enc, images, cfg['temperature'], cfg['max_new_tokens'], generator=gen,
                             top_k=cfg['top_k'], top_p=cfg['top_p'], repetition_penalty=cfg['repetition_penalty'])
    return texts, out, gen


def reconstruct(cfg, image_dir, names, out_dir, device):
    """I2T2I of every image of `names` not yet done in out_dir (check_run first). After each batch
    the reconstructions (recon_<stem>.png) and captions.jsonl are written atomically, so a rerun
    resumes where a crash stopped. Returns ({name: record}, {path: error} of unreadable images)."""
    from PIL import Image
    from pipeline import draw, load_uae

    def recon_name(n):  # 'a/0.jpg' -> 'a/recon_0.png'
        folder, base = posixpath.split(n)
        return posixpath.join(folder, f'recon_{posixpath.splitext(base)[0]}.png')

    owners = {}
    for n in names:
        owners.setdefault(recon_name(n), []).append(n)
    clashes = [' and '.join(v) for v in owners.values() if len(v) > 1]
    if clashes:
        raise ValueError(f'{image_dir}: images with the same stem would share a reconstruction file: '
                         f'{"; ".join(clashes)}')
    log, done, unreadable = os.path.join(out_dir, 'captions.jsonl'), {}, {}
    if os.path.exists(log):
        with open(log) as f:
            for rec in map(json.loads, f):
                if rec['image'] in owners.get(rec['recon'], ()) and os.path.exists(os.path.join(out_dir, rec['recon'])):
                    done[rec['image']] = rec
    total = sum(n not in done for n in names)
    print(f'{len(names) - total} of {len(names)} images already reconstructed in {out_dir}, {total} to go')
    if not total:
        return done, unreadable
    enc, dit, codec, pooled = load_uae(cfg, device)
    bs, t0, finished = cfg['batch_size'], time.time(), 0
    # fixed batches, each with its own seed: a resumed run makes the same images as an uninterrupted one
    for k, batch in enumerate(names[i:i + bs] for i in range(0, len(names), bs)):
        todo, images = [], []
        for n in batch:
            if n not in done:
                try:
                    images.append(load_image(os.path.join(image_dir, n)))
                    todo.append(n)
                except ValueError as e:
                    unreadable[os.path.join(image_dir, n)] = str(e)
                    finished += 1
        if not todo:
            continue
        texts, out, gen = caption_batch(enc, images, cfg, k, device)
        with autocast(device, cfg['dtype']):
            recon = draw(enc, dit, codec, pooled, texts, cfg['negative_prompt'], cfg['size'], cfg['steps'],
                         cfg['guidance'], cfg['shift'], gen, guidance_min_sigma=cfg['guidance_min_sigma'])
        for n, text, pixels, length in zip(todo, texts, recon, out.mask.sum(1).tolist()):
            rec = dict(image=n, recon=recon_name(n), caption=text, tokens=int(length))
            path = os.path.join(out_dir, rec['recon'])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format='PNG'))
            done[n] = rec
        write_text(log, ''.join(json.dumps(done[n]) + '\n' for n in names if n in done))
        finished += len(todo)
        progress(finished, total, t0)
    return done, unreadable


def html_sheet(rows, metrics, path):
    """rows: (name, original path, caption, reconstruction path, {metric: score}) -> an HTML table
    (original | caption | reconstruction | scores) that links the images by relative path."""
    import html
    from urllib.parse import quote
    src = lambda p: quote(os.path.relpath(p, os.path.dirname(os.path.abspath(path))).replace(os.sep, '/'))  # noqa: E731
    lines = ['<!doctype html><meta charset="utf-8"><title>Unified-Bench</title><style>',
             'body{font-family:sans-serif} td{vertical-align:top;padding:4px;border-bottom:1px solid #ccc}',
             'img{width:160px;image-rendering:pixelated} td.c{max-width:480px}</style><table>',
             '<tr><th>original</th><th>caption</th><th>reconstruction</th><th>scores</th></tr>']
    for name, orig, text, recon, scores in rows:
        s = '<br>'.join(f'{m} {scores[m]:.4f}' for m in metrics if m in scores)
        lines.append(f'<tr><td><img src="{src(orig)}"><br>{html.escape(name)}</td><td class="c">{html.escape(text)}'
                     f'</td><td><img src="{src(recon)}"></td><td>{s}</td></tr>')
    lines.append('</table>')
    write_text(path, '\n'.join(lines) + '\n')


def print_report(results, metrics, scene, truth_path, ref_dir, out_dir):
    """Everything the JSON lists that needs a reader's eye, then the scores."""
    unmatched, unreadable, ignored = results['unmatched'], results['unreadable'], results['ignored']
    for side, files in unmatched.items():
        for why in dict.fromkeys(files.values()):
            print(f"unmatched {side} files ({why}): {', '.join(n for n, w in files.items() if w == why)}")
    for path, error in unreadable.items():
        print(f'unreadable {path}: {error}')
    if ignored:
        print(f"ignored {len(ignored)} non-image file(s): {', '.join(ignored)}")
    scene_metrics = [m for m in metrics if m in SCENE_METRICS]
    for m in scene_metrics:
        print(f"{m}: {results['models'][m]}")
    if scene_metrics:
        if scene['resized']:
            print(f"note: {scene['resized']} image(s) are not 48x48 and were resampled for the scene metric, "
                  f"which only means something on toy-world images")
        if scene['truth_disagrees']:
            print(f"warning: {scene['truth_disagrees']} reference(s) do not parse to their scenes.jsonl scene: "
                  f"is {truth_path} the file of these images?")
    print(f"\n{results['pairs']} pairs scored ({ref_dir})")
    w = max(len(m) for m in [*metrics, 'captions']) + 1
    for m in metrics:
        r = results[m]
        print(f'{m:{w}s}' + ('no scores' if r['average'] is None else
                             f"average {r['average']:.4f}  min {r['min']:.4f}  max {r['max']:.4f}"))
    if results['overall'] is not None:
        print(f"{'overall':{w}s}{results['overall']:.4f} (mean of the metric averages)")
    if results.get('caption_tokens') is not None:
        print(f"{'captions':{w}s}{results['caption_tokens']:.1f} tokens on average")
    print(f"scores: {os.path.join(out_dir, 'scores.json')}; "
          f"contact sheet: {os.path.join(out_dir, 'contact_sheet.html')}")


def toy_bench():
    """The toy Unified-Bench's folder (100 test images and their scenes), made first if missing."""
    if not os.path.exists(os.path.join(TOY_BENCH, 'scenes.jsonl')):
        print('no toy test split yet: running data/shapes/prepare.py (~20 s)')
        subprocess.run([sys.executable, os.path.join(REPO, 'data', 'shapes', 'prepare.py')], check=True, cwd=REPO)
    return TOY_BENCH


def label(cfg):
    """The first column of a task's table row: --label, else which adapters the run uses."""
    return cfg['label'] or '+'.join(k for k in ('llm_lora', 'dit_lora') if cfg[k]) or 'no adapters'


def print_row(name, summary):
    """A markdown table of one row, with its header: the model's name, then the summary's values."""
    cell = lambda v: '-' if v is None else f'{v:.3f}' if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n| model | {' | '.join(summary)} |\n|---|{'---:|' * len(summary)}\n"
          f"| {name} | {' | '.join(cell(v) for v in summary.values())} |", flush=True)


def bench_unibench(args):
    """Unified-Bench; returns the results dict it writes to out_dir/scores.json.

    python bench.py                                          # toy bench: 100 toy test images, toy checkpoints
    python bench.py --images DIR [--out_dir D] [UAE keys]    # I2T2I over DIR, then score
    python bench.py --generated DIR --reference DIR          # score existing reconstructions
    metrics: --metrics=clip,dinov2,dinov3,longclip,pixel,scene with --clip=PATH etc.; the default is
    every embedder given a path, or pixel,scene (which need no weights) when none is."""
    config = dict(images='', generated='', reference='', out_dir='', metrics='', clip='', dinov2='', dinov3='',
                  longclip='', batch_size=BATCH_SIZE, device='auto', label='', **UAE)
    cfg = configure(config, args)
    from embedders import load_embedder
    device = pick_device(cfg['device'])
    scoring = bool(cfg['generated'] or cfg['reference'])
    if scoring and (cfg['images'] or not (cfg['generated'] and cfg['reference'])):
        raise ValueError('--generated and --reference go together, and without --images')
    toy = not (scoring or cfg['images'])
    if toy:
        missing = [f'--{k}={cfg[k]}' for k in ('llm', 'dit', 'pooled') if not os.path.exists(cfg[k])]
        if missing:
            raise FileNotFoundError(f"the toy Unified-Bench needs the toy checkpoints; not found: "
                                    f"{', '.join(missing)}. Train them (see README), pass other paths, or score "
                                    f"existing images with --generated DIR --reference DIR")
        cfg['images'] = toy_bench()

    given = [m for m in METRIC_PATHS if cfg[m]]
    metrics = [m.strip() for m in cfg['metrics'].split(',') if m.strip()] or given or ['pixel', *SCENE_METRICS]
    bad = [m for m in metrics if m not in METRICS]
    if bad or len(set(metrics)) != len(metrics):
        raise ValueError(f"--metrics={cfg['metrics']}: each of {', '.join(METRICS)} at most once; got {metrics}")
    for m in metrics:
        if m in METRIC_PATHS and not cfg[m]:
            raise ValueError(f'metric {m} needs its local checkpoint: --{m}=PATH ({METRIC_PATHS[m]})')
    for m in given:
        if m not in metrics:
            print(f'note: --{m} is given but {m} is not in --metrics: not used')
    # float32 whatever --dtype says (that one is the UAE models'): scores are compared across papers
    embedders = {m: load_embedder(m, cfg.get(m) or None, device, 'float32') for m in metrics if m not in SCENE_METRICS}

    result_extra = {}
    if scoring:
        gen_dir, ref_dir = cfg['generated'], cfg['reference']
        out_dir = cfg['out_dir'] or os.path.join('out', 'unibench', os.path.basename(os.path.normpath(gen_dir)))
        (gen_names, gen_other), (ref_names, ref_other) = list_images(gen_dir), list_images(ref_dir)
        matched, unmatched = match_pairs(gen_names, ref_names)
        pairs = [(g, os.path.join(gen_dir, g), os.path.join(ref_dir, r), r) for g, r in matched]
        ignored = [os.path.join(gen_dir, n) for n in gen_other] + [os.path.join(ref_dir, n) for n in ref_other]
        captions = {}  # written by an --images run beside its reconstructions
        if os.path.exists(os.path.join(gen_dir, 'captions.jsonl')):
            with open(os.path.join(gen_dir, 'captions.jsonl')) as f:
                captions = {rec.get('recon'): rec.get('caption', '') for rec in map(json.loads, f)}
        texts = {g: captions.get(g, '') for g, _ in matched}
        unreadable = {}
    else:
        ref_dir = cfg['images']
        out_dir = cfg['out_dir'] or os.path.join('out', 'unibench', 'toy' if toy else
                                                 os.path.basename(os.path.normpath(ref_dir)))
        names, other = list_images(ref_dir, skip=os.path.abspath(out_dir))
        ignored = [os.path.join(ref_dir, n) for n in other]
        os.makedirs(out_dir, exist_ok=True)
        run = check_run(cfg, ref_dir, out_dir)
        records, unreadable = reconstruct(cfg, ref_dir, names, out_dir, device)
        pairs = [(n, os.path.join(out_dir, records[n]['recon']), os.path.join(ref_dir, n), n)
                 for n in names if n in records]
        unmatched = {'generated': {}, 'reference': {}}
        texts = {n: rec['caption'] for n, rec in records.items()}
        tokens = [rec['tokens'] for rec in records.values()]
        result_extra = dict(uae=run, caption_tokens=sum(tokens) / len(tokens) if tokens else None)

    scene_metrics = [m for m in metrics if m in SCENE_METRICS]
    truths, truth_path = scene_truths(ref_dir, [p[3] for p in pairs]) if scene_metrics else ({}, None)
    scores, bad_files, scene = score_pairs(pairs, metrics, embedders, truths)
    unreadable.update(bad_files)

    models = {m: os.path.abspath(cfg[m]) for m in metrics if m in METRIC_PATHS}
    if 'pixel' in metrics:
        models['pixel'] = 'no weights: 1 - mean |a - b| of the RGB images at 64x64 (embedders.py)'
    against = ' and '.join([f"the ground-truth scenes of {truth_path} ({scene['truth']} images)"] * bool(scene['truth']) +
                           [f"world.parse_image(reference) ({scene['parsed']} images)"] * bool(scene['parsed']))
    what = dict(scene='object F1', scene_attributes='mean of the shape, colour, size, cell F1s and background match')
    models.update({m: f'{what[m]} of world.parse_image(reconstruction) against {against}' for m in scene_metrics})
    results = {m: dict(s) for m, s in scores.items()}
    for m, s in results.items():
        values = list(scores[m].values())
        s.update(average=sum(values) / len(values) if values else None, min=min(values, default=None),
                 max=max(values, default=None))
    averages = [results[m]['average'] for m in metrics if results[m]['average'] is not None]
    results.update(overall=sum(averages) / len(averages) if averages else None, models=models,
                   command=shlex.join(['python', 'bench.py', *args]), pairs=len(scores[metrics[0]]),
                   unmatched=unmatched, unreadable=unreadable, ignored=ignored, **result_extra)
    # what a report reads: every metric's average under a plain name, then the overall and caption length
    names = dict(scene='object_f1', scene_attributes='attribute_f1')
    results['summary'] = {names.get(m, m): results[m]['average'] for m in metrics}
    results['summary'].update(overall=results['overall'], caption_tokens=results.get('caption_tokens'),
                              pairs=results['pairs'])
    os.makedirs(out_dir, exist_ok=True)
    save_json(results, os.path.join(out_dir, 'scores.json'))
    rows = [(key, ref, texts.get(key, ''), gen, {m: scores[m][key] for m in metrics})
            for key, gen, ref, _ in pairs if key in scores[metrics[0]]]
    html_sheet(rows, metrics, os.path.join(out_dir, 'contact_sheet.html'))

    print_report(results, metrics, scene, truth_path, ref_dir, out_dir)
    print_row(label(cfg), results['summary'])
    if not results['pairs']:
        raise ValueError('no image pair could be scored: see the unmatched and unreadable files above')
    return results


# -----------------------------------------------------------------------------
# task: geneval -- the decoder alone, from prompts, scored by category as GenEval

def bench_geneval(args):
    """Toy-GenEval: GenEval (Ghosh et al. 2023: does a text-to-image model draw what a prompt asks, one
    category of request at a time) in the toy world, scored exactly by its parser.

    Prompts: world.geneval_prompts, `--prompts` per category from a fixed stream of their own, each a
    'named' caption without background, the language the decoder is trained on (world.captions):
      single_object 'a circle.'                  two_object 'a circle and a square.'
      counting      'a circle, a circle and a circle.' (2-4)   colors 'a red circle.'
      position      'a circle in the top left and a square in the bottom right.' (absolute cells)
      color_attr    'a red circle and a blue square.'
    Each prompt is drawn `--samples` times, every image from its own starting noise (seeded by the
    seed, category, prompt and sample). Prompts drawn together are right-padded to one length and the
    decoder attends to the padding (as UAE's), so only prompts of one length share a batch: an image
    is what draw() makes of its prompt alone, whatever --batch_size or the other prompts. An image passes when
    world.satisfies(parse_image(image), parse_caption(prompt)): exactly the objects the prompt names,
    each with every attribute it names ('a red circle.' fails on four red circles). A category's score
    is its pass rate, `overall` the mean over the six categories, as GenEval's.
    Writes out_dir/geneval.json ({'summary': {category: accuracy, overall, images}, 'items': [...]})
    and out_dir/geneval.png (a row of images per category, in prompt order)."""
    import numpy as np
    import zlib
    from PIL import Image
    from data.shapes import world
    from pipeline import draw, load_uae
    cfg = configure(dict(out_dir=os.path.join('out', 'bench_geneval'), prompts=50, samples=1, batch_size=100,
                         device='auto', label='', **UAE), args)
    if cfg['prompts'] < 1 or cfg['samples'] < 1:
        raise ValueError(f"--prompts={cfg['prompts']} and --samples={cfg['samples']} must be at least 1")
    device = pick_device(cfg['device'])
    enc, dit, codec, pooled = load_uae(cfg, device)
    items = [dict(p, sample=j) for p in world.geneval_prompts(cfg['prompts']) for j in range(cfg['samples'])]
    down = codec.factor if codec is not None else 1  # pixels per latent position
    shape = (dit.config.in_channels, cfg['size'] // down, cfg['size'] // down)
    by_length = {}  # prompt tokens in the decoder's template -> item indices
    for n, it in enumerate(items):
        by_length.setdefault(len(enc.get_tokenizer().chat_ids(it['prompt'], role='generate')), []).append(n)
    images, done, t0 = [None] * len(items), 0, time.time()
    for group in by_length.values():
        for i in range(0, len(group), cfg['batch_size']):
            batch = [items[n] for n in group[i:i + cfg['batch_size']]]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(
                f"{cfg['seed']}/{it['category']}/{it['index']}/{it['sample']}".encode()))) for it in batch])
            with autocast(device, cfg['dtype']):
                out = draw(enc, dit, codec, pooled, [it['prompt'] for it in batch], cfg['negative_prompt'],
                           cfg['size'], cfg['steps'], cfg['guidance'], cfg['shift'], noise=noise.to(device),
                           guidance_min_sigma=cfg['guidance_min_sigma'])
            for n, img in zip(group[i:i + cfg['batch_size']], out):
                images[n] = img
            done += len(batch)
            progress(done, len(items), t0)
    for it, img in zip(items, images):
        parsed = world.parse_image(img)
        it.update(passed=world.satisfies(parsed, world.parse_caption(it['prompt'])),
                  objects=len(parsed['objects']), parsed=parsed)
    summary = {c: float(np.mean([it['passed'] for it in items if it['category'] == c]))
               for c in world.GENEVAL_CATEGORIES}
    summary.update(overall=float(np.mean(list(summary.values()))), images=len(items))
    settings = {k: cfg[k] for k in UAE_KEYS if k not in ('temperature', 'max_new_tokens', 'top_k', 'top_p',
                                                         'repetition_penalty')}  # the captioner's: unused
    os.makedirs(cfg['out_dir'], exist_ok=True)
    command = shlex.join(['python', 'bench.py', '--task=geneval', *args])
    save_json(dict(summary=summary, uae=settings, command=command, items=items),
              os.path.join(cfg['out_dir'], 'geneval.json'))
    # the contact sheet: one row per category, 2 px gaps
    size, per_row = cfg['size'], cfg['prompts'] * cfg['samples']
    sheet = np.full((len(world.GENEVAL_CATEGORIES) * (size + 2), per_row * (size + 2), 3), 255, np.uint8)
    for n, img in enumerate(images):
        r, c = divmod(n, per_row)
        sheet[r * (size + 2):r * (size + 2) + size, c * (size + 2):c * (size + 2) + size] = img
    atomic_write(os.path.join(cfg['out_dir'], 'geneval.png'),
                 lambda tmp: Image.fromarray(sheet).save(tmp, format='PNG'))
    print_row(label(cfg), summary)
    print(f"results: {os.path.join(cfg['out_dir'], 'geneval.json')}")
    return summary


# -----------------------------------------------------------------------------
# task: understanding -- the encoder alone: what its captions say, attribute by attribute

def bench_understanding(args):
    """The captions of Unified-Bench's images (the 100 toy test images, or --images DIR with a
    scenes.jsonl), sampled exactly as Unified-Bench samples them (caption_batch: same batches, seeds and
    settings), parsed (world.parse_caption) and checked against the true scenes.

    Matching: world.match pairs each caption's objects one-to-one with the true objects, by cell first,
    then greedily by the number of agreeing attributes. Counted over all images together:
      {attr}_precision  of the attribute values the captions state (size, colour, cell may be left
                        out; the shape never is), the fraction equal to their matched true object's;
                        a stated value of an unmatched (extra) object counts as wrong. None when no
                        caption states the attribute.
      {attr}_recall     of the true objects, the fraction whose matched object states that attribute
                        correctly.
      object_precision, object_recall   the same for whole objects: all four attributes stated and right.
      background_accuracy  the fraction of captions naming the right background (unnamed = wrong).
      count_accuracy    the fraction of captions naming exactly as many objects as the image holds.
      caption_tokens    mean caption length in tokens (end-of-sequence token included, as Unified-Bench).
    Writes out_dir/understanding.json ({'summary': {...}, 'items': [...]})."""
    from data.shapes import world
    from pipeline import load_uae
    cfg = configure(dict(images='', limit=0, out_dir=os.path.join('out', 'bench_understanding'),
                         batch_size=BATCH_SIZE, device='auto', label='', **UAE), args)
    image_dir = cfg['images'] or toy_bench()
    names = list_images(image_dir)[0][:cfg['limit'] or None]
    truths, path = scene_truths(image_dir, names)
    if not names or len(truths) < len(names):
        raise ValueError(f'{image_dir}: the understanding task needs images 0.png, 1.png, ... and their '
                         f"scenes in scenes.jsonl (prepare.py's test split); found {len(names)} images, "
                         f'{len(truths)} scenes')
    device = pick_device(cfg['device'])
    enc = load_uae(cfg, device)[0]
    items, t0 = [], time.time()
    for k, batch in enumerate(names[i:i + cfg['batch_size']] for i in range(0, len(names), cfg['batch_size'])):
        texts, out, _ = caption_batch(enc, [load_image(os.path.join(image_dir, n)) for n in batch], cfg, k, device)
        lengths = out.mask.sum(1).tolist()
        items += [dict(image=n, caption=t, tokens=int(m)) for n, t, m in zip(batch, texts, lengths)]
        progress(len(items), len(names), t0)
    for it in items:
        it.update(caption_counts(world.parse_caption(it['caption']), truths[it['image']]))
    summary = understanding_summary(items)
    os.makedirs(cfg['out_dir'], exist_ok=True)
    save_json(dict(summary=summary, uae={k: cfg[k] for k in UAE_KEYS}, truth=path,
                   command=shlex.join(['python', 'bench.py', '--task=understanding', *args]), items=items),
              os.path.join(cfg['out_dir'], 'understanding.json'))
    print_row(label(cfg), summary)
    print(f"results: {os.path.join(cfg['out_dir'], 'understanding.json')}")
    return summary


def caption_counts(pred, true):
    """The counts behind bench_understanding's metrics for one caption (parsed) and its true scene."""
    from data.shapes import world
    P = pred['objects']
    T = [dict(o, cell=tuple(o['cell'])) for o in true['objects']]  # JSON gives lists
    pairs = world.match(pred, dict(true, objects=T))
    right = lambda i, j, a: P[i][a] is not None and P[i][a] == T[j][a]  # noqa: E731
    exact = sum(all(right(i, j, a) for a in world.ATTRS) for i, j in pairs)
    counts = dict(named=len(P), true=len(T), exact=exact,
                  background=int(pred['background'] == true['background']), count=int(len(P) == len(T)))
    for a in world.ATTRS:
        counts[f'{a}_stated'] = sum(o[a] is not None for o in P)
        counts[f'{a}_right'] = sum(right(i, j, a) for i, j in pairs)
    return counts


def understanding_summary(items):
    """{metric: value} from the items' caption_counts, pooled over all items (see bench_understanding)."""
    from data.shapes import world
    total = lambda key: sum(it[key] for it in items)  # noqa: E731
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    summary = {}
    for a in world.ATTRS:
        summary[f'{a}_precision'] = ratio(total(f'{a}_right'), total(f'{a}_stated'))
        summary[f'{a}_recall'] = ratio(total(f'{a}_right'), total('true'))
    n = len(items)
    summary.update(object_precision=ratio(total('exact'), total('named')),
                   object_recall=ratio(total('exact'), total('true')),
                   background_accuracy=ratio(total('background'), n), count_accuracy=ratio(total('count'), n),
                   caption_tokens=ratio(total('tokens'), n), images=n)
    return summary


TASKS = {'reward': bench_reward, 'unibench': bench_unibench, 'geneval': bench_geneval,
         'understanding': bench_understanding}

def main(args):
    task = 'unibench'
    for i, a in enumerate(args):
        if a == '--task' or a.startswith('--task='):
            if '=' not in a and (i + 1 == len(args) or args[i + 1].startswith('-')):
                raise ValueError(f"--task needs a value: --task=NAME, one of {', '.join(sorted(TASKS))}")
            task = a.split('=', 1)[1] if '=' in a else args[i + 1]
            args = args[:i] + args[i + (1 if '=' in a else 2):]
            break
    if task not in TASKS:
        raise ValueError(f"unknown --task {task!r}; choose from {', '.join(sorted(TASKS))}")
    if '--help' in args or '-h' in args:
        print(f"tasks: --task={' | '.join(sorted(TASKS))} (default unibench); the keys of --task={task}:")
    keep_freed_memory()
    TASKS[task](args)


if __name__ == '__main__':
    run(lambda: main(sys.argv[1:]))
