"""
The image embedders that score a reconstruction against its original: Unified-Bench (bench.py) and the
RL reward use this one file, so a bench number and a reward mean the same thing.

    emb = load_embedder('dinov2', '/ckpt/dinov2-large', device=device, dtype='bfloat16')
    a, b = emb.embed(originals), emb.embed(reconstructions)   # (N, D) float32, one row per PIL image
    scores = emb.similarity(a, b)                               # (N,) row-wise; a may be (1, D) vs (N, D)

Embedders (all towers are the one VisionTransformer below, loaded strictly from the user's local files):
  clip      CLIP ViT (HF CLIPVisionModelWithProjection or full CLIPModel dir): post-layernorm CLS through
            visual_projection, i.e. transformers' get_image_features. Similarity = cosine.
  dinov2    DINOv2 (HF Dinov2Model dir): CLS of last_hidden_state (after the final layernorm).
  dinov3    DINOv3 ViT (HF DINOv3ViTModel dir): CLS of last_hidden_state; RoPE, register tokens.
  longclip  LongCLIP-L (an OpenAI-CLIP-format .pt state dict): its ViT-L/14 vision tower, projected.
  pixel     no weights: 1 - mean |a - b| of the RGB images resized to 64x64, in [0, 1]. It sees colour
            and layout only, which is what the toy world's flat coloured shapes are made of.
The neural features are L2-normalised; the pixel features are the raw [0, 1] pixels.

Preprocessing reproduces what the official scripts get from the processors' defaults, overridden by
the checkpoint's preprocessor_config.json when there is one (PIL and torch only, no torchvision):
  clip      CLIPImageProcessor: shortest edge 224 (bicubic, on the 8-bit image), centre crop 224,
            rescale 1/255, CLIP mean/std
  dinov2    BitImageProcessor as configured by facebook/dinov2-*: shortest edge 256, crop 224, ImageNet
  dinov3    DINOv3ViTImageProcessor (a torchvision-only processor in transformers 5.23): rescale 1/255
            first, then resize to exactly 224x224 with antialiased bilinear on the float image, which
            is torch's interpolate(antialias=True) that torchvision calls; no crop; ImageNet mean/std
  longclip  LongCLIP's own transform (OpenAI's): shortest edge 224 bicubic, centre crop whose offset
            is rounded rather than floored (torchvision's CenterCrop), CLIP mean/std
"""
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common import attention, check_state_dict, load_safetensors_dir, read_json
from images import CLIP_MEAN, CLIP_STD, to_rgb

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# preprocessing: PIL image -> (3, H, W) float32


@dataclass
class Preprocess:
    size: object  # int: resize the shortest edge to it; (h, w): resize to exactly that; None: no resize
    crop: tuple  # (h, w) centre crop, or None
    resample: int  # PIL resampling code: 2 bilinear, 3 bicubic
    mean: tuple
    std: tuple
    rescale: float = 1 / 255
    float_resize: bool = False  # rescale, then resize the float image (torchvision processors)
    round_crop: bool = False  # crop offset round((H - h) / 2) as torchvision's CenterCrop, not floor


