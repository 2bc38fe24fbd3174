"""
The toy world: 48x48 images of coloured shapes on a 3x3 grid, their captions, and a parser that
reads the objects back from an image, which gives the exact, parse-based score used everywhere
(SFT curves, the RL reward check, the toy Unified-Bench).

A scene is a plain JSON-able dict:
    {'background': 'black',
     'objects': [{'shape': 'circle', 'color': 'red', 'size': 'large', 'cell': (0, 2)}, ...]}
with 1-4 objects, at most one per cell, listed in reading order (row, then column).

Geometry is chosen for the toy models: every object is centred in its own 16 px cell, so a ViT
with patch 8 and 2x2 merge sees one visual token per cell, and a pixel-space DiT with patch 8 or 16
draws each object inside whole patches. Sizes are 10 and 14 px: at 8 px a circle cannot be told
from a square even on clean images. Rendering is crisp (no antialiasing) so parsing a clean image
is exact. Vocabulary = the dicts below; edit them to change the world (colour names must stay
far apart in RGB, see parse_image).
"""
import itertools
import json
import os
import re
import zlib

import numpy as np

IMAGE = 48  # px, square
GRID = 3  # cells per side
CELL = IMAGE // GRID  # 16 px

SHAPES = ('square', 'circle', 'triangle', 'plus')
SIZES = {'small': 10, 'large': 14}  # px: side of the object's bounding box
COLORS = {  # saturated object colours; every pair is > 120 apart in RGB
    'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 90, 230),
    'yellow': (240, 210, 40), 'purple': (160, 60, 210), 'white': (235, 235, 235),
}
BACKGROUNDS = {  # dark / neutral, every one > 100 away from every object colour
    'black': (15, 15, 15), 'gray': (100, 100, 100), 'navy': (20, 30, 90),
}
ROWS = ('top', 'middle', 'bottom')
COLS = ('left', 'center', 'right')
ATTRS = ('size', 'color', 'shape', 'cell')  # word order in a caption: "a large red circle in the top left"

# -----------------------------------------------------------------------------
# scenes


