"""
The decoder (text -> image): the SD3 / SD3.5 MMDiT, and the flow-matching math around it.

One file, in the style of DiT's models.py: the network, checkpoint I/O that is bit-compatible with
diffusers' SD3Transformer2DModel directories (same module names, same keys, same numbers), the
flow-matching loss, the sampler (Euler steps with classifier-free guidance, any of them optionally a
Flow-GRPO SDE step that records its log-prob: grpo.py has the formulas), and the latent codecs (SD3.5's
VAE, or the toy world's exact linear codec).

An MMDiT block keeps two token streams, image tokens x (B, N, D) and text tokens c (B, L, D). Each has
its own weights (norms, q/k/v, output projection, MLP); they meet in one joint attention over all
N + L tokens. Every block is modulated (adaLN-Zero) by one conditioning vector built from the
timestep and the pooled text embedding.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import attention, check_state_dict, load_safetensors, load_safetensors_dir, save_json, save_safetensors
from lora import base_state_dict, lora_layers


@dataclass
class MMDiTConfig:
    """diffusers' SD3Transformer2DModel config, field for field (so config.json files load as they are)."""
    sample_size: int = 128            # latent size used in training; sets the pos-embed scale
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096   # width of the incoming text embeddings
    caption_projection_dim: int = 1152  # must equal num_attention_heads * attention_head_dim
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96      # the pos-embed grid; inputs crop its centre
    dual_attention_layers: tuple = ()  # SD3.5-Medium: blocks with a second, image-only attention
    qk_norm: str = None               # None (SD3) or 'rms_norm' (SD3.5)

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.out_channels is None:  # diffusers' meaning of null
            self.out_channels = self.in_channels
        width = self.num_attention_heads * self.attention_head_dim
        if self.caption_projection_dim != width:
            raise ValueError(f'caption_projection_dim ({self.caption_projection_dim}) must equal '
                             f'num_attention_heads * attention_head_dim ({width})')
        if self.qk_norm not in (None, 'rms_norm'):
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported: use None or 'rms_norm'")
        if not self.pos_embed_max_size:
            raise ValueError('pos_embed_max_size must be set (every SD3 checkpoint sets it)')

    @classmethod
    def from_dict(cls, d, source='config'):
        """Keys starting with '_' (diffusers' _class_name, _diffusers_version, ...) are bookkeeping."""
        d = {k: v for k, v in d.items() if not k.startswith('_')}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f'{source}: unknown MMDiT config keys {unknown}')
        return cls(**d)

    def to_dict(self):
        return {'_class_name': 'SD3Transformer2DModel', **asdict(self),
                'dual_attention_layers': list(self.dual_attention_layers)}


# -----------------------------------------------------------------------------
# small pieces

def linear_outside_autocast(layer, x):
    """layer(x) outside autocast, in the weights' dtype: fp32 under autocast (with fp32 weights).
    The adaLN modulation and the timestep MLP feed every block and cost one row per sample, so
    they keep full precision. Model in bf16 without autocast: bf16 like everything else."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.to(layer.weight.dtype))


def norm(x):
    """LayerNorm without affine parameters (adaLN supplies them). The weight of ones changes no number,
    but PyTorch's CPU kernel only takes its vectorised path with a weight: 2x faster at (8, 256, 384)."""
    return F.layer_norm(x, x.shape[-1:], x.new_ones(x.shape[-1]), None, eps=1e-6)


