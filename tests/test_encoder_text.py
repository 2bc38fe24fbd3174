"""The encoder's text front end against transformers / tokenizers: tokenizer ids, chat template, image
placeholders (image preprocessing: tests/test_images.py). Run: python -m pytest -q tests/test_encoder_text.py"""
import json
import os
import random

import numpy as np
import pytest
from PIL import Image
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from images import preprocess_image
from model_encoder import CAPTION_PROMPT, NEGATIVE_PROMPT
from tokenizer import QWEN2_PATTERN, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|vision_start|>', '<|vision_end|>', '<|vision_pad|>',
           '<|image_pad|>', '<|video_pad|>']
NON_SPECIAL = ['<tool_call>', '</tool_call>']
# Qwen2-VL / Qwen2.5-VL chat template as shipped with the checkpoints (reference only, rendered by transformers)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

WORDS = ("the a red blue green circle square triangle is on left right of and with big small 123 4567 2024 naïve "
         "café über Straße 東京 日本語です 中文字符 emoji 😀 👍🏽 👨‍👩‍👧 don't I'll WE'RE You've Привет мир مرحبا नमस्ते "
         "x=y+1; f(x) {a: [1, 2]} e\u0301 ＡＢＣ ½ ① Ⅷ").split()
SPACES = [' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', ' \n ', '\u00a0', '\u2003', '\u3000', '\u200b', '\x0b', '\x0c',
          '\x85', '      ', '']


def random_text(rng, n):
    parts = []
    for _ in range(n):
        r = rng.random()
        parts.append(rng.choice(WORDS) if r < 0.6 else rng.choice(SPACES) if r < 0.85 else
                     str(rng.randint(0, 10 ** rng.randint(1, 12))) if r < 0.95 else rng.choice(SPECIAL + NON_SPECIAL))
        parts.append(rng.choice([' ', ' ', '', rng.choice(SPACES)]))
    return ''.join(parts)


def build_tokenizer(directory, vocab_size=1200, seed=0, permute_ids=False):
    """A byte-level BPE tokenizer.json in Qwen2's style (NFC, Qwen2 split regex, byte-level, Qwen's special tokens)."""
    rng = random.Random(seed)
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [random_text(rng, rng.randint(1, 20)) for _ in range(3000)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in NON_SPECIAL])
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, 'tokenizer.json')
    tok.save(path)
    if permute_ids:  # vocabulary ids unrelated to merge order: ours must still give the same ids
        with open(path) as f:
            j = json.load(f)
        vocab = j['model']['vocab']
        ids = list(vocab.values())
        rng.shuffle(ids)
        j['model']['vocab'] = dict(zip(vocab, ids))
        with open(path, 'w') as f:
            json.dump(j, f)
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
        json.dump({'pad_token': '<|endoftext|>', 'eos_token': '<|im_end|>', 'chat_template': CHAT_TEMPLATE}, f)
    return path


def varied_strings():
    rng = random.Random(1)
    strings = [random_text(rng, rng.randint(0, 30)) for _ in range(300)]
    return strings + ['', ' ', '\n', 'e\u0301', 'ﬁ', '<|im_start|><|im_end|>', '<|im_start', '   x', 'x   ',
                      '1234567890', 'WE\'LL', 'a' * 200, ' ' * 50 + 'b', '\u0000\u0001', '🧑🏿‍🚀']


@pytest.mark.parametrize('permute_ids', [False, True])
def test_tokenizer_matches_hf(tmp_path, permute_ids):
    path = build_tokenizer(str(tmp_path), permute_ids=permute_ids)
    hf, ours = HFTokenizer.from_file(path), Tokenizer.from_pretrained(str(tmp_path))
    assert ours.pad_token_id == hf.token_to_id('<|endoftext|>')
    for s in varied_strings():
        ids = ours.encode(s)
        assert ids == hf.encode(s).ids, repr(s)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), repr(s)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), repr(s)