def sample_scene(rng, min_objects=1, max_objects=4, shapes=SHAPES, colors=tuple(COLORS),
                 sizes=tuple(SIZES), backgrounds=tuple(BACKGROUNDS)):
    """A random scene from a numpy Generator; the same generator state gives the same scene."""
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = np.sort(rng.choice(GRID * GRID, size=n, replace=False))  # sorted = reading order
    objects = [{'shape': shapes[rng.integers(len(shapes))],
                'color': colors[rng.integers(len(colors))],
                'size': sizes[rng.integers(len(sizes))],
                'cell': (int(c) // GRID, int(c) % GRID)} for c in cells]
    return {'background': backgrounds[rng.integers(len(backgrounds))], 'objects': objects}


def scene_key(scene):
    """A canonical string for a scene: equal scenes, equal keys (used to keep test scenes out of train)."""
    objects = sorted((tuple(o['cell']), o['shape'], o['color'], o['size']) for o in scene['objects'])
    return repr((scene['background'], objects))


def _shape_mask(shape, size):
    """(CELL, CELL) bool: the shape with a size x size bounding box, centred in the cell."""
    # pixel centres relative to the cell centre: -7.5 ... 7.5
    v, u = np.mgrid[0:CELL, 0:CELL] + 0.5 - CELL / 2
    half = size / 2
    inside = (np.abs(u) < half) & (np.abs(v) < half)
    if shape == 'square':
        return inside
    if shape == 'circle':
        return u ** 2 + v ** 2 <= half ** 2
    if shape == 'triangle':  # apex up; rows widen by 2 px every 2 rows: 2,2,4,4,...,size,size
        row = v + half - 0.5  # 0 at the top row of the box
        return inside & (np.abs(u) < np.ceil((row + 1) / 2))
    if shape == 'plus':  # arms ~0.4 of the size wide, an even number of px so that it stays centred
        half_arm = round(0.2 * size)
        return inside & ((np.abs(u) < half_arm) | (np.abs(v) < half_arm))
    raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}')


_MASKS = {(shape, size): _shape_mask(shape, px) for shape in SHAPES for size, px in SIZES.items()}


def render(scene):
    """The scene as a (IMAGE, IMAGE, 3) uint8 RGB array, crisp pixels."""
    img = np.empty((IMAGE, IMAGE, 3), np.uint8)
    img[:] = BACKGROUNDS[scene['background']]
    for o in scene['objects']:
        r, c = o['cell']
        view = img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
        view[_MASKS[o['shape'], o['size']]] = COLORS[o['color']]
    return img

# -----------------------------------------------------------------------------
# captions


def cell_name(cell):
    r, c = cell
    return 'center' if (r, c) == (1, 1) else f'{ROWS[r]} {COLS[c]}'


def _article(word):
    return 'an' if word[0] in 'aeiou' else 'a'


def caption(scene, objects=None, attrs=ATTRS, background=True):
    """A caption naming the given objects (indices into scene['objects'], default all, in that order)
    with the given attributes (the shape is always named: it is the noun), optionally the background.

    caption(scene) is the complete caption, e.g.
    'a black background with a large red circle in the top left and a small blue plus in the center.'
    """
    objects = range(len(scene['objects'])) if objects is None else objects
    phrases = []
    for i in objects:
        o = scene['objects'][i]
        words = [o[a] for a in ('size', 'color') if a in attrs] + [o['shape']]
        phrase = f'{_article(words[0])} ' + ' '.join(words)
        if 'cell' in attrs:
            phrase += f' in the {cell_name(o["cell"])}'
        phrases.append(phrase)
    listing = phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]
    if background:
        listing = f'{_article(scene["background"])} {scene["background"]} background with {listing}'
    return listing + '.'


CAPTION_LEVELS = ('one', 'short', 'some', 'named', 'complete')  # from terse to complete


def captions(scene, rng):
    """Captions at every level of detail, like a captioner that stops early or skips attributes:
      one      a single random object, colour and shape        'a red circle.'
      short    every object, colour and shape                  'a red circle and a blue plus.'
      some     a random non-empty subset of the objects with a random subset of size / colour /
               position, background with probability 1/2
      named    every object, with a random subset of size / colour / position (the same for all
               objects) and the background with probability 1/2: 'a circle and a square.' still
               means exactly two objects. The decoder learns from it to draw what a prompt leaves
               open and nothing it does not name (the toy GenEval's prompts are such captions)
      complete every object with every attribute, and the background
    'named' draws from its own generator, seeded by the scene, so adding it left the other levels,
    and every scene drawn after them from `rng`, as they were.
    """
    n = len(scene['objects'])
    subset = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)).tolist()
    attrs = [a for a in ('size', 'color', 'cell') if rng.random() < 0.5] + ['shape']
    own = np.random.default_rng(zlib.crc32(scene_key(scene).encode()))
    named_attrs = [a for a in ('size', 'color', 'cell') if own.random() < 0.5] + ['shape']
    return {
        'one': caption(scene, [int(rng.integers(n))], ('color', 'shape'), background=False),
        'short': caption(scene, None, ('color', 'shape'), background=False),
        'some': caption(scene, subset, attrs, background=bool(rng.random() < 0.5)),
        'named': caption(scene, None, named_attrs, background=bool(own.random() < 0.5)),
        'complete': caption(scene),
    }


_CELL_WORDS = {cell_name((r, c)): (r, c) for r in range(GRID) for c in range(GRID)}
_OBJECT_RE = re.compile(
    r'\ban? (?:({})\s+)?(?:({})\s+)?({})(?:\s+in\s+the\s+({}))?\b'.format(
        '|'.join(SIZES), '|'.join(COLORS), '|'.join(SHAPES),
        '|'.join(sorted(_CELL_WORDS, key=len, reverse=True))))  # longest first: no name stops at a prefix
_BACKGROUND_RE = re.compile(r'\b({})\s+background\b'.format('|'.join(BACKGROUNDS)))


def parse_caption(text):
    """The scene a caption describes, as far as it says: unnamed attributes are None.

    Reads the phrases caption() writes ('a [size] [colour] shape [in the position]') anywhere in
    the text, so a model's caption with extra words still parses; words outside the vocabulary are
    ignored. Used to measure exactly which objects a caption mentions: score(parse_caption(c), scene).
    """
    text = text.lower()
    bg = _BACKGROUND_RE.search(text)
    objects = [{'shape': shape, 'color': color, 'size': size,
                'cell': _CELL_WORDS[cell] if cell else None}
               for size, color, shape, cell in _OBJECT_RE.findall(text)]
    for o in objects:  # findall gives '' for an unmatched group
        o['size'] = o['size'] or None
        o['color'] = o['color'] or None
    return {'background': bg.group(1) if bg else None, 'objects': objects}

# -----------------------------------------------------------------------------
# parsing images and scoring