def modulate(x, shift, scale):
    """adaLN: x (B, N, D) * (1 + scale) + shift, with (B, D) shift and scale (one fused kernel).
    Under autocast the result is cast here, once, instead of by each of the linears that read it."""
    x = torch.addcmul(shift[:, None], x, 1 + scale[:, None])
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return x


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of t (B,) -> (B, dim), cos half first (diffusers' flip_sin_to_cos), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim, grid, base_size):
    """2D sin-cos table (grid * grid, dim) for a grid x grid patch grid, positions scaled so that
    base_size patches span the range 0..base_size (SD3's pos-embed). Row-major over (row, col);
    the first half of the channels encodes the column, the second half the row (MAE's convention)."""
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base_size)  # fp32 as diffusers, then fp64
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    def embed_1d(p):  # (M,) -> (M, dim / 2)
        out = torch.outer(p, omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    rows, cols = torch.meshgrid(pos, pos, indexing='ij')
    return torch.cat([embed_1d(cols.reshape(-1)), embed_1d(rows.reshape(-1))], dim=1).float()


class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * weight over the last dim, in fp32, with its backward written out. On the CPU, F.rms_norm
    is a composite of five ops whose autograd saves and walks more intermediates: forward + backward took
    twice as long at (8, 256, 6, 64) and (32, 64, 2, 64), fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        x_hat = xf * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return (x_hat * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        dtype, grad = grad.dtype, grad.float()  # the output's dtype, which is the input's
        g = grad * weight.float()
        # d/dx of x_hat = x * rstd: rstd * (g - x_hat * mean(g * x_hat)) over the normalised dim
        grad_x = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd
        grad_w = (grad * x_hat).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x.to(dtype), grad_w, None


class RMSNorm(nn.Module):
    """qk-norm over the head dimension, always computed in fp32 (SD3.5)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.device.type == 'cpu':  # F.rms_norm has a fused kernel on GPUs, not on the CPU
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


class Modulation(nn.Module):
    """The adaLN projection of a block: silu(conditioning) (B, D) -> n chunks of (B, D), in fp32.
    Wraps one Linear called `linear` so the key is diffusers' `norm1.linear`."""

    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, cond):
        return linear_outside_autocast(self.linear, cond).chunk(self.n, dim=1)


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, with diffusers' module names net.0.proj and net.2."""

    def __init__(self, dim, mult=4):
        super().__init__()
        up = nn.Module()
        up.proj = nn.Linear(dim, mult * dim)
        self.net = nn.ModuleList([up, nn.Identity(), nn.Linear(mult * dim, dim)])  # net.1: diffusers' dropout

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate='tanh'))


# -----------------------------------------------------------------------------
# attention and the MMDiT block

class JointAttention(nn.Module):
    """Attention over image tokens, or jointly over image + text tokens when `context` is True.
    Module names are diffusers' (to_q ... to_out.0, add_q_proj ... to_add_out, norm_q ...), so state
    dicts and PEFT target names carry over unchanged."""

    def __init__(self, dim, heads, head_dim, qk_norm, context=False, context_out=False):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # key `to_out.0`, as in diffusers
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None
            # the last block only needs the text stream as keys/values: no text output projection
            self.to_add_out = nn.Linear(inner, dim) if context_out else None

    def _heads(self, x, proj, norm=None):
        """x (B, n, D) -> (B, heads, n, head_dim), normalised per head if a qk-norm is given (SD3.5)."""
        y = proj(x).unflatten(-1, (self.heads, -1))  # (B, n, heads, head_dim), contiguous
        # normalised before the transpose: its casts and element-wise ops then run on the contiguous layout
        # (RMSNorm forward + backward ~9 % faster than on the transposed view at (8, 256, 6, 64) on the CPU)
        return (y if norm is None else norm(y)).transpose(1, 2)

    def forward(self, x, c=None):
        """x (B, N, D), c (B, L, D) or None -> (x_out (B, N, D), c_out (B, L, D) or None)."""
        N = x.shape[1]
        q = self._heads(x, self.to_q, self.norm_q)
        k = self._heads(x, self.to_k, self.norm_k)
        v = self._heads(x, self.to_v)
        if c is not None:  # joint attention: append the text tokens (cat of the views: contiguous, one copy)
            k = torch.cat([k, self._heads(c, self.add_k_proj, self.norm_added_k)], 2)
            v = torch.cat([v, self._heads(c, self.add_v_proj)], 2)
            # The last block (no to_add_out) drops the text outputs, so their queries are never computed.
            if self.to_add_out is not None:
                q = torch.cat([q, self._heads(c, self.add_q_proj, self.norm_added_q)], 2)
        out = attention(q, k, v)  # (B, H, N or N+L, Dh)
        merge = lambda o: o.transpose(1, 2).flatten(2)  # (B, H, n, Dh) -> contiguous (B, n, D), one copy
        x_out = self.to_out[0](merge(out[:, :, :N]))
        c_out = None
        if c is not None and self.to_add_out is not None:
            c_out = self.to_add_out(merge(out[:, :, N:]))
        elif c is not None and torch.is_grad_enabled():
            # The last block's unused text queries still have trainable weights (diffusers computes them and
            # gives them a zero gradient). They join the graph with weight zero, so that they get that exact zero
            # gradient too and DDP finds every trainable parameter used: a sum over the weights, not the queries.
            dead = [w for m in (self.add_q_proj, self.norm_added_q) if m is not None
                    for w in m.parameters() if w.requires_grad]
            if dead:
                x_out = x_out + sum(w.sum() for w in dead) * 0
        return x_out, c_out


