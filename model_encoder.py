"""
The encoder: Qwen2.5-VL (its vision tower is model_vision.py; here the Qwen2 LLM with M-RoPE) with UAE's
projector, its chat prompts, its captioning inputs (images preprocessed by images.py) and a KV-cache
sampler that returns the log-probs RL needs.

    enc = Encoder.from_pretrained('path/to/Qwen2.5-VL-or-UAE-llm')   # + enc.load_llm_lora('llm_lora')
    batch = enc.caption_inputs([images.load_image('x.jpg')])           # UAE's captioning prompt
    out = enc.generate(**batch, max_new_tokens=512, temperature=0.7)  # tokens, logprobs, mask
    logp = enc.token_logprobs(batch, out.tokens, out.mask, 0.7)       # the same log-probs, differentiable
    ctx = enc.embed_prompt(['a red circle', NEGATIVE_PROMPT])         # (2, L, 4096) for the decoder

State-dict keys are exactly those of transformers' Qwen2_5_VLForConditionalGeneration
(`model.visual.*`, `model.language_model.*`, `lm_head.*`) plus UAE's `projector.*`, so checkpoints
load without renaming and our PEFT adapters load into transformers + peft.
"""
import glob
import itertools
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import (attention, check_state_dict, load_safetensors, load_safetensors_dir, read_json,
                    save_json, save_safetensors)
from images import CLIP_MEAN, CLIP_STD, fetch_image, preprocess_image
from lora import apply_lora, base_state_dict, lora_layers, peft_to_ours
from model_vision import MLP, RMSNorm, VisionTower, rotate_half
from tokenizer import Tokenizer

# UAE's captioning prompt (user role, text then image) and CFG negative prompt (docs/uae.md)
CAPTION_PROMPT = ('You are an expert vision-language model.  \nYour task is: Given an input image, generate a '
                  '**textual description** of the image. If there is text in the image, transcribe it inside '
                  'double quotes "".  \nNow, carefully analyze the input image and output the full description. ')
NEGATIVE_PROMPT = 'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.'
# token_logprobs makes at most this many logits at once (in fp32: 32 MB; 55 positions of Qwen's 151,936)
LOGITS_CHUNK = 2 ** 23


# config.json names: top-level, text (top-level in old files, text_config in new ones), vision_config
TEXT_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
             'num_key_value_heads', 'rms_norm_eps', 'eos_token_id')
VISION_KEYS = dict(vision_depth='depth', vision_hidden_size='hidden_size', vision_num_heads='num_heads',
                   vision_intermediate_size='intermediate_size', patch_size='patch_size', window_size='window_size',
                   temporal_patch_size='temporal_patch_size', spatial_merge_size='spatial_merge_size',
                   fullatt_block_indexes='fullatt_block_indexes', in_channels='in_channels')
TOP_KEYS = ('tie_word_embeddings', 'image_token_id', 'vision_start_token_id', 'vision_end_token_id',
            'projector_hidden_size', 'projector_out_size', 'caption_prompt', 'prompt_layer')