_PALETTE_NAMES = tuple(COLORS) + tuple(BACKGROUNDS)
_PALETTE = np.array([COLORS[n] for n in COLORS] + [BACKGROUNDS[n] for n in BACKGROUNDS], np.float32)
_SHIFT = 2  # px: generated objects may sit a little off-centre
_SHIFTS = sorted(((dy, dx) for dy in range(-_SHIFT, _SHIFT + 1) for dx in range(-_SHIFT, _SHIFT + 1)),
                 key=lambda d: abs(d[0]) + abs(d[1]))  # centred first: ties go to the unshifted template


def _shifted_templates():
    """(len(_MASKS) * len(_SHIFTS), CELL*CELL) float: every template at every small shift."""
    out = []
    for mask in _MASKS.values():
        padded = np.pad(mask, _SHIFT)
        for dy, dx in _SHIFTS:
            out.append(padded[_SHIFT - dy:_SHIFT - dy + CELL, _SHIFT - dx:_SHIFT - dx + CELL].ravel())
    return np.array(out, np.float32)


_TEMPLATES = _shifted_templates()
_TEMPLATE_KEYS = [key for key in _MASKS for _ in _SHIFTS]
MIN_PIXELS = 16  # a cell with fewer pixels of its majority object colour is empty (smallest object: 60)
MIN_IOU = 0.4  # ... and so is a cell whose best template overlaps less: scattered noise, not a shape