class JointBlock(nn.Module):
    """One MMDiT block (diffusers' JointTransformerBlock, same module names).

    context_pre_only (the last block): the text stream is only read, not updated; its modulation is
    (scale, shift) like the final layer and it has no text output projection or MLP.
    dual_attention (SD3.5-Medium): a second attention over the image tokens alone, modulated by
    three more adaLN chunks.
    """

    def __init__(self, dim, heads, head_dim, qk_norm=None, context_pre_only=False, dual_attention=False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(dim, 9 if dual_attention else 6)
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, heads, head_dim, qk_norm, context=True, context_out=not context_pre_only)
        self.attn2 = JointAttention(dim, heads, head_dim, qk_norm) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, x, c, cond):
        """x (B, N, D) image tokens, c (B, L, D) text tokens, cond (B, D) = silu(conditioning), fp32.
        Returns the updated (x, c); c is None after the last block."""
        mod = self.norm1(cond)  # shift, scale, gate (attention), shift, scale, gate (MLP)[, attn2's three]
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(cond)  # AdaLayerNormContinuous order: (scale, shift)
            c_mod = None
        else:
            c_mod = self.norm1_context(cond)
            c_shift, c_scale = c_mod[0], c_mod[1]

        x_norm = norm(x)
        x_attn, c_attn = self.attn(modulate(x_norm, mod[0], mod[1]), modulate(norm(c), c_shift, c_scale))
        x = torch.addcmul(x, mod[2][:, None], x_attn)  # x + gate * attention
        if self.attn2 is not None:  # reads the same normalised x, modulated by its own chunks
            x_attn2, _ = self.attn2(modulate(x_norm, mod[6], mod[7]))
            x = torch.addcmul(x, mod[8][:, None], x_attn2)
        x = torch.addcmul(x, mod[5][:, None], self.ff(modulate(norm(x), mod[3], mod[4])))

        if self.context_pre_only:
            return x, None
        c = torch.addcmul(c, c_mod[2][:, None], c_attn)
        c = torch.addcmul(c, c_mod[5][:, None], self.ff_context(modulate(norm(c), c_mod[3], c_mod[4])))
        return x, c


# -----------------------------------------------------------------------------
# the model