@dataclass
class EncoderConfig:
    """Defaults are Qwen2.5-VL-3B."""
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])  # (time, row, column) bands, sum = head_dim/2
    tie_word_embeddings: bool = True
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_intermediate_size: int = 3420
    vision_num_heads: int = 16
    vision_rope_theta: float = 10000.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int | list = 151645
    projector_hidden_size: int | None = None  # UAE: Linear(hidden, 8192) -> GELU -> Linear(8192, 4096)
    projector_out_size: int | None = None
    caption_prompt: str = CAPTION_PROMPT  # the toy world uses a short one: every prompt token costs compute
    # which LLM layer's output conditions the decoder: None = the last, after the final norm (UAE).
    # A tiny LLM trained on captions whose words are independent keeps little of them in its last layer
    # (it only keeps what predicts the next token), so the toy world may condition on an earlier one
    prompt_layer: int | None = None

    @classmethod
    def from_hf(cls, cfg, source='config.json'):
        """transformers' config.json, old (flat, rope_scaling) or new (text_config, rope_parameters) layout."""
        text, vis = cfg.get('text_config') or {}, dict(cfg.get('vision_config') or {})
        get = lambda k: text.get(k, cfg.get(k))
        if 'in_chans' in vis:  # older name
            vis['in_channels'] = vis['in_chans']
        kw = {k: get(k) for k in TEXT_KEYS if get(k) is not None}
        kw.update({k: vis[v] for k, v in VISION_KEYS.items() if v in vis})
        kw.update({k: cfg[k] for k in TOP_KEYS if cfg.get(k) is not None})
        kw['tie_word_embeddings'] = bool(cfg.get('tie_word_embeddings') or text.get('tie_word_embeddings'))
        rope = get('rope_parameters') or get('rope_scaling') or {}
        kw['rope_theta'] = rope.get('rope_theta', get('rope_theta') or 1e6)
        kw['mrope_section'] = list(rope.get('mrope_section', [16, 24, 24]))
        kw['vision_rope_theta'] = (vis.get('rope_parameters') or {}).get('rope_theta', 10000.0)
        c = cls(**kw)
        problems = [f'{name} hidden_act {act!r} (only silu)' for name, act in
                    (('text', get('hidden_act') or 'silu'), ('vision', vis.get('hidden_act', 'silu'))) if act != 'silu']
        if vis.get('out_hidden_size', c.hidden_size) != c.hidden_size:
            problems.append(f"vision out_hidden_size {vis['out_hidden_size']} != hidden_size {c.hidden_size}")
        if sum(c.mrope_section) * 2 != c.hidden_size // c.num_attention_heads:
            problems.append(f'mrope_section {c.mrope_section} does not sum to head_dim / 2')
        if problems:
            raise ValueError(f'{source}: ' + '; '.join(problems))
        return c

    def to_hf(self):
        """config.json in current transformers' layout (it loads as Qwen2_5_VLConfig; projector sizes are extra)."""
        text = dict({k: getattr(self, k) for k in TEXT_KEYS}, model_type='qwen2_5_vl_text', hidden_act='silu',
                    rope_parameters=dict(rope_type='default', rope_theta=self.rope_theta,
                                         mrope_section=list(self.mrope_section)))
        vision = dict({v: getattr(self, k) for k, v in VISION_KEYS.items()}, model_type='qwen2_5_vl_vision',
                      out_hidden_size=self.hidden_size, hidden_act='silu',
                      rope_parameters=dict(rope_type='axial', rope_theta=self.vision_rope_theta))
        return dict({k: getattr(self, k) for k in TOP_KEYS}, architectures=['Qwen2_5_VLForConditionalGeneration'],
                    model_type='qwen2_5_vl', text_config=text, vision_config=vision)


# -----------------------------------------------------------------------------
# the language model (Qwen2 with M-RoPE); the vision tower and the shared layers are model_vision.py

class KVCache:
    """Preallocated keys/values per layer, (B, Hkv, max_len, hd), allocated at the first write (in its dtype)."""
    def __init__(self, n_layers, max_len):
        self.k, self.v, self.max_len = [None] * n_layers, [None] * n_layers, max_len

    def update(self, i, k, v, pos):
        if self.k[i] is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.k[i], self.v[i] = k.new_zeros(shape), v.new_zeros(shape)
        self.k[i][:, :, pos:pos + k.shape[2]] = k
        self.v[i][:, :, pos:pos + k.shape[2]] = v
        return self.k[i][:, :, :pos + k.shape[2]], self.v[i][:, :, :pos + k.shape[2]]