def resized_size(height, width, size):
    """(h, w) after resizing: an int resizes the shortest edge, truncating the long one like transformers."""
    if not isinstance(size, int):
        return tuple(size)
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop(x, height, width, round_offset=False):
    """Centre crop of (C, H, W); parts outside the image are zero (as transformers pads)."""
    H, W = x.shape[-2:]
    top = round((H - height) / 2) if round_offset else (H - height) // 2
    left = round((W - width) / 2) if round_offset else (W - width) // 2
    if top >= 0 and left >= 0 and top + height <= H and left + width <= W:
        return x[:, top:top + height, left:left + width]
    out = x.new_zeros(x.shape[0], height, width)
    y0, y1, x0, x1 = max(top, 0), min(top + height, H), max(left, 0), min(left + width, W)
    out[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[:, y0:y1, x0:x1]
    return out


def preprocess(image, p):
    """One image -> (3, H, W) float32 model input."""
    image = to_rgb(image)
    if p.float_resize:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1) * p.rescale  # uint8 * float -> float32
        if p.size is not None:
            mode = {2: 'bilinear', 3: 'bicubic'}.get(p.resample)
            if mode is None:
                raise ValueError(f"float resize supports bilinear (2) or bicubic (3) resampling, not {p.resample}")
            size = resized_size(x.shape[1], x.shape[2], p.size)
            x = F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=True)[0]
    else:
        if p.size is not None:
            h, w = resized_size(image.height, image.width, p.size)
            image = image.resize((w, h), resample=p.resample)
        # float64 then float32, the exact arithmetic of transformers' PIL-backend rescale
        x = torch.from_numpy((np.asarray(image, dtype=np.float64) * p.rescale).astype(np.float32)).permute(2, 0, 1)
    if p.crop is not None:
        x = center_crop(x, *p.crop, round_offset=p.round_crop)
    mean = torch.tensor(p.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(p.std, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std).contiguous()


def _size_from_config(value, square, path):
    if isinstance(value, int):
        return (value, value) if square else value
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
        if set(value) == {'shortest_edge'}:
            return value['shortest_edge']
        if set(value) == {'height', 'width'}:
            return value['height'], value['width']
    raise ValueError(f"{path}: unsupported size {value!r}; expected an int, "
                     "{'shortest_edge': n} or {'height': h, 'width': w}")


def read_preprocess(directory, processor, without_config, square):
    """directory/preprocessor_config.json read as transformers reads it: its values over the processor
    class's defaults (`processor`); `without_config` when there is no such file. `square` says how a
    bare int size reads (the processor's default_to_square)."""
    path = os.path.join(directory, 'preprocessor_config.json')
    if not os.path.exists(path):
        return without_config
    cfg = {k: v for k, v in read_json(path).items() if v is not None}  # null = the processor's default
    square = cfg.get('default_to_square', square)
    p = Preprocess(**vars(processor))
    if cfg.get('do_resize') is False:
        p.size = None
    elif 'size' in cfg:
        p.size = _size_from_config(cfg['size'], square, path)
    if cfg.get('do_center_crop') is False:
        p.crop = None
    elif 'crop_size' in cfg and (p.crop is not None or cfg.get('do_center_crop')):
        p.crop = _size_from_config(cfg['crop_size'], True, path)
    p.resample = cfg.get('resample', p.resample)
    p.rescale = 1.0 if cfg.get('do_rescale') is False else cfg.get('rescale_factor', p.rescale)
    if cfg.get('do_normalize') is False:
        p.mean, p.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        p.mean, p.std = tuple(cfg.get('image_mean', p.mean)), tuple(cfg.get('image_std', p.std))
    return p


# -----------------------------------------------------------------------------
# the vision transformer behind every embedder

ACTIVATIONS = {
    'gelu': F.gelu,
    'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's approximation
    'silu': F.silu,
}


def rope_2d(grid_h, grid_w, head_dim, theta, device):
    """DINOv3's 2D RoPE tables for the patch tokens: cos, sin (grid_h * grid_w, head_dim), fp32.

    Patch centres sit in [-1, 1] whatever the grid size (so any resolution reuses the same angles);
    a quarter of the head's frequencies go to y and a quarter to x, and the pair is repeated so that
    rotate-half pairs channel j with j + head_dim / 2.
    """
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
    ys = (torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5) / grid_h * 2 - 1
    xs = (torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5) / grid_w * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1).reshape(-1, 2)  # (P, 2) as (y, x)
    angles = 2 * math.pi * coords[:, :, None] * inv_freq  # (P, 2, head_dim / 4)
    angles = angles.flatten(1).repeat(1, 2)  # (P, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the last P tokens of x (B, H, N, hd); the first N - P (CLS, registers) have no position."""
    prefix, patches = x[:, :, :-cos.shape[0]], x[:, :, -cos.shape[0]:]
    x1, x2 = patches.chunk(2, dim=-1)
    rotated = patches * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)
    return torch.cat([prefix, rotated], dim=2)