class MMDiT(nn.Module):
    """SD3 / SD3.5 MMDiT: velocity = model(x, timestep, context, pooled).

    state_dict() has exactly the keys and shapes of diffusers' SD3Transformer2DModel.
    Set `model.gradient_checkpointing = True` to recompute each block in the backward pass.
    """

    def __init__(self, config, gradient_checkpointing=False):
        super().__init__()
        self.config = cfg = config
        D = cfg.num_attention_heads * cfg.attention_head_dim
        p = cfg.patch_size
        self.gradient_checkpointing = gradient_checkpointing

        # patch embedding + the fixed 2D sin-cos table (a persistent buffer: it is in every checkpoint)
        self.pos_embed = nn.Module()
        self.pos_embed.proj = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        table = sincos_pos_embed(D, cfg.pos_embed_max_size, base_size=cfg.sample_size // p)
        self.pos_embed.register_buffer('pos_embed', table[None])  # (1, M*M, D)

        # conditioning vector = MLP(timestep embedding) + MLP(pooled text)
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = nn.Module()
        self.time_text_embed.timestep_embedder.linear_1 = nn.Linear(256, D)
        self.time_text_embed.timestep_embedder.linear_2 = nn.Linear(D, D)
        self.time_text_embed.text_embedder = nn.Module()
        self.time_text_embed.text_embedder.linear_1 = nn.Linear(cfg.pooled_projection_dim, D)
        self.time_text_embed.text_embedder.linear_2 = nn.Linear(D, D)

        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointBlock(D, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm,
                       context_pre_only=i == cfg.num_layers - 1, dual_attention=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)])
        self.norm_out = Modulation(D, 2)  # (scale, shift)
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)

    @torch.no_grad()
    def initialize_weights(self):
        """DiT's recipe for training from scratch (checkpoints bring their own weights): Xavier linear
        layers, and zero for every adaLN modulation and the output projection, so each block starts as
        the identity and the model as a zero velocity ("adaLN-Zero"). With PyTorch's default init the
        random gates and scales of a fresh model slowed the toy decoder down."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def cropped_pos_embed(self, h, w):
        """The centre h x w window of the pos-embed grid -> (1, h*w, D)."""
        M = self.config.pos_embed_max_size
        if h > M or w > M:
            raise ValueError(f'a {h}x{w} patch grid exceeds pos_embed_max_size {M}')
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.pos_embed.view(1, M, M, -1)
        return table[:, top:top + h, left:left + w].flatten(1, 2)

    def conditioning(self, timestep, pooled):
        """(B,) timesteps (1000 * sigma) and (B, P) pooled text -> (B, D) conditioning (fp32 under autocast)."""
        te, pe = self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder
        mlp = lambda m, x: linear_outside_autocast(m.linear_2, F.silu(linear_outside_autocast(m.linear_1, x)))
        return mlp(te, timestep_embedding(timestep)) + mlp(pe, pooled)

    def forward(self, x, timestep, context, pooled):
        """x (B, C, H, W) noisy input, timestep (B,) or scalar = 1000 * sigma,
        context (B, L, joint_attention_dim), pooled (B, pooled_projection_dim) -> velocity (B, C_out, H, W)."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f'input size {H}x{W} is not a multiple of patch_size {p}')
        h, w = H // p, W // p
        timestep = torch.as_tensor(timestep, device=x.device).expand(B)
        dtype = self.proj_out.weight.dtype  # fp32 inputs also drive a bf16 model
        x, context = x.to(dtype), context.to(dtype)

        pos = self.cropped_pos_embed(h, w)
        x = (self.pos_embed.proj(x).flatten(2).transpose(1, 2) + pos).contiguous()  # (B, h*w, D)
        c = self.context_embedder(context)  # (B, L, D)
        cond = F.silu(self.conditioning(timestep, pooled))  # every adaLN projection starts with silu

        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, c = checkpoint(block, x, c, cond, use_reentrant=False)
            else:
                x, c = block(x, c, cond)

        scale, shift = self.norm_out(cond)
        x = self.proj_out(modulate(norm(x), shift, scale))  # (B, h*w, p*p*C)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, -1, H, W)

    # -- checkpoints ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None):
        """Load a diffusers SD3Transformer2DModel directory (config.json + single or sharded
        diffusion_pytorch_model safetensors), strictly. dtype defaults to float32."""
        path = os.path.join(directory, 'config.json')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no config.json in {directory}: not an SD3 transformer directory')
        try:
            with open(path) as f:
                config = MMDiTConfig.from_dict(json.load(f), source=path)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path} is not valid JSON: {e}') from None
        dtype = dtype or torch.float32
        state = load_safetensors_dir(directory, 'diffusion_pytorch_model')
        with torch.device('meta'):  # no random init of billions of weights that are overwritten anyway
            model = cls(config)
        check_state_dict(model.state_dict(), state, directory)  # before the cast: an integer file is refused
        state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory):
        """Write config.json + diffusion_pytorch_model.safetensors, loadable by diffusers."""
        if any(not m.merged for m in lora_layers(self).values()):
            raise ValueError('the model has unmerged LoRA layers: save the adapter with lora.save_peft, '
                             'or lora.merge_lora first to save merged weights')
        os.makedirs(directory, exist_ok=True)
        save_safetensors(base_state_dict(self), os.path.join(directory, 'diffusion_pytorch_model.safetensors'),
                         metadata={'format': 'pt'})
        save_json(self.config.to_dict(), os.path.join(directory, 'config.json'))


# -----------------------------------------------------------------------------
# flow matching (SD3; Esser et al. 2024, arXiv 2403.03206): x_sigma = (1 - sigma) * x0 + sigma * noise, velocity target = noise - x0