class Attention(nn.Module):  # GQA with qkv bias
    def __init__(self, c, layer):
        super().__init__()
        self.layer, self.hd = layer, c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * self.hd)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.hd)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * self.hd)
        self.o_proj = nn.Linear(c.num_attention_heads * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, causal, cache, pos):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v, pos)
        if L == 1 and k.shape[1] < q.shape[1]:  # decoding: the query heads sharing a kv head become query rows
            o = attention(q.reshape(B, k.shape[1], -1, self.hd), k, v, mask=mask).reshape(B, -1, 1, self.hd)
        else:
            o = attention(q, k, v, causal=causal, mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, causal, cache, pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):  # Qwen2 with M-RoPE
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.grad_checkpointing = False

    def rotary(self, positions, dtype):
        """M-RoPE: positions (3, B, L) = (time, row, column); band i of mrope_section uses axis i % 3."""
        hd = self.c.hidden_size // self.c.num_attention_heads
        inv_freq = self.c.rope_theta ** (-torch.arange(0, hd, 2, device=positions.device).float() / hd)
        axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(self.c.mrope_section)])
        freqs = positions[axis.to(positions.device)].permute(1, 2, 0).float() * inv_freq  # (B, L, hd/2)
        emb = torch.cat([freqs, freqs], -1)[:, None]  # (B, 1, L, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x, positions, key_valid=None, cache=None, pos=0, rope=None, num_layers=None):
        """x: (B, L, D) embeddings; key_valid: (B, pos + L) bool or None (all valid); rope: precomputed
        rotary(positions). Returns the hidden states after the final norm (of the first num_layers layers
        when given)."""
        B, L, _ = x.shape
        mask, causal = None, L > 1 and pos == 0
        if key_valid is not None and not bool(key_valid.all()):
            q_pos = torch.arange(pos, pos + L, device=x.device)[:, None]
            k_pos = torch.arange(pos + L, device=x.device)
            mask = (k_pos <= q_pos) & key_valid[:, None, :pos + L]  # (B, L, K)
            # a padding query with no valid key (left padding) attends to itself: avoids NaN, output unused
            mask = (mask | (~mask.any(-1, keepdim=True) & (k_pos == q_pos)))[:, None]
            causal = False
        elif L > 1 and pos > 0:
            mask = (torch.arange(pos + L, device=x.device) <= torch.arange(pos, pos + L, device=x.device)[:, None])
            causal = False
        cos, sin = rope or self.rotary(positions, x.dtype)
        for layer in self.layers[:num_layers]:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, causal, cache, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, causal, cache, pos)
        return self.norm(x)


class Generation(NamedTuple):
    tokens: torch.Tensor    # (B, T) sampled ids; pad after a row's EOS
    logprobs: torch.Tensor  # (B, T) log_softmax(logits / temperature) at the sampled tokens; 0 where not mask
    mask: torch.Tensor      # (B, T) True for generated tokens (EOS included)