class Attention(nn.Module):
    def __init__(self, dim, heads, q_bias=True, k_bias=True, v_bias=True, o_bias=True):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=q_bias)
        self.k = nn.Linear(dim, dim, bias=k_bias)
        self.v = nn.Linear(dim, dim, bias=v_bias)
        self.o = nn.Linear(dim, dim, bias=o_bias)

    def forward(self, x, rope=None):
        B, N, D = x.shape
        q, k, v = (lin(x).view(B, N, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o(attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act, gated=False, bias=True):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        h = self.act(self.gate(x)) * self.fc1(x) if self.gate is not None else self.act(self.fc1(x))
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm transformer block; DINO scales each branch by a learned per-channel layer scale."""

    def __init__(self, dim, heads, mlp_dim, act, eps, layer_scale, gated_mlp, qkvo_bias, mlp_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, *qkvo_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act, gated_mlp, mlp_bias)
        self.ls1 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(dim)) if layer_scale else None

    def forward(self, x, rope=None):
        h = self.attn(self.norm1(x), rope)
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (h * self.ls2 if self.ls2 is not None else h)


class VisionTransformer(nn.Module):
    """Pixels (B, 3, H, W) -> the final-normed CLS token (B, dim), projected to (B, out_dim) if asked.

    The four towers differ only in options:
      CLIP, LongCLIP  positions='fixed' (a learned table for one grid), norm_pre, quick_gelu, out_dim
      DINOv2          positions='interpolate' (the learned table bicubic-resized to the input grid),
                      layer_scale
      DINOv3          positions='rope', registers, layer_scale, no bias on k
    """

    def __init__(self, dim, depth, heads, mlp_dim, patch, positions, num_positions=None, act='gelu',
                 eps=1e-6, norm_pre=False, layer_scale=False, registers=None, gated_mlp=False,
                 qkvo_bias=(True, True, True, True), mlp_bias=True, patch_bias=True, out_dim=None,
                 rope_theta=100.0):
        super().__init__()
        assert positions in ('fixed', 'interpolate', 'rope')
        self.positions, self.heads, self.rope_theta = positions, heads, rope_theta
        self.out_dim = out_dim or dim
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, dim)) if positions != 'rope' else None
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers is not None else None
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if norm_pre else None
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, act, eps, layer_scale, gated_mlp, qkvo_bias, mlp_bias)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, out_dim, bias=False) if out_dim else None

    def position_table(self, grid_h, grid_w):
        """(1, 1 + grid_h * grid_w, dim) learned positions for this grid (CLS first)."""
        n = math.isqrt(self.pos_embed.shape[1] - 1)
        if (grid_h, grid_w) == (n, n):
            return self.pos_embed
        if self.positions == 'fixed':
            raise ValueError(f"a {grid_h}x{grid_w} patch grid does not fit this model's {n}x{n} position table")
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()  # bicubic in fp32, as DINOv2
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode='bicubic', align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixels):
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (B, dim, gh, gw)
        B, _, gh, gw = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        if self.pos_embed is not None:
            x = x + self.position_table(gh, gw)
        if self.register_tokens is not None:  # registers go between CLS and patches and get no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        rope = None
        if self.positions == 'rope':
            rope = rope_2d(gh, gw, x.shape[-1] // self.heads, self.rope_theta, x.device)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x, rope)
        x = self.norm(x[:, 0])  # LayerNorm is per token: norming the CLS alone = CLS of the normed sequence
        return self.proj(x) if self.proj is not None else x


# -----------------------------------------------------------------------------
# checkpoint formats -> VisionTransformer, strictly; errors name the checkpoint's own keys


def _renamer(top, layer_prefix, block):
    """Our parameter name -> the checkpoint's, from {our module path: checkpoint module path} tables."""
    def rename(key):
        m = re.fullmatch(r'blocks\.(\d+)\.(.+)', key)
        prefix, table, rest = (layer_prefix.format(m[1]), block, m[2]) if m else ('', top, key)
        if rest in table:
            return prefix + table[rest]
        module, leaf = rest.rsplit('.', 1)
        return f'{prefix}{table[module]}.{leaf}'
    return rename


def _load_renamed(model, state, rename, source):
    ours = model.state_dict()
    names = {rename(k): k for k in ours}
    check_state_dict({theirs: ours[k] for theirs, k in names.items()}, state, source)
    model.load_state_dict({k: state[theirs] for theirs, k in names.items()}, strict=True)


def _hf_dir(path, model_types):
    """config.json and the safetensors state dict of a Hugging Face model directory, checked."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    config_path = os.path.join(path, 'config.json')
    config = read_json(config_path)
    if config.get('model_type') not in model_types:
        raise ValueError(f"{config_path}: model_type {config.get('model_type')!r}, expected {' or '.join(model_types)}")
    try:
        state = load_safetensors_dir(path, 'model')
    except FileNotFoundError as e:
        hint = ' (only safetensors are read: convert pytorch_model.bin)' if os.path.exists(
            os.path.join(path, 'pytorch_model.bin')) else ''
        raise FileNotFoundError(f'{e}{hint}') from None
    return config, state


def _patch_size(value, path):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{path}: only square patches are supported, got patch_size {value}")
        value = value[0]
    return value


CLIP_NAMES = _renamer(
    top={'patch_embed': 'vision_model.embeddings.patch_embedding',
         'cls_token': 'vision_model.embeddings.class_embedding',
         'pos_embed': 'vision_model.embeddings.position_embedding.weight', 'norm_pre': 'vision_model.pre_layrnorm',
         'norm': 'vision_model.post_layernorm', 'proj': 'visual_projection'},
    layer_prefix='vision_model.encoder.layers.{}.',
    block={'norm1': 'layer_norm1', 'attn.q': 'self_attn.q_proj', 'attn.k': 'self_attn.k_proj',
           'attn.v': 'self_attn.v_proj', 'attn.o': 'self_attn.out_proj', 'norm2': 'layer_norm2',
           'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'})


def load_clip(path):
    """HF CLIPVisionModelWithProjection or CLIPModel directory -> (model, preprocess)."""
    config, state = _hf_dir(path, ('clip_vision_model', 'clip'))
    vc = (config.get('vision_config') or {}) if config['model_type'] == 'clip' else config
    dim, patch = vc.get('hidden_size', 768), _patch_size(vc.get('patch_size', 32), path)
    image_size = vc.get('image_size', 224)
    model = VisionTransformer(
        dim, vc.get('num_hidden_layers', 12), vc.get('num_attention_heads', 12), vc.get('intermediate_size', 3072),
        patch, 'fixed', num_positions=(image_size // patch) ** 2 + 1, act=vc.get('hidden_act', 'quick_gelu'),
        eps=vc.get('layer_norm_eps', 1e-5), norm_pre=True, patch_bias=False, out_dim=config.get('projection_dim', 512))
    # a full CLIPModel also holds the text tower; old checkpoints store the position_ids buffers
    state = {k: v for k, v in state.items() if not (k.startswith('text_model.') or k.endswith('.position_ids')
                                                    or k in ('text_projection.weight', 'logit_scale'))}
    # CLIP keeps CLS as (dim,) and positions as an Embedding (n, dim); ours are (1, 1, dim), (1, n, dim)
    for key, shape in (('vision_model.embeddings.class_embedding', (1, 1, -1)),
                       ('vision_model.embeddings.position_embedding.weight', (1, -1, dim))):
        if key in state and state[key].numel() % dim == 0:
            state[key] = state[key].reshape(shape)
    _load_renamed(model, state, CLIP_NAMES, path)
    processor = Preprocess(224, (224, 224), Image.BICUBIC, CLIP_MEAN, CLIP_STD)  # CLIPImageProcessor
    without_config = Preprocess(image_size, (image_size, image_size), Image.BICUBIC, CLIP_MEAN, CLIP_STD)
    return model, read_preprocess(path, processor, without_config, square=False)


DINOV2_NAMES = _renamer(
    top={'patch_embed': 'embeddings.patch_embeddings.projection', 'cls_token': 'embeddings.cls_token',
         'pos_embed': 'embeddings.position_embeddings', 'norm': 'layernorm'},
    layer_prefix='encoder.layer.{}.',
    block={'norm1': 'norm1', 'attn.q': 'attention.attention.query', 'attn.k': 'attention.attention.key',
           'attn.v': 'attention.attention.value', 'attn.o': 'attention.output.dense', 'ls1': 'layer_scale1.lambda1',
           'norm2': 'norm2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2', 'ls2': 'layer_scale2.lambda1'})


def load_dinov2(path):
    """HF Dinov2Model directory -> (model, preprocess)."""
    config, state = _hf_dir(path, ('dinov2',))
    if config.get('use_swiglu_ffn'):
        raise ValueError(f"{path}: SwiGLU DINOv2 (giant) is not supported; use a ViT-S/B/L checkpoint")
    dim, patch = config.get('hidden_size', 768), _patch_size(config.get('patch_size', 14), path)
    qkv_bias = config.get('qkv_bias', True)
    model = VisionTransformer(
        dim, config.get('num_hidden_layers', 12), config.get('num_attention_heads', 12),
        int(dim * config.get('mlp_ratio', 4)), patch, 'interpolate',
        num_positions=(config.get('image_size', 224) // patch) ** 2 + 1, act=config.get('hidden_act', 'gelu'),
        eps=config.get('layer_norm_eps', 1e-6), layer_scale=True, qkvo_bias=(qkv_bias, qkv_bias, qkv_bias, True))
    state = {k: v for k, v in state.items() if k != 'embeddings.mask_token'}  # masked pretraining only
    _load_renamed(model, state, DINOV2_NAMES, path)
    processor = Preprocess(224, (224, 224), Image.BICUBIC, CLIP_MEAN, CLIP_STD)  # BitImageProcessor's own
    without_config = Preprocess(256, (224, 224), Image.BICUBIC, IMAGENET_MEAN, IMAGENET_STD)  # facebook/dinov2-*'s
    return model, read_preprocess(path, processor, without_config, square=False)


DINOV3_NAMES = _renamer(
    top={'patch_embed': 'embeddings.patch_embeddings', 'cls_token': 'embeddings.cls_token',
         'register_tokens': 'embeddings.register_tokens', 'norm': 'norm'},
    layer_prefix='layer.{}.',
    block={'norm1': 'norm1', 'attn.q': 'attention.q_proj', 'attn.k': 'attention.k_proj', 'attn.v': 'attention.v_proj',
           'attn.o': 'attention.o_proj', 'ls1': 'layer_scale1.lambda1', 'norm2': 'norm2', 'mlp.gate': 'mlp.gate_proj',
           'mlp.fc1': 'mlp.up_proj', 'mlp.fc2': 'mlp.down_proj', 'ls2': 'layer_scale2.lambda1'})


def load_dinov3(path):
    """HF DINOv3ViTModel directory (as save_pretrained writes it and the hub holds it) -> (model, preprocess)."""
    config, state = _hf_dir(path, ('dinov3_vit',))
    get = lambda key, default: config.get(key, default)  # noqa: E731  (defaults of DINOv3ViTConfig)
    model = VisionTransformer(
        get('hidden_size', 384), get('num_hidden_layers', 12), get('num_attention_heads', 6),
        get('intermediate_size', 1536), _patch_size(get('patch_size', 16), path), 'rope', act=get('hidden_act', 'gelu'),
        eps=get('layer_norm_eps', 1e-5), layer_scale=True, registers=get('num_register_tokens', 0),
        gated_mlp=get('use_gated_mlp', False), mlp_bias=get('mlp_bias', True), rope_theta=get('rope_theta', 100.0),
        qkvo_bias=(get('query_bias', True), get('key_bias', False), get('value_bias', True), get('proj_bias', True)))
    state = {k: v for k, v in state.items() if k != 'embeddings.mask_token'}  # masked pretraining only
    _load_renamed(model, state, DINOV3_NAMES, path)
    processor = Preprocess((224, 224), None, Image.BILINEAR, IMAGENET_MEAN, IMAGENET_STD, float_resize=True)
    return model, read_preprocess(path, processor, processor, square=True)  # the hub's file = the defaults


def openai_visual_shapes(width, layers, patch, grid, mlp_dim, embed_dim):
    """Every key and shape of an OpenAI-CLIP ViT vision tower (without the 'visual.' prefix)."""
    shapes = {'conv1.weight': (width, 3, patch, patch), 'class_embedding': (width,),
              'positional_embedding': (grid * grid + 1, width), 'ln_pre.weight': (width,), 'ln_pre.bias': (width,),
              'ln_post.weight': (width,), 'ln_post.bias': (width,), 'proj': (width, embed_dim)}
    for i in range(layers):
        shapes.update({f'transformer.resblocks.{i}.{k}': s for k, s in {
            'attn.in_proj_weight': (3 * width, width), 'attn.in_proj_bias': (3 * width,),
            'attn.out_proj.weight': (width, width), 'attn.out_proj.bias': (width,),
            'ln_1.weight': (width,), 'ln_1.bias': (width,), 'ln_2.weight': (width,), 'ln_2.bias': (width,),
            'mlp.c_fc.weight': (mlp_dim, width), 'mlp.c_fc.bias': (mlp_dim,),
            'mlp.c_proj.weight': (width, mlp_dim), 'mlp.c_proj.bias': (width,)}.items()})
    return shapes


def load_longclip(path):
    """LongCLIP-L .pt (OpenAI CLIP format, read with weights_only=True) -> its vision tower, preprocess.

    Keys outside 'visual.' are the text tower (LongCLIP's differs from CLIP's) and are not read; every
    'visual.' key is checked. Sizes come from the shapes; heads = width / 64 as in OpenAI's code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LongCLIP checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True) (a pickled model object is "
                         f"refused; save its state_dict): {type(e).__name__}: {str(e)[:300]}") from None
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected an OpenAI-CLIP-format state dict")
    visual = {k[len('visual.'):]: v for k, v in obj.items() if isinstance(k, str) and k.startswith('visual.')}
    if not visual:
        raise ValueError(f"{path} has no 'visual.*' keys: not an OpenAI-CLIP-format state dict")
    bad = [k for k, v in visual.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor values under visual.: {bad[:5]}")
    for key in ('conv1.weight', 'positional_embedding', 'proj', 'transformer.resblocks.0.mlp.c_fc.weight'):
        if key not in visual:
            raise ValueError(f"cannot load {path}: missing keys: visual.{key}")
    width, _, patch, _ = visual['conv1.weight'].shape
    grid = math.isqrt(visual['positional_embedding'].shape[0] - 1)
    layers = len({k.split('.')[2] for k in visual if k.startswith('transformer.resblocks.')})
    mlp_dim, embed_dim = visual['transformer.resblocks.0.mlp.c_fc.weight'].shape[0], visual['proj'].shape[-1]
    expected = openai_visual_shapes(width, layers, patch, grid, mlp_dim, embed_dim)
    prefixed = lambda d: {f'visual.{k}': v for k, v in d.items()}  # noqa: E731  (errors name the file's keys)
    check_state_dict(prefixed(expected), prefixed(visual), path)
    if width % 64:
        raise ValueError(f"{path}: vision width {width} is not a multiple of 64 (OpenAI CLIP's head size)")

    model = VisionTransformer(width, layers, width // 64, mlp_dim, patch, 'fixed', num_positions=grid * grid + 1,
                              act='quick_gelu', eps=1e-5, norm_pre=True, patch_bias=False, out_dim=embed_dim)
    ours = {'patch_embed.weight': visual['conv1.weight'], 'cls_token': visual['class_embedding'].reshape(1, 1, -1),
            'pos_embed': visual['positional_embedding'][None], 'proj.weight': visual['proj'].t()}
    for a, b in (('norm_pre', 'ln_pre'), ('norm', 'ln_post')):
        ours.update({f'{a}.weight': visual[f'{b}.weight'], f'{a}.bias': visual[f'{b}.bias']})
    for i in range(layers):
        src = {k[len(f'transformer.resblocks.{i}.'):]: v for k, v in visual.items()
               if k.startswith(f'transformer.resblocks.{i}.')}
        for name, t in zip('qkv', src['attn.in_proj_weight'].chunk(3)):  # in_proj = [q; k; v] rows
            ours[f'blocks.{i}.attn.{name}.weight'] = t
        for name, t in zip('qkv', src['attn.in_proj_bias'].chunk(3)):
            ours[f'blocks.{i}.attn.{name}.bias'] = t
        for a, b in (('attn.o', 'attn.out_proj'), ('norm1', 'ln_1'), ('norm2', 'ln_2'),
                     ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj')):
            ours[f'blocks.{i}.{a}.weight'], ours[f'blocks.{i}.{a}.bias'] = src[f'{b}.weight'], src[f'{b}.bias']
    model.load_state_dict(ours, strict=True)
    size = grid * patch
    return model, Preprocess(size, (size, size), Image.BICUBIC, CLIP_MEAN, CLIP_STD, round_crop=True)


# -----------------------------------------------------------------------------
# the embedders


def cosine(a, b):
    """Row-wise cosine similarity of (N, D) and (N, D) (or (1, D)) features -> (N,)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


class Embedder:
    """A frozen vision tower with its preprocessing."""

    def __init__(self, name, model, preprocess, device='cpu', dtype=torch.float32):
        self.name, self.preprocess, self.device, self.dtype = name, preprocess, torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, images, batch_size=16):
        """List of PIL images (or uint8 (H, W, 3) arrays) -> (N, D) float32, L2-normalised rows."""
        feats = []
        for i in range(0, len(images), batch_size):
            pixels = [preprocess(img, self.preprocess) for img in images[i:i + batch_size]]
            # a config without a centre crop can leave images of different sizes: run those one by one
            groups = [torch.stack(pixels)] if len({p.shape for p in pixels}) == 1 else [p[None] for p in pixels]
            for x in groups:
                feats.append(F.normalize(self.model(x.to(self.device, self.dtype)).float(), dim=-1))
        return torch.cat(feats) if feats else torch.zeros(0, self.model.out_dim, device=self.device)

    def similarity(self, a, b):
        return cosine(a, b)


class PixelEmbedder:
    """No weights: images resized to size x size (PIL bilinear, antialiased when shrinking), RGB in [0, 1].
    similarity = 1 - mean |a - b|: 1 for identical images, lower the more colours differ."""

    def __init__(self, size=64, device='cpu'):
        self.name, self.size, self.device = 'pixel', size, torch.device(device)

    def embed(self, images):
        if not images:
            return torch.zeros(0, 3 * self.size * self.size, device=self.device)
        arrays = [np.asarray(to_rgb(img).resize((self.size, self.size), Image.BILINEAR)) for img in images]
        return torch.from_numpy(np.stack(arrays)).to(self.device).flatten(1).float() / 255

    def similarity(self, a, b):
        return 1 - (a.float() - b.float()).abs().mean(-1)


LOADERS = {'clip': load_clip, 'dinov2': load_dinov2, 'dinov3': load_dinov3, 'longclip': load_longclip}
EMBEDDERS = (*LOADERS, 'pixel')


def load_embedder(name, path=None, device='cpu', dtype='float32'):
    """An embedder by name (see EMBEDDERS) from the local checkpoint at `path` (a directory, or the .pt
    file for longclip; pixel takes none). dtype: 'float32', 'bfloat16', 'float16' or a torch.dtype."""
    if name == 'pixel':
        if path is not None:
            raise ValueError(f"the pixel metric has no weights, got path {path!r}")
        return PixelEmbedder(device=device)
    if name not in LOADERS:
        raise ValueError(f"unknown embedder {name!r}; choose from {', '.join(EMBEDDERS)}")
    if path is None:
        raise ValueError(f"embedder {name!r} needs a path to its local checkpoint")
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    model, pre = LOADERS[name](path)
    return Embedder(name, model, pre, device, dtype)


# -----------------------------------------------------------------------------
# similarity of reconstructions to their originals: the benchmark's scores and the RL reward's inputs

SCENE_METRICS = ('scene', 'scene_attributes')  # the toy world's exact scores, read back by its parser
METRICS = (*EMBEDDERS, *SCENE_METRICS)


def similarities(metrics, embedders, recon, originals, truths=None):
    """{metric: (N,) tensor}: how similar each reconstruction is to its original.

    recon, originals: N PIL images or uint8 (H, W, 3) arrays. embedders: {name: load_embedder(name)}
    for every metric that is not a scene metric: cosine of features, or for 'pixel' 1 - mean |a - b|.
    The scene metrics parse the reconstruction (data/shapes/world.py, exact on the world's images) and
    score its objects against truths[i] (a scene) where given, else against the parsed original:
    'scene' is the object F1 (shape, colour, size and cell all right), 'scene_attributes' the partial
    credit of world.attribute_score. Images of another size are area-resampled to the world's 48 px."""
    from data.shapes import world
    out, scores = {}, None
    for name in metrics:
        if name in SCENE_METRICS:
            if scores is None:  # parsed once, whichever scene metrics are asked for
                parse = lambda im: world.parse_image(toy_pixels(im, world.IMAGE))
                truths = truths if truths is not None else [parse(o) for o in originals]
                scores = [world.score(parse(r), t) for r, t in zip(recon, truths)]
            out[name] = torch.tensor([s['object_f1'] if name == 'scene' else world.attribute_score(s)
                                      for s in scores], dtype=torch.float64)  # exact: means to the last digit
        else:
            e = embedders[name]
            out[name] = e.similarity(e.embed(list(recon)), e.embed(list(originals))).float().cpu()
    return out


def toy_pixels(image, size):
    """(size, size, 3) uint8 from a PIL image or array; another size is area-resampled (PIL BOX)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.size != (size, size):
        image = image.resize((size, size), Image.BOX)
    return np.asarray(image.convert('RGB'))
