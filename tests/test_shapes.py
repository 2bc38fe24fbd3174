"""The toy world: determinism, exact and tolerant parsing, the score, captions, the BPE vocabulary."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data.shapes import prepare, world

TOKENIZER = os.path.join(os.path.dirname(prepare.__file__), 'tokenizer.json')


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng) for _ in range(n)]


def obj(shape, color, size, cell):
    return {'shape': shape, 'color': color, 'size': size, 'cell': cell}


def mean_object_f1(scenes_, corrupt):
    return np.mean([world.score(world.parse_image(corrupt(world.render(s))), s)['object_f1'] for s in scenes_])

# -----------------------------------------------------------------------------
# determinism and rendering


def test_same_seed_same_world():
    def draw(seed):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(50):
            s = world.sample_scene(rng)
            out.append((json.dumps(s), world.render(s).tobytes(), json.dumps(world.captions(s, rng))))
        return out
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_scenes_follow_the_rules():
    for s in scenes(500):
        cells = [tuple(o['cell']) for o in s['objects']]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)
        assert cells == sorted(cells)  # reading order
        assert s['background'] in world.BACKGROUNDS


def test_palette_colours_are_far_apart():
    # the parser snaps to the nearest colour: noise of sigma 40 must not cross half of these gaps
    import itertools
    objects, backgrounds = list(world.COLORS.values()), list(world.BACKGROUNDS.values())
    dist = lambda a, b: np.linalg.norm(np.subtract(a, b))
    assert min(dist(a, b) for a, b in itertools.combinations(objects, 2)) > 120
    assert min(dist(a, b) for a in objects for b in backgrounds) > 100


def test_objects_fill_their_size_box_centred_in_the_cell():
    for (shape, size), mask in world._MASKS.items():
        rows, cols = np.nonzero(mask)
        side = world.SIZES[size]
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side, (shape, size)
        assert rows.min() + rows.max() + 1 == world.CELL and cols.min() + cols.max() + 1 == world.CELL


def test_render_paints_only_inside_the_objects_cells():
    for s in scenes(100):
        img = world.render(s)
        bg = np.array(world.BACKGROUNDS[s['background']], np.uint8)
        occupied = {tuple(o['cell']) for o in s['objects']}
        for r in range(world.GRID):
            for c in range(world.GRID):
                cell = img[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
                assert (cell != bg).any(-1).any() == ((r, c) in occupied)

# -----------------------------------------------------------------------------
# parsing images


def test_parser_is_exact_on_the_worlds_images():
    for s in scenes(300, seed=1):
        parsed = world.parse_image(world.render(s))
        assert parsed == s
        assert world.score(parsed, s)['object_f1'] == 1.0


def test_parser_tolerates_noise_blur_and_offsets():
    # measured on 500 scenes: object F1 1.000 up to noise sigma 50 (of 255), 1.000 up to gaussian blur
    # radius 1.5 and 2 px offsets, 0.984 with noise 40 + blur 1.0; it breaks at blur 2 (0.85)
    # and at 3 px offsets (0.48), where the shape is gone
    test = scenes(100, seed=2)
    rng = np.random.default_rng(3)

    def noise(sigma):
        return lambda x: np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).round().astype(np.uint8)

    def blur(radius):
        return lambda x: np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius)))
    assert mean_object_f1(test, noise(40)) >= 0.98
    assert mean_object_f1(test, blur(1.5)) >= 0.98
    assert mean_object_f1(test, lambda x: noise(40)(blur(1.0)(x))) >= 0.93
    assert mean_object_f1(test, lambda x: np.roll(x, (2, -2), axis=(0, 1))) >= 0.98
    # and the parser is not just reporting the truth: a wrecked image scores low
    assert mean_object_f1(test, blur(3.0)) < 0.7


def test_parser_finds_nothing_in_noise():
    rng = np.random.default_rng(4)
    for bg in world.BACKGROUNDS.values():
        img = np.clip(np.array(bg) + rng.normal(0, 40, (48, 48, 3)), 0, 255).round().astype(np.uint8)
        assert world.parse_image(img)['objects'] == []


def test_parser_rejects_wrong_input():
    with pytest.raises(ValueError, match='uint8'):
        world.parse_image(np.zeros((48, 48, 3), np.float32))
    with pytest.raises(ValueError, match=r'\(48, 48, 3\)'):
        world.parse_image(np.zeros((32, 32, 3), np.uint8))

# -----------------------------------------------------------------------------
# score, by hand


TRUE = {'background': 'black', 'objects': [obj('circle', 'red', 'large', (0, 0)),
                                           obj('square', 'blue', 'small', (1, 1))]}


def test_score_missing_object():
    s = world.score({'background': 'black', 'objects': [TRUE['objects'][0]]}, TRUE)
    for name in ('object', 'shape', 'color', 'size', 'cell'):
        assert (s[f'{name}_precision'], s[f'{name}_recall']) == (1.0, 0.5)
        assert s[f'{name}_f1'] == pytest.approx(2 / 3)
    assert s['background'] == 1.0


def test_score_wrong_colour():
    pred = {'background': 'gray', 'objects': [obj('circle', 'green', 'large', (0, 0)), TRUE['objects'][1]]}
    s = world.score(pred, TRUE)
    assert s['object_f1'] == 0.5 and s['color_f1'] == 0.5
    assert s['shape_f1'] == s['size_f1'] == s['cell_f1'] == 1.0
    assert s['background'] == 0.0


def test_score_matches_by_cell_first():
    # colours swapped between the two cells: every colour is present, but on the wrong object
    pred = {'background': 'black', 'objects': [obj('circle', 'blue', 'large', (0, 0)),
                                               obj('square', 'red', 'small', (1, 1))]}
    s = world.score(pred, TRUE)
    assert s['object_f1'] == 0.0 and s['color_f1'] == 0.0 and s['shape_f1'] == 1.0


def test_score_wrong_cell_and_extra_object():
    # the circle moved to (2, 2); an extra plus: the circle is still paired with the true circle
    pred = {'background': 'black', 'objects': [TRUE['objects'][1], obj('circle', 'red', 'large', (2, 2)),
                                               obj('plus', 'white', 'small', (2, 0))]}
    s = world.score(pred, TRUE)
    assert (s['object_precision'], s['object_recall']) == (pytest.approx(1 / 3), 0.5)
    assert (s['color_precision'], s['color_recall']) == (pytest.approx(2 / 3), 1.0)
    assert (s['cell_precision'], s['cell_recall']) == (pytest.approx(1 / 3), 0.5)


def test_score_of_a_caption_without_positions():
    s = world.score(world.parse_caption('A red circle and a blue square.'), TRUE)
    assert s['shape_f1'] == s['color_f1'] == 1.0
    assert s['size_f1'] == s['cell_f1'] == s['object_f1'] == s['background'] == 0.0


def test_score_of_nothing():
    s = world.score({'background': None, 'objects': []}, TRUE)
    assert s['object_recall'] == s['object_f1'] == 0.0

# -----------------------------------------------------------------------------
# captions


def test_complete_caption_names_everything():
    s = {'background': 'navy', 'objects': [obj('triangle', 'yellow', 'small', (0, 2)),
                                           obj('plus', 'white', 'large', (1, 1))]}
    assert world.caption(s) == ('a navy background with a small yellow triangle in the top right '
                                'and a large white plus in the center.')
    for s in scenes(300, seed=5):
        assert world.parse_caption(world.caption(s)) == s


def test_partial_captions_name_a_true_subset():
    rng = np.random.default_rng(6)
    for s in scenes(300, seed=6):
        caps = world.captions(s, rng)
        assert set(caps) == set(world.CAPTION_LEVELS) and caps['complete'] == world.caption(s)
        for level, text in caps.items():
            named = world.parse_caption(text)['objects']
            sc = world.score(world.parse_caption(text), s)
            assert 1 <= len(named) <= len(s['objects'])
            assert sc['shape_precision'] == 1.0  # every named object exists
            for a in ('size', 'color', 'cell'):  # every named attribute is right
                n_named = sum(o[a] is not None for o in named)
                assert sc[f'{a}_precision'] * len(named) == pytest.approx(n_named)
        assert len(world.parse_caption(caps['one'])['objects']) == 1
        assert len(world.parse_caption(caps['short'])['objects']) == len(s['objects'])

# -----------------------------------------------------------------------------
# prepare.py and the BPE vocabulary


def test_prepare_writes_deterministic_disjoint_splits(tmp_path):
    args = ['--n_train=300', '--n_val=50', '--n_test=20', "--tokenizer=''"]
    prepare.main([f'--out={tmp_path / "a"}'] + args)
    prepare.main([f'--out={tmp_path / "b"}'] + args)
    for split, files in (('train', ('scenes.jsonl', 'images.npy')), ('test', ('scenes.jsonl', '0.png', '19.png'))):
        for f in files:
            assert (tmp_path / 'a' / split / f).read_bytes() == (tmp_path / 'b' / split / f).read_bytes()
    keys = {}
    for split in ('train', 'val', 'test'):
        images, records = world.load_split(tmp_path / 'a' / split)
        assert len(records) == {'train': 300, 'val': 50, 'test': 20}[split]
        for img, rec in zip(images, records):
            assert (img == world.render(rec['scene'])).all()
        keys[split] = {world.scene_key(r['scene']) for r in records}
    assert not keys['train'] & keys['test'] and not keys['val'] & keys['test'] and not keys['train'] & keys['val']


def test_shipped_tokenizer_is_reproducible_and_qwen2_shaped():
    from tokenizers import Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert prepare.PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    # if this fails the world's vocabulary changed: rerun prepare.py and retrain the toy checkpoints
    assert prepare.train_tokenizer().to_str(pretty=True) == open(TOKENIZER).read()
    tok = Tokenizer.from_file(TOKENIZER)
    n = tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in prepare.SPECIAL_TOKENS] == list(range(n - 6, n))
    ids = tok.encode('<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>').ids
    assert ids[0] == tok.token_to_id('<|im_start|>') and ids[-3:] == [n - 3, n - 1, n - 2]
    rng = np.random.default_rng(8)
    for s in scenes(200, seed=8):
        for text in world.captions(s, rng).values():
            enc = tok.encode(text)
            assert tok.decode(enc.ids) == text
            assert len(enc.ids) <= 48  # every caption word is one token (complete captions: <= 40)


def test_tokenizer_through_tiktoken_matches():
    """The contract with the project's tiktoken-based Tokenizer: ranks = the ids of tokenizer.json's
    vocab (byte-level strings mapped back to bytes) give the same ids as the HF tokenizer."""
    import tiktoken
    from tokenizers import Tokenizer, pre_tokenizers
    data = json.load(open(TOKENIZER))
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    to_byte = {chr(b): b for b in printable}  # GPT-2 byte-level: other bytes are chr(256 + k), in order
    to_byte.update({chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in printable)})
    assert set(to_byte) == set(pre_tokenizers.ByteLevel.alphabet())
    ranks = {bytes(to_byte[ch] for ch in t): i for t, i in data['model']['vocab'].items()}
    enc = tiktoken.Encoding('toy', pat_str=prepare.PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                            special_tokens={t['content']: t['id'] for t in data['added_tokens']})
    tok = Tokenizer.from_file(TOKENIZER)
    rng = np.random.default_rng(9)
    texts = [t for s in scenes(300, seed=9) for t in world.captions(s, rng).values()]
    texts += list(prepare.TEMPLATE_TEXTS) + ['Hello, World! 123 élan  \n\n x']
    texts += ['<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>' + prepare.TEMPLATE_TEXTS[6]]
    for text in texts:
        assert enc.encode(text, allowed_special='all') == tok.encode(text).ids, text


def test_empty_cell_residual_is_zero_on_renders_and_sees_a_ghost():
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, 1, 1)
    img = world.render(scene)
    assert world.empty_cell_residual(img, scene) == 0.0
    # a faint copy of the object (20 % contrast) in an empty cell: what the parser ignores, a reader sees
    r, c = scene['objects'][0]['cell']
    r2, c2 = (r + 1) % world.GRID, c
    ghost = img.astype(np.float32)
    src = ghost[r * world.CELL:(r + 1) * world.CELL, c * world.CELL:(c + 1) * world.CELL]
    bg = np.array(world.BACKGROUNDS[scene['background']], np.float32)
    ghost[r2 * world.CELL:(r2 + 1) * world.CELL, c2 * world.CELL:(c2 + 1) * world.CELL] = bg + 0.2 * (src - bg)
    ghost = ghost.round().astype(np.uint8)
    assert world.parse_image(ghost)['objects'] == world.parse_image(img)['objects']  # the parser ignores it
    assert world.empty_cell_residual(ghost, scene) > 0.005
    full = {'background': 'black', 'objects': [{'shape': 'square', 'color': 'red', 'size': 'small', 'cell': (i // 3, i % 3)}
                                               for i in range(9)]}
    assert world.empty_cell_residual(world.render(full), full) is None


def test_halo_residual_is_zero_on_renders_and_sees_a_tinted_cell():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng) for _ in range(20)]
    assert world.mean_residual(world.halo_residual, [world.render(s) for s in scenes], scenes) == 0.0
    # a small square's cell, its background 20 levels darker: the parser still reads the square, a reader
    # sees a dark square around it (the halo the decoder draws); the empty cells stay clean
    scene = {'background': 'gray', 'objects': [{'shape': 'square', 'color': 'red', 'size': 'small', 'cell': (1, 1)}]}
    img = world.render(scene).astype(np.float32)
    C, bg = world.CELL, np.array(world.BACKGROUNDS['gray'], np.float32)
    cell = img[C:2 * C, C:2 * C]
    cell[(cell == bg).all(-1)] -= 20
    img = img.astype(np.uint8)
    assert world.parse_image(img)['objects'] == world.parse_image(world.render(scene))['objects']
    assert world.halo_residual(img, scene) == pytest.approx(20 / 255)
    assert world.empty_cell_residual(img, scene) == 0.0
    # the same darkening only on the pixels a drawn square may cover when shifted by 2 px: not a halo
    near = world.render(scene).astype(np.float32)
    ring = np.zeros((C, C), bool)
    ring[1:15, 1:15] = True
    ring[3:13, 3:13] = False
    near[C:2 * C, C:2 * C][ring] -= 20
    assert world.halo_residual(near.astype(np.uint8), scene) == 0.0
    large = {'background': 'black', 'objects': [{'shape': 'square', 'color': 'red', 'size': 'large', 'cell': (0, 0)}]}
    assert world.halo_residual(world.render(large), large) is None