def shift_sigmas(sigma, shift):
    """SD3's timestep shift: more steps at high noise for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _noise(shape, generator, device):
    """Standard normal fp32 noise drawn on the generator's device (reproducible across devices)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def sample_sigmas_train(batch, shift=1.0, generator=None, device=None):
    """Training noise levels (batch,): logit-normal, sigmoid(N(0, 1)), then shifted."""
    return shift_sigmas(torch.sigmoid(_noise((batch,), generator, device)), shift)


def flow_matching_loss(model, x0, context, pooled, shift=1.0, generator=None, sigma=None, noise=None, weight=None):
    """MSE between the predicted and the true velocity (noise - x0), at random noise levels.
    x0 (B, C, H, W) clean latents (or pixels in [-1, 1]). sigma (B,) / noise override the draws.
    weight (C,): each channel's squared error weighted (mean 1 keeps the plain MSE's scale)."""
    B = x0.shape[0]
    if sigma is None:
        sigma = sample_sigmas_train(B, shift, generator, x0.device)
    if noise is None:
        noise = _noise(x0.shape, generator, x0.device)
    s = sigma.view(B, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = model(x_t, 1000 * sigma, context, pooled)
    if weight is None:
        return F.mse_loss(v.float(), (noise - x0).float())
    return ((v.float() - (noise - x0).float()).square() * weight.view(1, -1, 1, 1)).mean()


def sampling_sigmas(num_steps, shift=3.0, num_train_timesteps=1000):
    """The num_steps + 1 sigmas of the sampler, from 1 to 0: exactly diffusers'
    FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps).sigmas, including its
    quirk that the end of the range is the *shifted* smallest training sigma, shifted once more."""
    sigma_min = shift_sigmas(torch.tensor(1 / num_train_timesteps, dtype=torch.float32), shift).item()
    sigmas = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    sigmas = shift_sigmas(sigmas, shift).float()
    return torch.cat([sigmas, torch.zeros(1)])


def guided_velocity(model, x, sigma, context, pooled, neg_context=None, neg_pooled=None, guidance=1.0):
    """Velocity with classifier-free guidance v_u + guidance * (v_c - v_u); both branches in one batch.
    x (B, C, H, W); sigma a float or (B,) tensor. Returned in fp32."""
    B = x.shape[0]
    t = 1000 * torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B)
    if neg_context is None or guidance == 1.0:
        return model(x, t, context, pooled).float()
    if neg_context.shape[1] != context.shape[1]:
        raise ValueError(f'negative and positive contexts have {neg_context.shape[1]} and {context.shape[1]} '
                         'tokens: pad them together (right padding) before sampling')
    neg_context, neg_pooled = neg_context.expand(B, -1, -1), neg_pooled.expand(B, -1)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg_context, context]),
              torch.cat([neg_pooled, pooled])).float()
    v_u, v_c = v.chunk(2)
    return v_u + guidance * (v_c - v_u)


def sample(model, context, pooled, neg_context=None, neg_pooled=None, steps=40, guidance=5.0, shift=3.0,
           generator=None, shape=None, noise=None, sde_steps=None, noise_level=0.7, guidance_min_sigma=0.0):
    """The sampler: Euler steps from pure noise (sigma = 1) to an image / latents (sigma = 0).

    context (B, L, Dj), pooled (B, P); neg_context / neg_pooled of batch 1 or B (same L as context).
    shape (C, H, W) defaults to the model's (in_channels, sample_size, sample_size); `noise`
    (B, C, H, W) overrides the starting draw. The state is kept in fp32; run under autocast for bf16.
    It runs under the caller's grad mode: inference wraps it in torch.no_grad() (pipeline.draw),
    the cold start differentiates through it.

    sde_steps: None for the plain ODE sampler, which returns x. Else the indices of the steps taken
    as Flow-GRPO SDE steps (sde_step: stochastic, with the log-probability of their outcome; the
    others stay Euler steps, as in MixGRPO's windows), and the result is (x, transitions): one dict per
    SDE step with its index j, the state x before it, x_next sampled, and log_prob (B,) under the
    sampling policy, what U4G's loss re-scores (Flow-GRPO's pipeline_with_logprob, one sampler that
    also records log-probs). Their noise is drawn from `generator` after the starting noise.

    guidance_min_sigma: guidance only at the steps from noise levels above it, the last steps unguided
    (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval", NeurIPS: guidance at low noise
    adds nothing the image needs). 0: every step, as diffusers' pipelines and UAE's inference.
    """
    if sde_steps is not None and guidance_min_sigma > 0:  # transition_logprob re-scores with guidance at every step
        raise ValueError('guidance_min_sigma is for the ODE sampler only: SDE steps (sde_steps) are re-scored by '
                         'transition_logprob with guidance at every step')
    B = context.shape[0]
    if noise is None:
        cfgm = model.config
        shape = shape or (cfgm.in_channels, cfgm.sample_size, cfgm.sample_size)
        noise = _noise((B, *shape), generator, context.device)
    x, transitions = noise.float(), []
    sigmas = sampling_sigmas(steps, shift).tolist()
    for j, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        g = guidance if sigma > guidance_min_sigma else 1.0
        v = guided_velocity(model, x, sigma, context, pooled, neg_context, neg_pooled, g)
        if sde_steps is not None and j in sde_steps:
            x_next, log_prob, _, _ = sde_step(x, v, sigma, sigma_next, noise_level, generator)
            transitions.append(dict(j=j, x=x, x_next=x_next, log_prob=log_prob))
            x = x_next
        else:
            x = x + (sigma_next - sigma) * v
    return x if sde_steps is None else (x, transitions)


