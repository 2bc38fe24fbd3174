"""
Writes the toy world's splits and trains its BPE vocabulary.

    python data/shapes/prepare.py                      # everything, ~ 15 s on 2 CPU cores
    python data/shapes/prepare.py --out=/tmp/shapes --n_train=1000

Output (default data/shapes/out/, git-ignored):
    train/images.npy   uint8 (N, 48, 48, 3), 346 MB: one array, memory-mapped in a millisecond
                       (50,000 PNG files: ~7 s to decode, and 50,000 files to write and list)
    train/scenes.jsonl one line per image: {"scene": {...}, "captions": {level: text}}
    val/...            the same, for validation losses and quick scores
    test/0.png ... 99.png + scenes.jsonl: the toy Unified-Bench, laid out like the real one
Load a split with data.shapes.world.load_split(dir).

Splits draw from independent seed streams (seed, split), so changing n_train leaves val and test
untouched, and no train or val scene is identical to a test scene (nor train to val): the test set
measures reconstruction of scenes the models have never seen. Same seed, same bytes.

The BPE vocabulary (data/shapes/tokenizer.json, shipped) is trained on captions of a fixed stream of
scenes plus the chat-template and prompt texts, so it depends only on the world's vocabulary, not on
the options above. The shipped toy checkpoints index into it: if the world changes, the rewritten
file differs and the checkpoints must be retrained (prepare.py says so).
"""
import json
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run as a script: python data/shapes/prepare.py
    sys.path.insert(0, ROOT)
from common import atomic_write, configure  # noqa: E402
from data.shapes import world  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = {'train': 0, 'val': 1, 'test': 2}  # split -> id in the seed stream

# -----------------------------------------------------------------------------
# tokenizer

# Qwen2's pre-tokenizer split (transformers' Qwen2 tokenizer uses the same pattern)
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2-VL's special tokens, after the BPE vocabulary in this order
SPECIAL_TOKENS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>',
                  '<|vision_start|>', '<|vision_end|>', '<|image_pad|>')
# Text the models read besides captions (chat template roles, default system prompt, the captioning
# prompt and UAE's CFG negative prompt): in the corpus so that they cost a few tokens each
# instead of one per byte. Byte-level BPE encodes any other text too, just in more tokens.
TEMPLATE_TEXTS = (
    'system\n', 'user\n', 'assistant\n', 'generate\n', '\n', 'You are a helpful assistant.',
    'You are an expert vision-language model.  \nYour task is: Given an input image, generate a '
    '**textual description** of the image. If there is text in the image, transcribe it inside '
    'double quotes "".  \nNow, carefully analyze the input image and output the full description. ',
    'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.',
)
TOKENIZER_SEED = 20250911  # the corpus stream: fixed, independent of --seed
TOKENIZER_SCENES = 5000
# the levels the vocabulary was trained on; 'named' came later, uses the same words, and is left out so
# that the shipped vocabulary (and every checkpoint indexing into it) stays as it was
TOKENIZER_LEVELS = ('one', 'short', 'some', 'complete')
MAX_VOCAB = 1024  # a cap: training stops earlier, once every word of the corpus is one token


def train_tokenizer():
    """A byte-level BPE in Qwen2's layout, as a tokenizers.Tokenizer. Deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers
    rng = np.random.default_rng(TOKENIZER_SEED)
    corpus = []
    for _ in range(TOKENIZER_SCENES):
        texts = world.captions(world.sample_scene(rng), rng)
        corpus += [texts[level] for level in TOKENIZER_LEVELS]
    corpus += list(TEMPLATE_TEXTS) * TOKENIZER_SCENES  # as often as they occur in training
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix='', end_of_word_suffix='',
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=MAX_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_tokenizer(path):
    tok = train_tokenizer()
    text = tok.to_str(pretty=True)
    old = open(path).read() if os.path.exists(path) else None

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    if old == text:
        print(f'tokenizer: {path} unchanged ({tok.get_vocab_size()} tokens)')
        return tok
    atomic_write(path, write)
    if old is None:
        print(f'tokenizer: wrote {path} ({tok.get_vocab_size()} tokens)')
    else:
        print(f'tokenizer: {path} CHANGED ({tok.get_vocab_size()} tokens): the world vocabulary changed, '
              'checkpoints trained with the old file no longer match it')
    return tok

# -----------------------------------------------------------------------------
# splits


def make_split(n, seed, split, exclude=()):
    """n records {'scene', 'captions'} and their images, none whose scene key is in exclude."""
    rng = np.random.default_rng([seed, SPLITS[split]])
    exclude = set(exclude)
    records, images, rejected = [], np.empty((n, world.IMAGE, world.IMAGE, 3), np.uint8), 0
    while len(records) < n:
        scene = world.sample_scene(rng)
        if world.scene_key(scene) in exclude:
            rejected += 1
            continue
        images[len(records)] = world.render(scene)
        records.append({'scene': scene, 'captions': world.captions(scene, rng)})
    return records, images, rejected


def write_split(directory, records, images, pngs):
    os.makedirs(directory, exist_ok=True)

    def write_jsonl(tmp):
        with open(tmp, 'w') as f:
            for rec in records:
                f.write(json.dumps(rec) + '\n')
    atomic_write(os.path.join(directory, 'scenes.jsonl'), write_jsonl)
    if pngs:
        for i, img in enumerate(images):
            atomic_write(os.path.join(directory, f'{i}.png'), lambda tmp: Image.fromarray(img).save(tmp, 'PNG'))
    else:
        def write_npy(tmp):
            with open(tmp, 'wb') as f:  # a file object: np.save would append .npy to a path
                np.save(f, images)
        atomic_write(os.path.join(directory, 'images.npy'), write_npy)


def main(argv=None):
    config = dict(
        out=os.path.join(HERE, 'out'),
        seed=1337,
        n_train=50_000,
        n_val=1_000,
        n_test=100,
        tokenizer=os.path.join(HERE, 'tokenizer.json'),  # '' to skip
    )
    configure(config, argv)
    t0 = time.time()
    seen = set()
    # test first, so that val and train can leave its scenes out
    for split in ('test', 'val', 'train'):
        t = time.time()
        records, images, rejected = make_split(config[f'n_{split}'], config['seed'], split, seen)
        seen |= {world.scene_key(r['scene']) for r in records}
        directory = os.path.join(config['out'], split)
        write_split(directory, records, images, pngs=(split == 'test'))
        counts = np.bincount([len(r['scene']['objects']) for r in records], minlength=5)[1:]
        print(f'{split}: {len(records)} scenes ({rejected} resampled: seen in an earlier split), '
              f'objects 1-4: {counts.tolist()}, -> {directory} in {time.time() - t:.1f}s')
    if config['tokenizer']:
        t = time.time()
        tok = write_tokenizer(config['tokenizer'])
        lengths = {level: [] for level in world.CAPTION_LEVELS}
        for rec in records[:5000]:  # train captions
            for level, text in rec['captions'].items():
                lengths[level].append(len(tok.encode(text).ids))
        print(f'tokenizer: {time.time() - t:.1f}s; caption tokens (mean / max): ' +
              ', '.join(f'{k} {np.mean(v):.1f} / {max(v)}' for k, v in lengths.items()))
    print(f'done in {time.time() - t0:.1f}s')


if __name__ == '__main__':
    main()