def test_tokenizer_from_vocab_and_merges(tmp_path):
    """The older layout: vocab.json + merges.txt + added tokens in tokenizer_config.json (transformers' Qwen2Tokenizer)."""
    from transformers import AutoTokenizer
    path = build_tokenizer(str(tmp_path / 'json'))
    with open(path) as f:
        j = json.load(f)
    d = tmp_path / 'files'
    d.mkdir()
    (d / 'vocab.json').write_text(json.dumps(j['model']['vocab']))
    (d / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in j['model']['merges']) + '\n')
    (d / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'Qwen2Tokenizer', 'pad_token': '<|endoftext|>',
        'added_tokens_decoder': {str(t['id']): t for t in j['added_tokens']}}))
    ours, hf = Tokenizer.from_pretrained(str(d)), AutoTokenizer.from_pretrained(str(d))
    for s in varied_strings()[:150]:
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False), repr(s)


def test_toy_tokenizer_matches_hf():
    path = os.path.join(ROOT, 'data', 'shapes', 'tokenizer.json')
    if not os.path.exists(path):
        pytest.skip('data/shapes/tokenizer.json not built yet')
    hf, ours = HFTokenizer.from_file(path), Tokenizer.from_pretrained(os.path.dirname(path))
    for s in varied_strings() + ['a small red circle in the top left, a big blue square at the bottom right.']:
        assert ours.encode(s) == hf.encode(s).ids, repr(s)


def test_chat_template_matches_jinja(tmp_path):
    from transformers import PreTrainedTokenizerFast
    path = build_tokenizer(str(tmp_path))
    hf = PreTrainedTokenizerFast(tokenizer_file=path, chat_template=CHAT_TEMPLATE)
    ours = Tokenizer.from_pretrained(str(tmp_path))
    caption = [{'role': 'user', 'content': [{'type': 'text', 'text': CAPTION_PROMPT}, {'type': 'image', 'image': 'x.jpg'}]}]
    for text, messages in [(CAPTION_PROMPT, caption)] + [
            (t, [{'role': 'generate', 'content': [{'type': 'text', 'text': t}]}])
            for t in (NEGATIVE_PROMPT, 'a red circle', 'ünïcödé  <|im_end|> 12\n\n')]:
        role, image = messages[0]['role'], len(messages[0]['content']) == 2
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.chat_text(text, role, image) == rendered
        if not image:  # (with an image the placeholder is expanded: next test)
            assert ours.chat_ids(text, role) == hf.encode(rendered, add_special_tokens=False)


def test_caption_ids_expand_image_tokens(tmp_path):
    """Qwen2.5-VL's processor replaces <|image_pad|> in the rendered text by one per merged patch, then tokenizes."""
    from transformers import PreTrainedTokenizerFast
    path = build_tokenizer(str(tmp_path))
    hf = PreTrainedTokenizerFast(tokenizer_file=path, chat_template=CHAT_TEMPLATE)
    ours = Tokenizer.from_pretrained(str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 203, 3), dtype=np.uint8))
    _, grid = preprocess_image(image, 3136, 65536)
    n = int(grid.prod()) // 4
    messages = [{'role': 'user', 'content': [{'type': 'text', 'text': CAPTION_PROMPT}, {'type': 'image'}]}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = hf.encode(text.replace('<|image_pad|>', '<|image_pad|>' * n), add_special_tokens=False)
    assert ours.chat_ids(CAPTION_PROMPT, 'user', n) == want


def test_decode_drops_ids_without_a_token(tmp_path):
    """Qwen2.5-VL's model has ids its tokenizer lacks (151665-151935): transformers' decode drops them,
    also inside a multi-byte character, between added tokens, and at either end."""
    from transformers import AutoTokenizer
    path = build_tokenizer(str(tmp_path))
    hf, ours = HFTokenizer.from_file(path), Tokenizer.from_pretrained(str(tmp_path))
    fast = AutoTokenizer.from_pretrained(str(tmp_path))
    n = ours.vocab_size
    assert not ours.known([n, n + 7, 151665]).any() and ours.known(range(n)).all()
    rng = random.Random(0)
    for s in varied_strings()[:100] + ['東京 😀<|im_end|>é']:
        ids = ours.encode(s)
        for _ in range(3):
            ids.insert(rng.randint(0, len(ids)), rng.choice([n, n + 7, 151665]))
        for skip in (False, True):
            want = hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == want == fast.decode(ids, skip_special_tokens=skip)
            assert want == hf.decode([i for i in ids if i < n], skip_special_tokens=skip)