def transition_logprob(model, t, context, pooled, neg_context, neg_pooled, steps, guidance, shift, noise_level):
    """A stored SDE transition t (from sample(..., sde_steps=...)) re-scored under the current weights:
    log-prob (B,), the step's mean (B, C, H, W) and its std (B,), what Flow-GRPO's loss and KL need."""
    sigmas = sampling_sigmas(steps, shift).tolist()
    j = t['j']
    v = guided_velocity(model, t['x'], sigmas[j], context, pooled, neg_context, neg_pooled, guidance)
    _, log_prob, mean, std_t = sde_step(t['x'], v, sigmas[j], sigmas[j + 1], noise_level, x_next=t['x_next'])
    return log_prob, mean, std_t.view(-1) * math.sqrt(sigmas[j] - sigmas[j + 1])


def sde_step(x, v, sigma, sigma_next, noise_level=0.7, generator=None, noise=None, x_next=None):
    """One Flow-GRPO SDE step with the log-probability of its outcome (formulas: grpo.py), in fp32.

    x, v (B, C, H, W) state and (guided) velocity; sigma, sigma_next floats or (B,) tensors.
    std_t = noise_level * sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses sigma_next
    (the schedule's second sigma, as Flow-GRPO). With x_next given (recomputing a stored trajectory
    under the current policy), it is scored instead of sampled.
    Returns (x_next, log_prob (B,), mean, std_t (B, 1, 1, 1)); log_prob is the Gaussian
    log-density averaged over C, H, W. noise_level = 0 is the Euler step (log_prob is then NaN).
    """
    x, v = x.float(), v.float()
    as_col = lambda s: torch.as_tensor(s, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    sigma, sigma_next = as_col(sigma), as_col(sigma_next)
    dt = sigma_next - sigma  # < 0
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_t * torch.sqrt(-dt)
    if x_next is None:
        if noise is None:
            noise = _noise(x.shape, generator, x.device)
        x_next = mean + step_std * noise.float()
    x_next = x_next.float()
    log_prob = (-(x_next.detach() - mean) ** 2 / (2 * step_std ** 2) - torch.log(step_std)
                - 0.5 * math.log(2 * math.pi))
    return x_next, log_prob.mean(dim=(1, 2, 3)), mean, std_t


# -----------------------------------------------------------------------------
# latents: pixels (B, 3, H, W) in [-1, 1] <-> what the DiT models. Three codecs, one interface
# (encode, decode, factor = pixels per latent position):
#   None          pixel space: the DiT sees pixels
#   VAE           diffusers' AutoencoderKL (real SD3 / SD3.5), SD3's latent normalisation
#   LinearCodec   the toy world's exact linear autoencoder

class VAE:
    """diffusers' AutoencoderKL from a local directory, frozen; latents are (z - shift) * scaling."""
    factor = 8

    def __init__(self, directory, dtype=torch.float32, device='cpu'):
        from diffusers import AutoencoderKL  # only needed for real (latent-space) models
        self.vae = AutoencoderKL.from_pretrained(directory, torch_dtype=dtype, local_files_only=True)
        self.vae = self.vae.to(device).eval().requires_grad_(False)
        self.scaling, self.shift = self.vae.config.scaling_factor, self.vae.config.shift_factor or 0.0

    def encode(self, pixels, generator=None):
        z = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator)
        return (z.float() - self.shift) * self.scaling

    def decode(self, latents):
        return self.vae.decode((latents / self.scaling + self.shift).to(self.vae.dtype)).sample.float()