def parse_image(img, min_pixels=MIN_PIXELS, min_iou=MIN_IOU):
    """Read the scene back from an (IMAGE, IMAGE, 3) uint8 RGB image. Exact on render()'s images,
    tolerant of noise, blur and small offsets in generated ones (see tests/test_shapes.py).

    The grid is fixed, so each cell is read on its own (no connected components: blurred
    neighbours would merge, and the cell is known anyway):
    - every pixel snaps to the nearest palette colour; the background is the most common
      background colour, a cell's colour the most common object colour in it;
    - the object mask is the pixels more than half way from the background colour to the cell's
      colour (projected on that line: a blurred edge or another colour's noise does not count);
    - shape and size are those of the template (shape x size, shifted by up to 2 px) with the best
      IoU against the mask. Size comes from the template, not from the area alone: a large
      triangle has the area of a small square.
    """
    img = np.asarray(img)
    if img.shape != (IMAGE, IMAGE, 3) or img.dtype != np.uint8:
        raise ValueError(f'parse_image expects a ({IMAGE}, {IMAGE}, 3) uint8 RGB array, got '
                         f'{img.shape} {img.dtype} (floats in [0, 1]: (x * 255).round().astype(np.uint8))')
    pixels = img.reshape(-1, 1, 3).astype(np.float32)
    nearest = ((pixels - _PALETTE) ** 2).sum(-1).argmin(-1).reshape(IMAGE, IMAGE)
    n_obj = len(COLORS)
    bg_index = n_obj + int(np.bincount(nearest.ravel(), minlength=len(_PALETTE))[n_obj:].argmax())
    bg = _PALETTE[bg_index]
    objects = []
    for r in range(GRID):
        for c in range(GRID):
            window = np.s_[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            counts = np.bincount(nearest[window].ravel(), minlength=len(_PALETTE))[:n_obj]
            k = int(counts.argmax())
            if counts[k] < min_pixels:
                continue
            direction = _PALETTE[k] - bg
            alpha = (img[window].reshape(-1, 3).astype(np.float32) - bg) @ direction / (direction @ direction)
            mask = (alpha > 0.5).astype(np.float32)
            inter = _TEMPLATES @ mask
            iou = inter / (_TEMPLATES.sum(1) + mask.sum() - inter)
            best = int(iou.argmax())
            if iou[best] < min_iou:
                continue
            shape, size = _TEMPLATE_KEYS[best]
            objects.append({'shape': shape, 'color': _PALETTE_NAMES[k], 'size': size, 'cell': (r, c)})
    return {'background': _PALETTE_NAMES[bg_index], 'objects': objects}


def _f1(tp, n_pred, n_true):
    p = tp / n_pred if n_pred else float(n_true == 0)
    r = tp / n_true if n_true else float(n_pred == 0)
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def match(pred, true):
    """One-to-one pairs (i_pred, j_true). Objects are paired by cell first (a scene has at most one
    object per cell, so this part is unambiguous); the rest (wrong cell, or no position, as in a
    caption that names none) are paired greedily by the number of agreeing attributes, ties in
    list order. Greedy rather than Hungarian: after the cell pass the leftovers are at most a few
    objects, and a deterministic rule that is easy to state matters more than an optimum."""
    P, T = pred['objects'], true['objects']
    def key(i, j):
        same_cell = _same('cell', P[i]['cell'], T[j]['cell'])
        agree = sum(_same(a, P[i][a], T[j][a]) for a in ('shape', 'color', 'size'))
        return (not same_cell, -agree, i, j)
    pairs, used_p, used_t = [], set(), set()
    for i, j in sorted(((i, j) for i in range(len(P)) for j in range(len(T))), key=lambda ij: key(*ij)):
        if i not in used_p and j not in used_t:
            pairs.append((i, j))
            used_p.add(i)
            used_t.add(j)
    return pairs


def _same(attr, x, y):
    if x is None or y is None:  # an attribute a caption does not name is never a hit
        return False
    return tuple(x) == tuple(y) if attr == 'cell' else x == y


def score(pred, true):
    """Parse-based score of a predicted scene (parse_image or parse_caption) against the truth.

    object_*: an object counts only when shape, colour, size and cell all match.
    {attr}_*: precision / recall / F1 of one attribute over the matched pairs (see match()): a pair
    counts as a hit for 'color' when both have the same colour, whatever else differs. So
    color_recall is the fraction of true objects that have a counterpart of the right colour, and
    cell_f1 measures the positions alone. background: 1.0 when right, 0.0 otherwise (or unnamed).
    Returns a flat dict of floats, easy to average over images.
    """
    P, T = pred['objects'], true['objects']
    pairs = match(pred, true)
    hits = {a: sum(_same(a, P[i][a], T[j][a]) for i, j in pairs) for a in ATTRS}
    exact = sum(all(_same(a, P[i][a], T[j][a]) for a in ATTRS) for i, j in pairs)
    out = {}
    for name, tp in [('object', exact)] + list(hits.items()):
        out[f'{name}_precision'], out[f'{name}_recall'], out[f'{name}_f1'] = _f1(tp, len(P), len(T))
    out['background'] = float(pred['background'] == true['background'])
    return out


def attribute_score(s):
    """Partial credit from a score() dict: the mean of the shape, colour, size and cell F1s and the
    background match. An object counts for object_f1 only when all four attributes are right, so with a
    decoder that gets one or two wrong every caption of a group scores 0 and GRPO learns nothing; this
    one still ranks them (the toy RL reward 'scene_attributes')."""
    return (s['shape_f1'] + s['color_f1'] + s['size_f1'] + s['cell_f1'] + s['background']) / 5


def empty_cell_residual(img, scene):
    """How far the cells the scene leaves empty are from its background: the mean over those cells and
    their pixels of the largest |difference| of an RGB channel, in [0, 1]. 0 for a rendered scene; a
    decoder that leaves faint ghost shapes in empty cells (which the parser ignores) scores above 0.
    None when the scene has no empty cell."""
    occupied = {tuple(o['cell']) for o in scene['objects']}
    bg = np.array(BACKGROUNDS[scene['background']], np.float32)
    cells = [np.asarray(img, np.float32)[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
             for r in range(GRID) for c in range(GRID) if (r, c) not in occupied]
    return _distance(cells, bg)


def _distance(pixels, bg):
    """The mean over groups of pixels (each (..., 3)) of their mean largest |difference| of an RGB channel from
    bg, in [0, 1]; None for no groups."""
    return float(np.mean([np.abs(p - bg).max(-1).mean() for p in pixels]) / 255) if pixels else None


# an object's cell minus every pixel the object covers at any of the parser's shifts (_SHIFT px): (CELL, CELL)
_AROUND = {key: ~_TEMPLATES[i * len(_SHIFTS):(i + 1) * len(_SHIFTS)].any(0).reshape(CELL, CELL)
           for i, key in enumerate(_MASKS)}


def halo_residual(img, scene):
    """How far the background around each object is from the scene's: over the occupied cells and their
    pixels more than _SHIFT (2) px from the object, the mean of the largest |difference| of an RGB channel, in
    [0, 1]. 0 for a rendered scene; a decoder that darkens or tints the square around an object (a halo,
    which the parser ignores too) scores above 0. None when no object leaves such pixels (large squares)."""
    img, bg = np.asarray(img, np.float32), np.array(BACKGROUNDS[scene['background']], np.float32)
    cells = []  # per object: (n, 3) the pixels of its cell far enough from it
    for o in scene['objects']:
        (r, c), around = o['cell'], _AROUND[o['shape'], o['size']]
        if around.any():
            cells.append(img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL][around])
    return _distance(cells, bg)


def mean_residual(residual, images, scenes):
    """residual (empty_cell_residual: the reports' ghosts; halo_residual: their halos) averaged over the
    images it is defined for."""
    values = [residual(im, s) for im, s in zip(images, scenes)]
    return float(np.mean([v for v in values if v is not None]))

# -----------------------------------------------------------------------------
# loading a split written by prepare.py


def load_split(directory):
    """(images uint8 (N, IMAGE, IMAGE, 3), records) of a split written by prepare.py. A record is
    {'scene': ..., 'captions': {level: text}}, cells as tuples. Images come from images.npy when
    present (train, val; memory-mapped, read-only), else from 0.png ... N-1.png (test)."""
    path = os.path.join(directory, 'scenes.jsonl')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: run python data/shapes/prepare.py first')
    with open(path) as f:
        records = [json.loads(line) for line in f]
    for rec in records:
        for o in rec['scene']['objects']:
            o['cell'] = tuple(o['cell'])
    npy = os.path.join(directory, 'images.npy')
    if os.path.exists(npy):
        images = np.load(npy, mmap_mode='r')  # read on demand, shared by DDP processes
    else:
        from PIL import Image
        images = np.stack([np.asarray(Image.open(os.path.join(directory, f'{i}.png')).convert('RGB'))
                           for i in range(len(records))])
    if len(images) != len(records) or images.shape[1:] != (IMAGE, IMAGE, 3):
        raise ValueError(f'{directory}: {len(records)} scenes but images of shape {images.shape}')
    return images, records

# -----------------------------------------------------------------------------
# prompts for the toy GenEval (bench.py --task geneval)

# GenEval's six categories (Ghosh et al. 2023), each a kind of 'named' caption (captions() above) without
# background: the decoder is trained on exactly this language
GENEVAL_CATEGORIES = {  # category: (the attributes a prompt names, its example)
    'single_object': (('shape',), 'a circle.'),
    'two_object': (('shape',), 'a circle and a square.'),  # two different shapes
    'counting': (('shape',), 'a circle, a circle and a circle.'),  # 2, 3 or 4 of one shape
    'colors': (('color', 'shape'), 'a red circle.'),
    'position': (('shape', 'cell'), 'a circle in the top left and a square in the bottom right.'),
    'color_attr': (('color', 'shape'), 'a red circle and a blue square.'),  # two colours, two shapes
}
GENEVAL_SEED = 20251001  # the prompts' own stream, apart from prepare.py's scenes


def geneval_prompts(per_category, seed=GENEVAL_SEED):
    """[{'category', 'index', 'prompt'}], per_category prompts of each category. Each is caption() of a
    random scene, naming only the category's attributes, so objects come in reading order of their
    (unnamed) cells, as in the training captions. Every category draws from its own generator: its
    first k prompts are the same whatever per_category or the other categories are."""
    prompts = []
    for k, (category, (attrs, _)) in enumerate(GENEVAL_CATEGORIES.items()):
        rng = np.random.default_rng([seed, k])
        for i in range(per_category):
            n = {'single_object': 1, 'colors': 1, 'counting': int(rng.integers(2, 5))}.get(category, 2)
            scene = sample_scene(rng, n, n)
            if category == 'counting':
                for o in scene['objects']:
                    o['shape'] = scene['objects'][0]['shape']
            if category in ('two_object', 'position', 'color_attr'):  # two different shapes ...
                for o, shape in zip(scene['objects'], rng.choice(SHAPES, 2, replace=False)):
                    o['shape'] = str(shape)
            if category == 'color_attr':  # ... and two different colours
                for o, color in zip(scene['objects'], rng.choice(list(COLORS), 2, replace=False)):
                    o['color'] = str(color)
            prompts.append({'category': category, 'index': i,
                            'prompt': caption(scene, None, attrs, background=False)})
    return prompts


def satisfies(scene, spec):
    """Does a scene (parse_image of a generated image) show what spec (parse_caption of its prompt) says?
    Exactly as many objects as the spec names, and a one-to-one pairing in which every attribute the
    spec names (not None) holds: 'a red circle.' fails on two red circles, 'a red circle and a blue
    square.' fails on a blue circle and a red square. The background is checked only when named.
    All pairings are tried (at most 4! = 24), so the answer does not depend on any order."""
    S, O = spec['objects'], scene['objects']
    if len(S) != len(O) or spec['background'] not in (None, scene['background']):
        return False
    return any(all(_same(a, s[a], o[a]) for s, o in zip(S, perm) for a in ATTRS if s[a] is not None)
               for perm in itertools.permutations(O))