def warp_logits(logits, temperature=1.0, top_k=0, top_p=1.0, seen=None, repetition_penalty=1.0):
    """The logits (B, V) fp32 that sampling draws from, as transformers' logits processors make them and
    in their order: repetition penalty, temperature, top-k, top-p; an id cut off gets -inf.
    seen: (B, V) bool, the ids already in each row (its prompt and what was generated); with
    repetition_penalty p, a seen id's logit is divided by p if positive, multiplied by p if not
    (transformers' RepetitionPenaltyLogitsProcessor)."""
    logits = logits.float()
    if seen is not None and repetition_penalty != 1.0:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return logits


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None, seen=None,
                  repetition_penalty=1.0):
    """Next tokens (B,) drawn from warp_logits(...), and their log-probs under logits / temperature (what
    the policy gradient needs: the penalty, top-k and top-p only shape the choice, and the RL path uses
    none of them). temperature 0 means greedy with log-probs at temperature 1."""
    if temperature == 0:
        greedy, temperature = True, 1.0
    logprobs = F.log_softmax(logits.float() / temperature, -1)
    if greedy:  # as transformers' greedy search: the penalty applies, top-k / top-p cannot change the argmax
        tokens = warp_logits(logits, temperature, seen=seen, repetition_penalty=repetition_penalty).argmax(-1)
    else:
        logits = warp_logits(logits, temperature, top_k, top_p, seen, repetition_penalty)
        # inverse CDF: one uniform per row (torch.multinomial draws far more random numbers on the CPU)
        cdf = logits.softmax(-1).double().cumsum(-1)
        u = torch.rand(len(cdf), 1, generator=generator, dtype=cdf.dtype,
                       device=generator.device if generator is not None else cdf.device)  # the generator's device
        u = u.to(cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    if not bool(chosen.isfinite().all()):  # NaN probabilities would pick the last token of the vocabulary
        raise ValueError('the language model produced NaN or inf logits: check the --llm / --llm_lora weights, '
                         'or use --dtype=float32 (fp16 overflows)')
    return tokens, chosen


class Encoder(nn.Module):
    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.model = nn.Module()
        self.model.visual = VisionTower(config)
        self.model.language_model = LanguageModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        self.projector = None
        if config.projector_hidden_size:
            self.projector = nn.Sequential(nn.Linear(config.hidden_size, config.projector_hidden_size), nn.GELU(),
                                           nn.Linear(config.projector_hidden_size, config.projector_out_size))
        self.min_pixels, self.max_pixels = 3136, 65536  # UAE's; preprocessor_config.json overrides
        self.generation_config = {}  # the checkpoint's generation_config.json (see sampling_settings)
        self.tokenizer_dirs = []  # where from_pretrained looked for the tokenizer (for the error if none)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # transformers' init, N(0, 0.02) and zero biases: matters when training from scratch
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv3d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, 'bias', None) is not None:
                nn.init.zeros_(m.bias)

    def rope_positions(self, input_ids, attention_mask, image_grid_thw):
        """M-RoPE position ids (3, B, L) and each row's next text position (B,).

        Text tokens count up on all three axes; an image's tokens get (start, start + row, start + column)
        and the text after it resumes at start + max(rows, columns). Padding gets position 1 (as in the
        transformers versions UAE ran on; it only matters for the padded positions' own outputs)."""
        B, L = input_ids.shape
        m, img = self.config.spatial_merge_size, self.config.image_token_id
        pos = torch.ones(3, B, L, dtype=torch.long)
        nxt = torch.zeros(B, dtype=torch.long)
        grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
        ids_all, valid_all = input_ids.cpu(), attention_mask.cpu().bool()
        for b in range(B):
            ids, chunks, cur = ids_all[b, valid_all[b]].tolist(), [], 0
            for is_image, run in itertools.groupby(ids, key=lambda t: t == img):
                n = len(list(run))
                while is_image and n > 0:  # one run may hold several adjacent images
                    t, h, w = next(grids, (0, 0, 0))
                    h, w = h // m, w // m
                    if not 0 < t * h * w <= n:
                        raise ValueError('image tokens in input_ids do not match image_grid_thw')
                    grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing='ij')
                    chunks.append(torch.stack(grid).reshape(3, -1) + cur)
                    cur, n = cur + max(h, w), n - t * h * w
                if not is_image:
                    chunks.append(torch.arange(cur, cur + n).expand(3, n))
                    cur += n
            if chunks:
                p = torch.cat(chunks, 1)
                pos[:, b, valid_all[b]] = p
                nxt[b] = p.max() + 1
        if next(grids, None) is not None:
            raise ValueError('image_grid_thw has more images than input_ids has image tokens')
        return pos.to(input_ids.device), nxt.to(input_ids.device)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, cache=None,
                      num_layers=None):
        """Last-layer hidden states after the final RMSNorm (B, L, hidden), and each row's next position.
        num_layers: stop after that many layers (then the final norm)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        x = self.model.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self.model.visual(pixel_values, image_grid_thw)
            slots = input_ids == self.config.image_token_id
            if int(slots.sum()) != feats.shape[0]:
                raise ValueError(f'{int(slots.sum())} image tokens in input_ids, {feats.shape[0]} image features')
            x = x.masked_scatter(slots[..., None], feats.to(x.dtype))
        positions, nxt = self.rope_positions(input_ids, attention_mask, image_grid_thw)
        return self.model.language_model(x, positions, attention_mask.bool(), cache, num_layers=num_layers), nxt

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, num_logits=None,
                head=None):
        """Logits (B, L, vocab), or of the last num_logits positions only (memory: the vocabulary is large).
        head: a function of those hidden states to return instead of lm_head's logits (token_logprobs':
        it runs inside forward, where DDP and FSDP expect the weights to be used)."""
        h, _ = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw)
        h = h if num_logits is None else h[:, -num_logits:]
        return self.lm_head(h) if head is None else head(h)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, max_new_tokens=64,
                 temperature=1.0, top_k=0, top_p=1.0, greedy=False, eos_token_id=None, pad_token_id=None,
                 generator=None, suppress_tokens=None, repetition_penalty=1.0):
        """Batched sampling with a preallocated KV cache; prompts may be padded on either side. Returns a
        Generation; its log-probs are those of the sampled tokens under logits / temperature (see sample_logits).
        suppress_tokens: ids never sampled (captions: caption_suppress_tokens()). The defaults are plain
        sampling; sampling_settings() gives those of the checkpoint's generation_config.json.
        eos_token_id: default that file's, else config.json's."""
        with torch.inference_mode():  # cheaper than no_grad per op; the clones below are ordinary tensors again
            out = self._generate(input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens,
                                 temperature, top_k, top_p, greedy, eos_token_id, pad_token_id, generator,
                                 suppress_tokens, repetition_penalty)
        return Generation(*(t.clone() for t in out))

    def sampling_settings(self, top_k=None, top_p=None, repetition_penalty=None):
        """top_k, top_p, repetition_penalty for captioning: a value given wins; None takes the checkpoint's
        generation_config.json, as transformers' generate does, and transformers' default for a key the
        file lacks (top_k 50, top_p 1, penalty 1). Qwen2.5-VL's file (top_k 1, top_p 0.001, penalty 1.05)
        makes sampling greedy in effect, whatever the temperature. Without that file (the toy checkpoints)
        sampling is plain, where transformers would still cut to its default top_k 50."""
        g = self.generation_config
        default = dict(top_k=50 if g else 0, top_p=1.0, repetition_penalty=1.0)
        given = dict(top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        pick = lambda k: given[k] if given[k] is not None else g[k] if g.get(k) is not None else default[k]
        return dict(top_k=int(pick('top_k')), top_p=float(pick('top_p')),
                    repetition_penalty=float(pick('repetition_penalty')))

    def caption_suppress_tokens(self, tokenizer=None):
        """Ids a caption may not contain. Suppressed when sampling (generate) and, the same list, in the
        policy's log-probs (token_logprobs), so that both see one distribution.
        - The vision tokens: an <|image_pad|> in a caption would be taken for an image slot when the
          caption is read back.
        - Ids of the model's vocabulary that the tokenizer has no token for (Qwen2.5-VL: 151665-151935,
          padding rows of the embedding). Decoding drops them, as Hugging Face's does, so a caption with
          one would reach the decoder and the reward as text that is not the tokens the policy gradient
          credits. Suppressing them instead keeps tokens and text one-to-one; as they were never a
          training target their probability is next to nothing, and the distribution is all but
          transformers' own."""
        ids = np.arange(self.config.vocab_size)
        return self.vision_tokens() + ids[~self.get_tokenizer(tokenizer).known(ids)].tolist()

    def vision_tokens(self):
        c = self.config
        return [c.image_token_id, c.vision_start_token_id, c.vision_end_token_id]

    def get_tokenizer(self, tokenizer=None):
        """tokenizer if given, else the encoder's; a clear error if there is none."""
        tok = tokenizer or self.tokenizer
        if tok is None and self.tokenizer_dirs:
            dirs = ' or '.join(self.tokenizer_dirs)
            raise FileNotFoundError(f'no tokenizer.json or vocab.json + merges.txt in {dirs} (UAE ships its '
                                    f'tokenizer in a directory of its own, llm_model_preprocessor: give that as '
                                    f'`processor`)')
        if tok is None:
            raise ValueError('this encoder has no tokenizer: pass one')
        return tok

    def _generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens, temperature,
                  top_k, top_p, greedy, eos_token_id, pad_token_id, generator, suppress_tokens, repetition_penalty):
        B, L0 = input_ids.shape
        eos = eos_token_id if eos_token_id is not None else self.generation_config.get('eos_token_id')
        eos = eos if eos is not None else self.config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else (self.tokenizer.pad_token_id if self.tokenizer else 0)
        valid = torch.ones(B, L0 + max_new_tokens, dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None:
            valid[:, :L0] = attention_mask.bool()
        cache = KVCache(self.config.num_hidden_layers, L0 + max_new_tokens)
        h, nxt = self.hidden_states(input_ids, valid[:, :L0], pixel_values, image_grid_thw, cache)
        last = valid[:, :L0].long().cumsum(1).argmax(1)  # last real prompt token of each row
        logits = self.lm_head(h[torch.arange(B, device=h.device), last])
        tokens, logprobs, masks = [], [], []
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        key_valid = None if bool(valid.all()) else valid
        lm = self.model.language_model
        steps = torch.arange(max_new_tokens, device=input_ids.device)  # rotary of every decoding step at once
        cos, sin = lm.rotary((nxt[:, None] + steps).expand(3, B, -1), h.dtype)
        suppress = torch.as_tensor([] if suppress_tokens is None else suppress_tokens, dtype=torch.long,
                                   device=logits.device)
        seen = None
        if repetition_penalty != 1.0:  # each row's ids so far: its prompt and its tokens, not its padding, so
            # a row samples as it would alone (transformers 5 skips left padding too; 4.50 penalised it)
            V = logits.shape[-1]
            seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
            seen = seen.scatter_(1, input_ids.masked_fill(~valid[:, :L0], V), True)[:, :V]
        for step in range(max_new_tokens):
            logits[:, suppress] = -math.inf
            tok, lp = sample_logits(logits, temperature, top_k, top_p, greedy, generator, seen, repetition_penalty)
            if seen is not None:
                seen[torch.arange(B, device=tok.device), tok] = True
            tokens.append(tok.masked_fill(finished, pad))
            logprobs.append(lp.masked_fill(finished, 0.0))
            masks.append(~finished)
            finished = finished | (tok[:, None] == eos).any(1)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            rope = cos[:, :, step:step + 1], sin[:, :, step:step + 1]
            h = lm(lm.embed_tokens(tokens[-1][:, None]), None, key_valid, cache, L0 + step, rope)
            logits = self.lm_head(h[:, -1])
        return Generation(torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(masks, 1))

    # --- UAE --------------------------------------------------------------------------------------

    def prompt_hidden(self, texts, tokenizer=None):
        """Last-layer hidden states (B, L, hidden) of every token of the `generate` chat template (UAE's wiring),
        as the official code pads them: on the right with the pad token, attention mask = ids != pad."""
        tok = self.get_tokenizer(tokenizer)
        seqs = [tok.chat_ids(t, role='generate') for t in texts]
        ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        ids = ids.to(self.lm_head.weight.device)
        return self.hidden_states(ids, ids != tok.pad_token_id, num_layers=self.config.prompt_layer)[0]

    def embed_prompt(self, texts, tokenizer=None):
        """The decoder's context: projector(prompt_hidden(texts)), (B, L, projector_out_size)."""
        if self.projector is None:
            raise ValueError('this encoder has no projector (projector_hidden_size is not set)')
        return self.project(self.prompt_hidden(texts, tokenizer))

    def project(self, hidden):
        """projector(hidden) in the projector's own dtype: cold start trains it in fp32 inside a bf16 model."""
        return self.projector(hidden.to(self.projector[0].weight.dtype))

    def caption_inputs(self, images, tokenizer=None):
        """Left-padded captioning prompts (UAE's, one image each) for generate() and token_logprobs()."""
        tok, c = self.get_tokenizer(tokenizer), self.config
        pixels, grids, seqs = [], [], []
        for image in images:
            # Two resizes, as the official demo: qwen-vl-utils' fetch_image (multiples of the patch factor,
            # up to 12.8M pixels), then the processor's (up to max_pixels: 65536 for UAE). Always both, no
            # caller chooses: the second is a no-op when the first lands within [min_pixels, max_pixels],
            # and the first is then the processor's own resize (for sides of at least half a factor). So an
            # image the processor alone resizes once (a photo up to about 256x256; every toy-world image,
            # 48x48, which neither step resizes) gets exactly that; larger ones get two, as officially.
            pv, grid = preprocess_image(fetch_image(image, c.patch_size * c.spatial_merge_size), self.min_pixels,
                                        self.max_pixels, c.patch_size, c.spatial_merge_size, c.temporal_patch_size)
            pixels.append(pv)
            grids.append(grid)
            seqs.append(tok.chat_ids(c.caption_prompt, 'user', int(grid.prod()) // c.spatial_merge_size ** 2))
        L, lengths = max(map(len, seqs)), torch.tensor([len(s) for s in seqs])
        ids = torch.tensor([[tok.pad_token_id] * (L - len(s)) + s for s in seqs])
        batch = dict(input_ids=ids, attention_mask=torch.arange(L) >= (L - lengths)[:, None],
                     pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
        return {k: v.to(self.lm_head.weight.device) for k, v in batch.items()}

    def caption_tokens(self, captions, tokenizer=None):
        """Target ids of captions, each followed by <|im_end|>, right-padded: (tokens (B, T), mask (B, T))."""
        tok = self.get_tokenizer(tokenizer)
        seqs = [tok.encode(c) + [tok.added['<|im_end|>']] for c in captions]
        tokens = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s)
        mask = torch.arange(tokens.shape[1]) < torch.tensor([len(s) for s in seqs])[:, None]
        return tokens.to(self.lm_head.weight.device), mask.to(self.lm_head.weight.device)

    def token_logprobs(self, batch, tokens, mask, temperature=1.0, entropy=False, suppress_tokens=None):
        """log p(tokens | prompt batch) under logits / temperature, (B, T), 0 where mask is False: the
        policy's log-probs for GRPO (equal to generate()'s for the tokens it sampled) and the SFT likelihood.
        With entropy=True also the entropy (B, T) of each position's distribution (an RL diagnostic).
        suppress_tokens: as in generate(), so that both see the same distribution.

        The logits are 151,936 wide for Qwen: all of them at once, with their fp32 copies and gradient,
        cost ~36 B per vocabulary entry and caption token (22 GB for 8 captions of 512 tokens). So they are
        made LOGITS_CHUNK values at a time, for the masked-in tokens only, each chunk checkpointed: its
        logits are made again in the backward instead of being kept."""
        ids = torch.cat([batch['input_ids'], tokens], 1)
        attention_mask = torch.cat([batch['attention_mask'].bool(), mask.bool()], 1)
        mask = mask.bool()
        suppress = torch.as_tensor(suppress_tokens or [], dtype=torch.long, device=tokens.device)
        rows = max(1, LOGITS_CHUNK // self.config.vocab_size)

        def head(h):  # h (B, T + 1, hidden): position t predicts token t + 1
            h, targets = h[:, :-1][mask], tokens[mask]  # (N, hidden), (N,)
            parts = []
            for hc, tc in zip(h.split(rows), targets.split(rows)):  # one empty chunk when N = 0
                args = (hc, tc, temperature, suppress, entropy)
                parts.append(checkpoint(self._chunk_logprobs, *args, use_reentrant=False)
                             if torch.is_grad_enabled() else self._chunk_logprobs(*args))
            zeros = torch.zeros(mask.shape, device=h.device)
            return [zeros.masked_scatter(mask, torch.cat(p)) for p in zip(*parts)]

        out = self(ids, attention_mask, batch.get('pixel_values'), batch.get('image_grid_thw'),
                   num_logits=tokens.shape[1] + 1, head=head)
        return tuple(out) if entropy else out[0]

    def _chunk_logprobs(self, h, targets, temperature, suppress, entropy):
        """(log-probs (n,) of targets, and entropies (n,) if entropy) under lm_head(h) / temperature, h (n, hidden)."""
        logits = self.lm_head(h).float() / temperature
        if len(suppress):
            logits[:, suppress] = -math.inf
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, targets[:, None])[:, 0] - lse
        if not entropy:
            return (logp,)
        with torch.no_grad():
            p = logits.softmax(-1)
            return logp, lse - (p * logits.masked_fill(p == 0, 0.0)).sum(-1)

    # --- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def canonical_key(key):
        """Checkpoint key -> ours: strip PEFT wrapping (anywhere: UAE wraps `model`), old layout -> new."""
        key = peft_to_ours(key.replace('base_model.model.', ''))
        if key.startswith('visual.'):
            return 'model.' + key
        if key.startswith('model.') and not key.startswith(('model.visual.', 'model.language_model.')):
            return 'model.language_model.' + key[len('model.'):]
        return key

    def load_weights(self, state, source, assign=False, device=None):
        """Strictly load a full state dict (any key layout); every bad key is named. assign: the model
        takes the given tensors (cast to the dtype of the tensor each replaces, moved to `device` or to
        that tensor's device) instead of copying them into its own, so the weights are held once, not
        twice; from_pretrained builds the model on the meta device and assigns. It takes them out of
        `state` too, so that the caller holds no original of a cast tensor (the pages of a memory-mapped
        file are let go with its last tensor)."""
        state = {self.canonical_key(k): state.pop(k) if assign else state[k] for k in list(state)}
        embed = 'model.language_model.embed_tokens.weight'
        tied = self.config.tie_word_embeddings and embed in state
        if tied:
            # tied: a saved lm_head (a PyTorch state_dict keeps both names) must be the embedding itself
            if 'lm_head.weight' in state and not torch.equal(state['lm_head.weight'], state[embed]):
                raise ValueError(f'cannot load {source}: tie_word_embeddings is set but lm_head.weight differs')
            state['lm_head.weight'] = state[embed]
        own = self.state_dict()
        check_state_dict(own, state, source)  # before any cast: an integer file is refused
        if not assign:
            self.load_state_dict(state, strict=True)
            return
        for k in state:  # one tensor at a time: a cast copy replaces its original in the dict
            if not (tied and k == 'lm_head.weight'):
                state[k] = state[k].to(device or own[k].device, own[k].dtype)
        if tied:
            state['lm_head.weight'] = state[embed]
        self.load_state_dict(state, strict=True, assign=True)
        if self.config.tie_word_embeddings:  # assign wraps each name in a Parameter of its own: one again
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, directory, dtype=torch.float32, device='cpu', processor=''):
        """A Qwen2.5-VL / UAE `llm` directory. The tokenizer and preprocessor_config.json are read from
        `processor` first (UAE ships them in a directory of their own, llm_model_preprocessor), then from
        `directory`; generation_config.json from `directory`, as transformers reads it."""
        if processor and not os.path.isdir(processor):
            raise FileNotFoundError(f'processor directory {processor} does not exist')
        path = os.path.join(directory, 'config.json')
        if not os.path.exists(path):
            raise FileNotFoundError(f'no config.json in {directory}')
        config = EncoderConfig.from_hf(read_json(path), path)
        state = load_safetensors_dir(directory, 'model')
        if 'projector.0.weight' in state and 'projector.2.weight' in state:  # UAE `llm`: sizes from the weights
            config.projector_hidden_size = state['projector.0.weight'].shape[0]
            config.projector_out_size = state['projector.2.weight'].shape[0]
        with torch.device('meta'):  # no memory and no random init for weights that are loaded next
            model = cls(config).to(dtype)
        model.load_weights(state, directory, assign=True, device=device)
        model.tokenizer_dirs = [d for d in dict.fromkeys((processor, directory)) if d]
        found = lambda *names: next((os.path.join(d, n) for d in model.tokenizer_dirs for n in names
                                     if os.path.exists(os.path.join(d, n))), None)
        tok = found('tokenizer.json', 'vocab.json')
        if tok:
            model.tokenizer = Tokenizer.from_pretrained(os.path.dirname(tok))
        gen = os.path.join(directory, 'generation_config.json')
        if os.path.exists(gen):
            model.generation_config = read_json(gen)
        pre = found('preprocessor_config.json')
        if pre:
            p = read_json(pre)
            size = p.get('size') or {}
            model.min_pixels = p.get('min_pixels', size.get('shortest_edge', model.min_pixels))
            model.max_pixels = p.get('max_pixels', size.get('longest_edge', model.max_pixels))
        return model

    def load_llm_lora(self, directory, alpha=64):
        """UAE's `llm_lora`: safetensors shards of a *full* state dict with PEFT-wrapped names
        (`model.base_model.model.…base_layer / lora_A.default …`). Alpha is not stored in a state dict:
        UAE used r=32, alpha=64. LoRA goes on exactly the layers that have lora_A keys; loading is strict."""
        index = glob.glob(os.path.join(directory, '*.safetensors.index.json'))
        if index:
            state = load_safetensors_dir(directory, os.path.basename(index[0])[:-len('.safetensors.index.json')])
        else:
            files = sorted(glob.glob(os.path.join(directory, '*.safetensors')))
            if not files:
                raise FileNotFoundError(f'no .safetensors files in {directory}')
            state = {k: v for f in files for k, v in load_safetensors(f).items()}
        ours = {self.canonical_key(k): v for k, v in state.items()}
        ranks = {k[:-len('.lora_A.weight')]: v.shape[0] for k, v in ours.items() if k.endswith('.lora_A.weight')}
        if not ranks:
            raise ValueError(f'{directory} holds no lora_A weights')
        if not lora_layers(self):
            r = max(ranks.values())
            apply_lora(self, sorted(ranks), r, alpha,
                       rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r})
        self.load_weights(state, directory, assign=True)

    def save_pretrained(self, directory):
        """config.json + model.safetensors that this class and transformers both load (LoRA: lora.save_peft)."""
        os.makedirs(directory, exist_ok=True)
        state = base_state_dict(self)
        if self.config.tie_word_embeddings:
            state.pop('lm_head.weight')
        save_safetensors(state, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
        save_json(self.config.to_hf(), os.path.join(directory, 'config.json'))
        c = self.config
        save_json(dict(image_processor_type='Qwen2VLImageProcessor', min_pixels=self.min_pixels,
                       max_pixels=self.max_pixels, patch_size=c.patch_size, merge_size=c.spatial_merge_size,
                       temporal_patch_size=c.temporal_patch_size, image_mean=CLIP_MEAN, image_std=CLIP_STD),
                  os.path.join(directory, 'preprocessor_config.json'))
        if self.generation_config:  # captions sample from the same distribution after a reload
            save_json(self.generation_config, os.path.join(directory, 'generation_config.json'))
        for f in (self.tokenizer.files if self.tokenizer else []):
            if os.path.abspath(os.path.dirname(f)) != os.path.abspath(directory):
                shutil.copy(f, directory)