class LinearCodec(nn.Module):
    """A fixed linear autoencoder on non-overlapping p x p patches: (3 p p) pixels <-> k numbers.

    Why the toy needs it: per image token the DiT outputs a vector the size of its width D, so noise
    in the part of a patch that does not fit in D dimensions can never be removed; a pixel-space DiT
    with 16 px patches (768 numbers) and D = 128 samples stay noisy. A toy-world cell is its background
    colour plus one of 8 object masks times a colour difference: 27 dimensions. The SVD basis of
    training cells (fit) therefore encodes clean images exactly in k >= 27 channels, each scaled to
    unit variance like SD3's VAE latents.
    """

    def __init__(self, basis, mean, scale, patch):
        super().__init__()
        self.factor = patch
        self.register_buffer('basis', basis)  # (k, 3 p p), orthonormal rows
        self.register_buffer('mean', mean)    # (3 p p,)
        self.register_buffer('scale', scale)  # (k,)

    @classmethod
    def fit(cls, pixels, patch, k):
        """pixels (N, 3, H, W) in [-1, 1]: the top-k principal directions of their patches."""
        x = cls._patches(pixels.float(), patch).reshape(-1, 3 * patch * patch).double()
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        basis = vh[:k]
        scale = ((x - mean) @ basis.T).std(0).clamp(min=1e-6)
        return cls(basis.float(), mean.float(), scale.float(), patch)

    @staticmethod
    def _patches(x, p):  # (B, 3, H, W) -> (B, H/p, W/p, 3 p p)
        B, C, H, W = x.shape
        return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // p, C * p * p)

    def encode(self, pixels, generator=None):
        z = (self._patches(pixels.float(), self.factor) - self.mean) @ self.basis.T / self.scale
        return z.permute(0, 3, 1, 2).contiguous()  # (B, k, H/p, W/p)

    def decode(self, latents):
        B, k, h, w = latents.shape
        p = self.factor
        x = (latents.permute(0, 2, 3, 1) * self.scale) @ self.basis + self.mean  # (B, h, w, 3 p p)
        return x.view(B, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, h * p, w * p)

    def save(self, path):
        save_safetensors(dict(basis=self.basis, mean=self.mean, scale=self.scale,
                              patch=torch.tensor(self.factor)), path)

    @classmethod
    def load(cls, path, device='cpu'):
        t = load_safetensors(path)
        missing = sorted({'basis', 'mean', 'scale', 'patch'} - set(t))
        if missing:
            raise ValueError(f'{path} is not a LinearCodec file: missing {missing}')
        return cls(t['basis'], t['mean'], t['scale'], int(t['patch'])).to(device)


def load_pooled(path, dim):
    """The constant pooled vector (dim,) of a safetensors file {'pooled': ...}, checked strictly (UAE feeds
    SD3's pooled embedding of the empty prompt to both CFG branches: tools/sd3_pooled.py)."""
    state = load_safetensors(path)
    check_state_dict({'pooled': torch.empty(dim)}, state, path)
    return state['pooled']


def load_codec(path, dtype=torch.float32, device='cpu'):
    """A latent codec by path: a LinearCodec .safetensors file, or an AutoencoderKL (VAE) directory."""
    if path.endswith('.safetensors'):
        return LinearCodec.load(path, device)
    return VAE(path, dtype, device)


def encode(codec, pixels, generator=None):
    """Pixels -> what the DiT models (a sample of the posterior for a VAE); codec None: pixel space."""
    return pixels if codec is None else codec.encode(pixels, generator)


def decode(codec, latents):
    """What the DiT models -> pixels (roughly in [-1, 1]; clamp before saving images). Differentiable."""
    return latents if codec is None else codec.decode(latents)
