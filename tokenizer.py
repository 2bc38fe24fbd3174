"""
Byte-level BPE tokenizer: Hugging Face files (tokenizer.json, or vocab.json + merges.txt) run by tiktoken.

    tok = Tokenizer.from_pretrained('path/to/Qwen2.5-VL')  # the directory holding the tokenizer files
    ids = tok.encode('a red circle')                        # exactly transformers' ids
    tok.decode(ids), tok.chat_ids('a red circle', role='generate')
"""
import os
import re
import unicodedata

import numpy as np
import tiktoken

from common import read_json

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n)
_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
BYTE_CHARS = {b: chr(b) for b in _PRINTABLE} | {b: chr(256 + n) for n, b in
                                                enumerate(b for b in range(256) if b not in _PRINTABLE)}
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


class Tokenizer:
    """Exactly the ids of the Hugging Face tokenizer for the same files.

    tiktoken merges the adjacent pair whose *merged bytes* have the lowest rank; Hugging Face merges the
    pair listed first in `merges`. So ranks come from the merge order (a token's rank = the index of the
    first merge making it; single bytes below), not from vocabulary ids, and tiktoken's ranks are mapped
    back to ids. Added/special tokens are split off first (longest match), the rest is NFC-normalised."""

    def __init__(self, vocab, merges, added, pattern, nfc, pad_token=None, files=(), source='tokenizer'):
        as_bytes = lambda token: bytes(CHAR_BYTES[ch] for ch in token)
        missing = [b for b in range(256) if BYTE_CHARS[b] not in vocab]
        if missing:
            raise ValueError(f'{source}: the vocabulary lacks {len(missing)} of the 256 byte tokens')
        ranks = {bytes([b]): b for b in range(256)}
        rank_to_id = [vocab[BYTE_CHARS[b]] for b in range(256)] + [-1] * len(merges)
        for i, (a, b) in enumerate(merges):
            if a + b not in vocab:
                raise ValueError(f'{source}: merge {a!r} {b!r} makes a token that is not in the vocabulary')
            if as_bytes(a + b) not in ranks:
                ranks[as_bytes(a + b)], rank_to_id[256 + i] = 256 + i, vocab[a + b]
        self.bpe = tiktoken.Encoding('hf-bpe', pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.rank_to_id = np.array(rank_to_id, dtype=np.int64)
        self.id_to_bytes = {i: as_bytes(token) for token, i in vocab.items()}
        self.added = {t['content']: t['id'] for t in added}
        self.id_to_added = {i: token for token, i in self.added.items()}
        self.special_ids = {t['id'] for t in added if t.get('special')}
        longest_first = sorted(self.added, key=len, reverse=True)
        self.added_re = re.compile('|'.join(map(re.escape, longest_first))) if added else None
        self.nfc, self.files = nfc, list(files)
        self.pad_token_id = self.added.get(pad_token, vocab.get(pad_token))
        self.vocab_size = max([*vocab.values(), *self.added.values()]) + 1
        self.ids = np.array(sorted({*self.id_to_bytes, *self.id_to_added}))  # every id with a token

    @classmethod
    def from_pretrained(cls, directory):
        path = lambda name: os.path.join(directory, name)
        cfg = read_json(path('tokenizer_config.json')) if os.path.exists(path('tokenizer_config.json')) else {}
        files = [path(f) for f in ('tokenizer.json', 'tokenizer_config.json') if os.path.exists(path(f))]
        if os.path.exists(path('tokenizer.json')):
            j = read_json(path('tokenizer.json'))
            model, pre, norm = j.get('model') or {}, j.get('pre_tokenizer') or {}, j.get('normalizer')
            if model.get('type') != 'BPE' or any(model.get(k) for k in (
                    'byte_fallback', 'ignore_merges', 'continuing_subword_prefix', 'end_of_word_suffix', 'dropout')):
                raise ValueError(f"{path('tokenizer.json')}: only plain byte-level BPE is supported")
            steps = pre.get('pretokenizers', [])
            if pre.get('type') == 'ByteLevel' and pre.get('use_regex', True):
                pattern = GPT2_PATTERN
            elif ([p['type'] for p in steps] == ['Split', 'ByteLevel'] and steps[0]['behavior'] == 'Isolated'
                  and not steps[0]['invert'] and not steps[1].get('use_regex', True)):
                pattern = steps[0]['pattern']['Regex']
            else:
                raise ValueError(f"{path('tokenizer.json')}: pre_tokenizer is neither Qwen2's nor GPT-2's")
            if norm not in (None, {'type': 'NFC'}):
                raise ValueError(f"{path('tokenizer.json')}: unsupported normalizer {norm} (only NFC)")
            vocab, added, nfc = model['vocab'], j.get('added_tokens', []), norm is not None
            merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
        elif os.path.exists(path('vocab.json')):  # as transformers' Qwen2Tokenizer reads these files
            vocab, nfc, pattern = read_json(path('vocab.json')), True, QWEN2_PATTERN
            with open(path('merges.txt'), encoding='utf-8') as f:
                merges = [tuple(line.split(' ')) for line in f.read().split('\n')
                          if line and not line.startswith('#version')]
            added = [dict(t, id=int(i)) for i, t in cfg.get('added_tokens_decoder', {}).items()]
            files += [path('vocab.json'), path('merges.txt')]
        else:
            raise FileNotFoundError(f'no tokenizer.json or vocab.json + merges.txt in {directory}')
        for t in added:
            if t.get('lstrip') or t.get('rstrip') or t.get('single_word'):
                raise ValueError(f"{directory}: added token {t['content']!r} uses lstrip/rstrip/single_word")
        pad = cfg.get('pad_token', '<|endoftext|>')  # Qwen2's default
        return cls(vocab, merges, added, pattern, nfc, pad.get('content') if isinstance(pad, dict) else pad,
                   files, directory)

    def encode(self, text):
        ids, start = [], 0
        for m in (self.added_re.finditer(text) if self.added_re else ()):
            ids += self._encode_ordinary(text[start:m.start()]) + [self.added[m.group()]]
            start = m.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text):
        if not text:
            return []
        text = unicodedata.normalize('NFC', text) if self.nfc else text
        return self.rank_to_id[self.bpe.encode_ordinary(text)].tolist()

    def decode(self, ids, skip_special_tokens=False):
        """ids (a list, array or tensor) -> text, as transformers decodes them: the bytes between two added
        tokens are decoded together, and an id that no token has is dropped (Qwen2.5-VL's model has 271
        more ids than its tokenizer, 151665-151935)."""
        out, buf = [], b''
        for i in (ids.tolist() if hasattr(ids, 'tolist') else ids):
            if i in self.id_to_added:
                out.append(buf.decode('utf-8', errors='replace'))
                buf = b''
                if not (skip_special_tokens and i in self.special_ids):
                    out.append(self.id_to_added[i])
            else:
                buf += self.id_to_bytes.get(i, b'')
        return ''.join(out) + buf.decode('utf-8', errors='replace')

    def known(self, ids):
        """Which of ids (a 1-D int array) the tokenizer has a token for: (n,) bool."""
        return np.isin(np.asarray(ids), self.ids)

    def chat_text(self, text, role='user', image=False):
        """Qwen2.5-VL's chat template for one message (its text, then an image) and the generation prompt."""
        vision = '<|vision_start|><|image_pad|><|vision_end|>' if image else ''
        return (f'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'
                f'<|im_start|>{role}\n{text}{vision}<|im_end|>\n<|im_start|>assistant\n')

    def chat_ids(self, text, role='user', n_image_tokens=0):
        """chat_text's ids, the image placeholder repeated n_image_tokens times (as the processor does)."""
        ids = self.encode(self.chat_text(text, role, image=n_image_tokens > 0))
        if n_image_tokens:
            i = ids.index(self.added['<|image_pad|>'])
            ids = ids[:i] + ids[i:i + 1] * n_image_tokens + ids[i + 1:]
        return ids
