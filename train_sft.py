"""
Supervised stages on the toy world (or your own data in the same layout).

    python train_sft.py --model=encoder     # captioning SFT: a terse captioner (mostly short captions)
    python train_sft.py --model=decoder     # long-caption text-to-image SFT, conditioned like UAE
    torchrun --nproc_per_node=2 train_sft.py --model=decoder      # DDP (gloo on CPU, nccl on GPU)
    python train_sft.py --model=decoder --resume=True             # continue exactly where it stopped

The decoder is conditioned as in UAE (docs/uae.md): the frozen encoder's LLM reads the caption in the
`generate` chat template, and its hidden states of every token go through UAE's projector into the DiT.
Trained: the DiT, and the projector at projector_lr x lr (the paper's stage 0). UAE conditions on the
LLM's last layer with a trained projector; the toy decoder is trained from LLM layer 1 (--prompt_layer=1)
with the projector frozen (--projector_lr=0), fitted to whiten what it reads (--projector_init=whiten):
docs/toy_world.md says why. Every `save_every` steps a checkpoint directory is written atomically:
weights (safetensors), optimizer state, meta.json (resolved config, step, data position). Random draws
are a function of (seed, step), so a resumed run repeats an uninterrupted one.
"""
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import model_decoder as D
from checkpoint import (check_checkpoint, check_optimizer_files, check_run_dir, load_checkpoint,
                        optimizer_from_files, optimizer_to_files, save_checkpoint, skip_nonfinite,
                        truncate_log)
from common import (autocast, configure, keep_freed_memory, require_fraction, require_positive, run,
                    save_safetensors, setup_distributed, teardown_distributed)
from data.shapes import world
from images import to_pil, to_pixels, to_uint8
from model_encoder import Encoder

config = dict(
    model='decoder',            # 'encoder' (captioning) or 'decoder' (text-to-image)
    data_dir='data/shapes/out',  # written by data/shapes/prepare.py
    out_dir='',                 # default: out/sft_<model>
    arch='',                    # architecture json to train from scratch; default config/toy_<model>.json
    init_from='',               # or start from a checkpoint directory (encoder: Encoder dir; decoder: a run dir)
    encoder='checkpoints/toy/llm',  # decoder SFT: the encoder whose frozen LLM conditions the DiT
    resume=False,               # continue from out_dir/ckpt (a new run refuses an out_dir that holds one)
    # probability of each caption detail level (data/shapes/world.CAPTION_LEVELS); None = the model's default:
    # the encoder becomes a terse captioner that sometimes says more, the decoder learns long captions
    levels=None,
    caption_dropout=0.1,        # decoder: empty caption this often, for classifier-free guidance
    prompt_layer=None,          # decoder: condition on this LLM layer instead of the last (model_encoder.EncoderConfig)
    max_steps=2500,
    batch_size=32,              # global batch, split across ranks and accumulation steps
    grad_accum=1,
    lr=1e-3, min_lr=1e-4, warmup=100, weight_decay=0.0, beta1=0.9, beta2=0.99, grad_clip=1.0,
    max_nonfinite=10,           # a step with a NaN/inf loss or gradient is skipped; this many in a row stop the run
    ema=0.999,                  # decoder: EMA of the weights, used for sampling and saving; 0 = off
    dtype='float32',            # 'bfloat16' runs the model under bf16 autocast
    fsdp=False,                 # shard parameters, gradients and optimizer state with FSDP2 (big decoders)
    grad_checkpointing=False,
    train_only='',              # comma-separated name parts: train only the parameters whose names contain one
    # encoder: the vision tower is frozen at its random initialisation for the first steps, then trained
    # at vision_lr x lr. Trained jointly from the start, a random LLM's gradients wash the shape information
    # out of the vision features (measured: colour learnt, shape at chance); frozen, a linear probe reads
    # shape from them perfectly and the LLM learns to
    freeze_vision_steps=1000, vision_lr=0.1,
    # decoder: UAE's projector trains at projector_lr x lr. At the full rate it amplifies what the DiT uses
    # first (colours, cells) and washes out the rest (measured: the shape and size differences of the
    # projected context fell to half and a third of those of the LLM states, and shape F1 stayed at chance
    # for 3,000 steps); frozen at its random initialisation (0.0) shape F1 was 0.59 at step 1,000 (0.1x: 0.57)
    projector_lr=0.0,
    # decoder from scratch: the frozen projector's initialisation. 'random' is PyTorch's default; 'whiten' fits
    # it to whiten the LLM states it reads (mean removed, every direction of their covariance at unit variance;
    # whiten_projector). The LLM's layer-1 states vary mostly along a few directions (covariance eigenvalues
    # from 35 down to a median of 0.01), and a caption's shape and size words move them little: changing one
    # object's shape moves the states by 4 % of their norm, its size by 2-3 %, its cell by 21 %; whitened,
    # 21 %, 16 %, 46 % (the speedrun's encoders after SFT). Measured (the speedrun's decoder SFT, seed 1,
    # validation object F1): 0.77 at step 375 and 1.0 at 750; 'random': 0.01 at 750, 0.13 at 3,000, shapes
    # at chance. docs/toy_world.md, finding 6
    projector_init='whiten',
    # encoder: weight of language modelling on the captions inside the `generate` template (text only).
    # A small LLM trained only to caption gives nearly the same last-layer states for every text prompt
    # (measured cosine 0.99+), and those states are what condition the decoder
    lm_weight=0.5,
    log_every=10, eval_every=250, save_every=250,
    # decoder: SD3's timestep shift of the training noise levels (sampling keeps shift 3). With a random
    # projector the decoder read its captions only if it trained at high noise (shift 12; docs/toy_world.md,
    # finding 3). With the whitened one (below) shift 3, SD3's own, reads them nearly as soon and leaves
    # fewer ghost shapes in the cells that should be empty. Measured (800 steps, seeds 1 / 2): validation
    # object F1 0.98 / 0.98 against 1.0 / 1.0 at shift 12; ghosts from true test captions 0.017 / 0.024
    # against 0.045 / 0.037 (shift 6: 0.055, seed 1)
    train_shift=3.0,
    # decoder: this share of each batch at noise levels uniform on [0, low_sigma_max] instead. The sampler's
    # last steps run below sigma 0.3, where shift 3's logit-normal puts 2.6 % of its draws (0.0003 % below 0.03):
    # there the decoder should only snap a nearly clean latent onto the nearest pattern, and untrained it leaves
    # the faint ghost shapes in empty cells and the tinted square around each object (docs/toy_world.md,
    # finding 11). Measured (the speedrun's decoder SFT, 1,600 steps, seed 1; drawing the true test captions):
    # ghosts / halos 0.008 / 0.022 at 0, 0.005 / 0.014 at 0.125, 0.005 / 0.010 at 0.25; Toy-GenEval 0.410,
    # 0.330, 0.240 (the steps above sigma 0.3 drew fewer objects). 0: SD3's draws alone
    low_sigma_share=0.125, low_sigma_max=0.3,
    # decoder: the flow-matching loss weighs each latent channel's squared error by the codec's scale of it
    # to this power (normalised to mean 1). The codec's channels are whitened (unit variance, as SD3's VAE
    # latents), so plain MSE (0) weighs them alike, although the first carries 54 % of the pixel variance
    # and two thirds of the ghosts' error; 2 would be the pixel-space error. Measured (800 steps, seed 1):
    # validation object F1 at steps 400 / 600 / 800: 0.43 / 0.94 / 0.98 at 0, 0.70 / 0.99 / 1.0 at 1, 0.24 /
    # 0.61 / 0.76 at 2 (shapes, the small channels, left behind); ghosts from true test captions 0.017 at 0
    # and 1, 0.030 at 2
    latent_weight_power=1.0,
    # decoder from scratch: where its image tokens learn which cell they are. SD3's sin-cos table spaces
    # patches one unit apart (base_size = sample_size // patch_size = 3 here), so the toy's nine cells get
    # position vectors of cosine 0.95 (min distance 1.5 at norm 8), and at high noise the patch embedding
    # of pure noise (norm ~7) buries even that. pos_base=48 (the image's pixel spacing: 16 units a cell;
    # mean cosine 0.70) and the patch embedding at patch_init x its default scale make the cells distinct
    # from step 0. Measured (the speedrun's decoder SFT, validation cell F1): seed 2 0.76 at step 750 (was
    # 0.14), seed 1 0.81 at step 1,250 (was 0.24 at 1,500 and 0.31 at 3,000); base 48 alone: no clear gain.
    # The table is a persistent buffer: the checkpoint carries it, and diffusers loads it as is.
    # 0 / 1.0: diffusers' table and PyTorch's init
    pos_base=48, patch_init=0.25,
    eval_images=64, sample_steps=20, sample_guidance=2.0, sample_shift=3.0,
    seed=1337, device='auto',
)
DEFAULT_LEVELS = dict(encoder={'one': 0.35, 'short': 0.35, 'some': 0.15, 'complete': 0.15},
                      decoder={'complete': 1.0})

# -----------------------------------------------------------------------------
# data: one global batch per step, drawn from (seed, step), each rank takes its slice

def batch_indices(step, n, batch_size, seed):
    """Index of the step's global batch: epochs are permutations of the data set, so a resumed run
    reads exactly what the uninterrupted one would have read."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


def pick_captions(records, idx, levels, rng):
    names = list(levels)
    p = np.array([levels[k] for k in names], dtype=np.float64)
    choice = rng.choice(len(names), size=len(idx), p=p / p.sum())
    return [records[i]['captions'][names[c]] for i, c in zip(idx, choice)]


def save_grid(rows, path):
    """rows: list of uint8 (N, H, W, 3) arrays of equal N -> one PNG, a row per array."""
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


# -----------------------------------------------------------------------------
# the two models being trained

class TextToImage(torch.nn.Module):
    """What decoder SFT trains: UAE's projector and the DiT. The LLM that reads the caption is frozen
    and stays outside, so DDP/FSDP see only trainable parameters."""

    def __init__(self, projector, dit):
        super().__init__()
        self.projector, self.dit = projector, dit

    def forward(self, x, timestep, hidden, pooled):  # hidden: (B, L, llm_hidden) frozen LLM states
        return self.dit(x, timestep, self.projector(hidden), pooled)


def read_arch(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f'cannot read architecture file {path}: {e}') from None


def build_encoder(cfg, device):
    if cfg['init_from']:
        enc = Encoder.from_pretrained(cfg['init_from'], device=device)
    else:
        from model_encoder import EncoderConfig
        from tokenizer import Tokenizer
        path = cfg['arch'] or 'config/toy_encoder.json'
        enc = Encoder(EncoderConfig.from_hf(read_arch(path), path), Tokenizer.from_pretrained('data/shapes')).to(device)
    enc.min_pixels = enc.max_pixels = world.IMAGE * world.IMAGE  # toy images are used at their size
    if enc.projector is not None:
        enc.projector.requires_grad_(False)  # captioning does not use it: keep DDP's gradient sets equal
    return enc


def token_states(enc, captions, batch=128):
    """(tokens, d): the LLM states the decoder reads (enc.prompt_hidden) of every token of every caption,
    without the padding."""
    tok, states = enc.get_tokenizer(), []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        hidden = enc.prompt_hidden(chunk)  # (B, L, d), padded on the right: keep each caption's own tokens
        states += [h[:len(tok.chat_ids(t, role='generate'))] for h, t in zip(hidden, chunk)]
    return torch.cat(states)


def whiten_projector(enc, captions, eps=1e-2):
    """Set UAE's projector, Linear(d, >=2d) -> GELU -> Linear(>=2d, >=d), to the whitening of the LLM states
    it reads, (h - mean) @ W with W = C^(-1/2) for the states' covariance C over every token of `captions`
    (eigenvalues lifted by eps x their mean, so directions of almost no variance are not blown up). Exact
    through the GELU: GELU(z) - GELU(-z) = z, so the first layer computes [z, -z] and the second subtracts."""
    d, first, last = enc.config.hidden_size, enc.projector[0], enc.projector[2]
    if first.out_features < 2 * d or last.out_features < d:
        raise ValueError(f'projector_init=whiten needs projector sizes >= ({2 * d}, {d}) for LLM width {d}, '
                         f'got ({first.out_features}, {last.out_features})')
    with torch.no_grad():
        x = token_states(enc, captions).double()
        mean = x.mean(0)
        eigval, eigvec = torch.linalg.eigh(torch.cov((x - mean).T))
        w = eigvec @ torch.diag((eigval + eps * eigval.mean()).rsqrt()) @ eigvec.T  # (d, d), symmetric
        eye = torch.eye(d, dtype=w.dtype, device=w.device)
        for layer in (first, last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[:2 * d] = torch.cat([w, -w]).to(first.weight)
        first.bias[:2 * d] = torch.cat([-w @ mean, w @ mean]).to(first.bias)
        last.weight[:d, :2 * d] = torch.cat([eye, -eye], 1).to(last.weight)


def build_decoder(cfg, device, train_images, captions):
    """(TextToImage to train, frozen encoder, constant pooled vector (1, P), latent codec). captions: training
    captions, to fit a from-scratch projector to (projector_init)."""
    enc = Encoder.from_pretrained(cfg['encoder'], device=device).requires_grad_(False).eval()
    if cfg['prompt_layer'] is not None:  # exported with the llm/ directory, so every later user agrees
        enc.config.prompt_layer = cfg['prompt_layer']
    if cfg['init_from']:
        dit = D.MMDiT.from_pretrained(os.path.join(cfg['init_from'], 'dit'), device=device)
        enc.projector.load_state_dict(Encoder.from_pretrained(os.path.join(cfg['init_from'], 'llm')).projector.state_dict())
        pooled = D.load_pooled(os.path.join(cfg['init_from'], 'pooled.safetensors'), dit.config.pooled_projection_dim)
        codec = D.LinearCodec.load(os.path.join(cfg['init_from'], 'codec.safetensors'), device)
    else:
        path = cfg['arch'] or 'config/toy_decoder.json'
        dit = D.MMDiT(D.MMDiTConfig.from_dict(read_arch(path), path)).to(device)
        dit.initialize_weights()
        if cfg['pos_base']:
            table = D.sincos_pos_embed(dit.pos_embed.pos_embed.shape[-1], dit.config.pos_embed_max_size, cfg['pos_base'])
            dit.pos_embed.pos_embed.copy_(table[None])
        with torch.no_grad():
            dit.pos_embed.proj.weight.mul_(cfg['patch_init'])
        if cfg['projector_init'] == 'whiten':
            whiten_projector(enc, captions)
        # UAE's pooled vector is a constant (SD3's embedding of the empty prompt); the toy's is a fixed draw
        pooled = torch.randn(dit.config.pooled_projection_dim, generator=torch.Generator().manual_seed(0))
        # the toy's latent space (see model_decoder.LinearCodec), fitted to the first training images
        patch = world.IMAGE // dit.config.sample_size
        codec = D.LinearCodec.fit(to_pixels(train_images[:4096]), patch, dit.config.in_channels).to(device)
    dit.gradient_checkpointing = cfg['grad_checkpointing']
    model = TextToImage(enc.projector, dit).requires_grad_(True)
    return model, enc, pooled.to(device).view(1, -1), codec


# -----------------------------------------------------------------------------
# losses

def train_sigmas(cfg, batch, generator):
    """The decoder's training noise levels (batch,): SD3's shifted logit-normal (train_shift), the first
    low_sigma_share of the batch uniform on [0, low_sigma_max] instead (0: exactly SD3's draws)."""
    sigma = D.sample_sigmas_train(batch, cfg['train_shift'], generator)
    k = round(cfg['low_sigma_share'] * batch)
    sigma[:k] = cfg['low_sigma_max'] * torch.rand(k, generator=generator)
    return sigma


def decoder_loss(model, enc, pooled, codec, images, captions, sigma, noise, pad_to='', weight=None):
    """Flow-matching loss (mean over the micro-batch) on the codec's latents given captions; sigma (B,)
    and noise (B, C, h, w) are drawn for the whole global batch, so the split across ranks changes nothing.
    pad_to: the global batch's longest caption. UAE's context has no mask: the padding is part
    of the input, so every micro-batch is padded to the length the whole batch would have.
    weight (C,): the latent channels' weights (latent_weight_power)."""
    x0 = D.encode(codec, to_pixels(images, pooled.device))
    with torch.no_grad():
        hidden = enc.prompt_hidden(list(captions) + [pad_to])[:-1]
    return D.flow_matching_loss(model, x0, hidden, pooled.expand(len(captions), -1), sigma=sigma, noise=noise,
                                weight=weight)


def encoder_nll(model, enc, images, captions):
    """Summed negative log-likelihood of the caption tokens (+ <|im_end|>) after the captioning prompt."""
    batch = enc.caption_inputs(to_pil(images))
    tokens, mask = enc.caption_tokens(captions)
    return -(model(batch, tokens, mask) * mask).sum()


def generate_prefix(enc, n):
    """The `generate` chat template up to the prompt's text, as a text-only prompt batch of n rows."""
    prefix = enc.tokenizer.chat_text('\0', role='generate').split('\0')[0]
    ids = torch.tensor(enc.tokenizer.encode(prefix), device=enc.lm_head.weight.device).expand(n, -1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))


def encoder_lm_nll(model, enc, captions):
    """Summed negative log-likelihood of the captions as the text of a `generate` message."""
    tokens, mask = enc.caption_tokens(captions)
    return -(model(generate_prefix(enc, len(captions)), tokens, mask) * mask).sum()


class CaptionScorer(torch.nn.Module):
    """Wraps Encoder.token_logprobs as a forward(), so DDP/FSDP see the call that uses the weights."""

    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, batch, tokens, mask):
        return self.enc.token_logprobs(batch, tokens, mask)


# -----------------------------------------------------------------------------
# evaluation: the toy world's exact score of what came back

@torch.no_grad()
def evaluate(cfg, kind, train_model, enc, pooled, codec, val_images, val_records, out_dir, step, device):
    n = min(cfg['eval_images'], len(val_records))
    images, records = val_images[:n], val_records[:n]
    truth = [r['scene'] for r in records]
    gen = torch.Generator(device).manual_seed(cfg['seed'])
    if kind == 'decoder':
        dit = train_model.dit
        captions = [r['captions']['complete'] for r in records]
        ctx = enc.embed_prompt(captions + [''])  # right-padded together, the empty prompt last (as UAE)
        x = D.sample(dit, ctx[:n], pooled.expand(n, -1), ctx[n:], pooled, steps=cfg['sample_steps'],
                     guidance=cfg['sample_guidance'], shift=cfg['sample_shift'], generator=gen)
        recon = to_uint8(D.decode(codec, x))
        scores = [world.score(world.parse_image(r), t) for r, t in zip(recon, truth)]
        save_grid([np.asarray(images[:16]), recon[:16]], os.path.join(out_dir, f'samples_{step:06d}.png'))
        out = {k: float(np.mean([s[k] for s in scores])) for k in ('object_f1', 'shape_f1', 'color_f1', 'size_f1', 'cell_f1')}
        # faint shapes left in the cells that should be empty, a tinted square around each object: the parser
        # ignores them, a reader does not
        return dict(out, ghosts=world.mean_residual(world.empty_cell_residual, recon, truth),
                    halos=world.mean_residual(world.halo_residual, recon, truth))
    batch = enc.caption_inputs(to_pil(images))
    if hasattr(enc, 'unshard'):  # FSDP2: generate() bypasses enc.forward, whose hook would gather the weights
        enc.unshard()
    # sampled as at inference (temperature 0.7, fixed seed): greedy decoding of a captioner trained on a
    # mixture of detail levels only ever shows the most common level
    out = enc.generate(**batch, max_new_tokens=64, temperature=0.7, generator=gen, suppress_tokens=enc.caption_suppress_tokens())
    if hasattr(enc, 'reshard'):
        enc.reshard()
    texts = [enc.tokenizer.decode(t[m].tolist(), skip_special_tokens=True) for t, m in zip(out.tokens, out.mask)]
    scores = [world.score(world.parse_caption(t), s) for t, s in zip(texts, truth)]
    mean = lambda k: float(np.mean([s[k] for s in scores]))
    return dict(object_recall=mean('object_recall'), color_precision=mean('color_precision'),
                shape_precision=mean('shape_precision'), caption_tokens=float(out.mask.sum(1).float().mean()),
                example=texts[0])


# -----------------------------------------------------------------------------
# distributed wrapping and full (unsharded) state for checkpoints

def wrap(model, cfg, world_size, device):
    if cfg['fsdp']:
        from torch.distributed.fsdp import fully_shard
        blocks = model.dit.transformer_blocks if isinstance(model, TextToImage) else model.enc.model.language_model.layers
        for block in blocks:  # one all-gather per block: only one block's full weights live at a time
            fully_shard(block)
        for sub in ((model.dit, model.projector) if isinstance(model, TextToImage) else (model.enc,)):
            fully_shard(sub)
        return fully_shard(model)
    if world_size > 1:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    return model


def full_tensor(t):
    return (t.full_tensor() if hasattr(t, 'full_tensor') else t).detach().cpu()


@torch.no_grad()
def load_into(t, full):
    """Copy a full tensor into t, which may be an FSDP shard (DTensor)."""
    if hasattr(t, 'device_mesh'):
        full = torch.distributed.tensor.distribute_tensor(full.to(t.device), t.device_mesh, t.placements)
    t.copy_(full)


def full_state(model, opt):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)


def load_full_state(model, opt, model_state, optim_state):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, opt, optim_state, options=opts)


@torch.no_grad()
def swap(params, other):
    """Exchange the values of two lists of tensors (used to evaluate and export the EMA weights)."""
    for p, q in zip(params, other):
        tmp = p.detach().clone()
        p.copy_(q)
        q.copy_(tmp)


def export(cfg, kind, state, raw, enc, pooled, codec, out_dir):
    """The artefacts other scripts read: llm/ (encoder, with the projector) and, for the decoder,
    dit/ (diffusers format), pooled.safetensors and codec.safetensors. `state`: the full state dict of
    `raw` to export."""
    if kind == 'encoder':
        weights = {k[len('enc.'):]: v for k, v in state.items()}
    else:  # the frozen LLM as it is in memory (not re-read from cfg['encoder'], which may have changed on
        # disk since), with the trained projector from `state`
        weights = {**{k: v.detach().cpu() for k, v in enc.state_dict().items() if not k.startswith('projector.')},
                   **{k: v for k, v in state.items() if k.startswith('projector.')}}
    llm = Encoder(enc.config, enc.tokenizer)
    llm.load_weights(weights, 'export')
    llm.min_pixels, llm.max_pixels = enc.min_pixels, enc.max_pixels
    llm.save_pretrained(os.path.join(out_dir, 'llm'))
    if kind == 'encoder':
        return
    dit = D.MMDiT(raw.dit.config)
    dit.load_state_dict({k[len('dit.'):]: v for k, v in state.items() if k.startswith('dit.')})
    dit.save_pretrained(os.path.join(out_dir, 'dit'))
    save_safetensors({'pooled': pooled.view(-1)}, os.path.join(out_dir, 'pooled.safetensors'))
    codec.save(os.path.join(out_dir, 'codec.safetensors'))


# -----------------------------------------------------------------------------

def main():
    keep_freed_memory()
    cfg = configure(config)
    # every value is checked before anything loads
    require_positive(cfg, 'max_steps', 'log_every', 'eval_every', 'save_every', 'batch_size', 'grad_accum',
                     'eval_images', 'max_nonfinite')
    require_positive(cfg, 'warmup', 'freeze_vision_steps', 'pos_base', 'latent_weight_power', minimum=0)
    if not cfg['patch_init'] > 0:
        raise ValueError(f"config key 'patch_init' must be > 0, got {cfg['patch_init']!r}")
    require_fraction(cfg, 'caption_dropout', 'ema', 'low_sigma_share', 'low_sigma_max')
    if cfg['projector_init'] not in ('random', 'whiten'):
        raise ValueError(f"--projector_init must be 'random' or 'whiten', got {cfg['projector_init']!r}")
    kind = cfg['model']
    if kind not in ('encoder', 'decoder'):
        raise ValueError(f"--model must be 'encoder' or 'decoder', got {kind!r}")
    levels = cfg['levels'] or DEFAULT_LEVELS[kind]
    if (not isinstance(levels, dict) or not set(levels) <= set(world.CAPTION_LEVELS)
            or any(not isinstance(p, (int, float)) or p < 0 for p in levels.values()) or sum(levels.values()) <= 0):
        raise ValueError(f'--levels={levels!r}: a dict of probabilities (>= 0, not all 0) for some of '
                         f"{', '.join(world.CAPTION_LEVELS)}")
    out_dir = cfg['out_dir'] or f'out/sft_{kind}'
    rank, world_size, device = setup_distributed(cfg['device'])
    master = rank == 0
    if master:  # a new run into an earlier run's folder, a resume without checkpoint, an unusable folder
        check_run_dir(out_dir, cfg['resume'])
    B, accum = cfg['batch_size'], cfg['grad_accum']
    if B % (world_size * accum):
        raise ValueError(f'batch_size {B} must be a multiple of ranks x grad_accum = {world_size * accum}')
    per_rank = B // world_size
    micro = per_rank // accum
    step, skipped = 0, 0
    ckpt = os.path.join(out_dir, 'ckpt')
    if cfg['resume']:  # read first: a missing or damaged file is found before anything else loads
        files = ['model', 'optimizer'] + ['ema'] * (kind == 'decoder' and cfg['ema'] > 0)
        weights, meta, path = load_checkpoint(ckpt, files + ['pooled', 'codec'] * (kind == 'decoder'))
        step, skipped = meta['step'], meta.get('skipped_steps', 0)
        if step >= cfg['max_steps']:
            raise ValueError(f"{path} is at step {step} already: raise --max_steps (now {cfg['max_steps']}) to train on")
    torch.manual_seed(cfg['seed'])  # same initial weights on every rank

    train_images, train_records = world.load_split(os.path.join(cfg['data_dir'], 'train'))
    val_images, val_records = world.load_split(os.path.join(cfg['data_dir'], 'val'))
    if len(train_records) < B:
        raise ValueError(f"{os.path.join(cfg['data_dir'], 'train')}: {len(train_records)} training scenes, fewer than "
                         f'batch_size={B}')
    if kind == 'decoder':
        fit = pick_captions(train_records, range(min(1024, len(train_records))), levels, np.random.default_rng(cfg['seed']))
        raw, enc, pooled, codec = build_decoder(cfg, device, train_images, fit)
    else:
        enc, pooled, codec = build_encoder(cfg, device), None, None
        raw = CaptionScorer(enc)
    if cfg['train_only']:  # e.g. 'model.visual.': improve the captioner's eyes without moving its LLM,
        # which conditions an already trained decoder
        for n, p in raw.named_parameters():
            p.requires_grad_(p.requires_grad and any(s in n for s in cfg['train_only'].split(',')))
    model = wrap(raw, cfg, world_size, device)
    # read after wrapping: FSDP replaces the parameters by sharded ones
    names = [n for n, p in raw.named_parameters() if p.requires_grad]
    params = [p for p in raw.parameters() if p.requires_grad]
    # a slower group: the encoder's vision tower (frozen first: see freeze_vision_steps), the decoder's projector
    is_slow = [('.visual.' in n) if kind == 'encoder' else n.startswith('projector.') for n in names]
    slow = [p for p, v in zip(params, is_slow) if v]
    rest = [p for p, v in zip(params, is_slow) if not v]
    scale = cfg['vision_lr'] if kind == 'encoder' else cfg['projector_lr']
    groups = [dict(params=rest, scale=1.0)] + ([dict(params=slow, scale=scale)] if slow else [])
    opt = torch.optim.AdamW(groups, lr=cfg['lr'], betas=(cfg['beta1'], cfg['beta2']),
                            weight_decay=cfg['weight_decay'], foreach=True)
    ema = [p.detach().clone() for p in params] if (kind == 'decoder' and cfg['ema'] > 0) else None

    if cfg['resume']:  # every tensor against what this run holds, before anything is copied
        named_groups = [{n: p for n, p, v in zip(names, params, is_slow) if v == slow_group}
                        for slow_group in [False] + [True] * bool(slow)]
        expected = dict(model=raw.state_dict(), ema=dict(zip(names, params)),
                        optimizer=check_optimizer_files(weights['optimizer'], meta['optimizer'], named_groups, path))
        if kind == 'decoder':
            expected.update(pooled={'pooled': pooled.view(-1)}, codec=codec.state_dict())
        check_checkpoint({f: expected[f] for f in weights}, weights, path)
        osd = optimizer_from_files(weights['optimizer'], meta['optimizer'])
        load_full_state(model, opt, weights['model'], osd)
        if ema is not None:
            for n, e in zip(names, ema):
                load_into(e, weights['ema'][n])
        if kind == 'decoder':
            pooled = weights['pooled']['pooled'].to(device).view(1, -1)
            codec.load_state_dict(weights['codec'])
        saved = meta.get('config', {})
        changed = {k: (saved.get(k), v) for k, v in cfg.items() if saved.get(k) != v}
        if master:
            print(f'resuming {path} at step {step}' + (f'; config changes: {changed}' if changed else ''))
            truncate_log(os.path.join(out_dir, 'log.jsonl'), step)  # the rows after it are written again

    latent_weight = None  # (C,): the codec's channels' weights in the decoder's loss (latent_weight_power)
    if kind == 'decoder' and cfg['latent_weight_power']:
        w = codec.scale.float() ** cfg['latent_weight_power']
        latent_weight = (w / w.mean()).to(device)
    if master:
        n_params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(f'{kind} SFT: {n_params / 1e6:.2f}M trainable parameters, {len(train_records)} training scenes, '
              f'{world_size} rank(s), global batch {B} = {world_size} x {accum} x {micro}')
    log = open(os.path.join(out_dir, 'log.jsonl'), 'a') if master else None

    def checkpoint(step):
        model_state, optim_state = full_state(model, opt)
        ema_state = {n: full_tensor(e) for n, e in zip(names, ema)} if ema is not None else None
        if master:
            tensors, rest = optimizer_to_files(optim_state)
            weights = dict(model=model_state, optimizer=tensors)
            if ema_state is not None:
                weights['ema'] = ema_state
            if pooled is not None:
                weights['pooled'] = {'pooled': pooled.view(-1)}
            if codec is not None:  # refitting on resume is not enough: the SVD's signs depend on the thread count
                weights['codec'] = {k: v.cpu() for k, v in codec.state_dict().items()}
            save_checkpoint(ckpt, weights, dict(config=cfg, step=step, optimizer=rest,
                                                data_position=step * B, world_size=world_size,
                                                skipped_steps=skipped, rng='every draw is seeded by (seed, step)'))
        if ema is not None:
            swap(params, ema)
        state = {}
        for k, v in raw.state_dict().items():  # FSDP: gathering is a collective, every rank takes part
            t = full_tensor(v)
            if master:  # only rank 0 keeps the full weights
                state[k] = t
        if master:  # before swapping back: on the CPU, state shares memory with the parameters
            export(cfg, kind, state, raw, enc, pooled, codec, out_dir)
        if ema is not None:
            swap(params, ema)

    t0, t_start, step_start, streak = time.time(), time.time(), step, 0
    while step < cfg['max_steps']:
        lr = cfg['lr'] * min(1.0, (step + 1) / max(1, cfg['warmup']))
        if step >= cfg['warmup']:  # cosine decay to min_lr
            frac = (step - cfg['warmup']) / max(1, cfg['max_steps'] - cfg['warmup'])
            lr = cfg['min_lr'] + 0.5 * (cfg['lr'] - cfg['min_lr']) * (1 + math.cos(math.pi * frac))
        for i, g in enumerate(opt.param_groups):  # group 1, when there is one, is the slow group
            frozen = kind == 'encoder' and i == 1 and step < cfg['freeze_vision_steps']
            g['lr'] = 0.0 if frozen else lr * g['scale']
        idx = batch_indices(step, len(train_records), B, cfg['seed'])
        rng = np.random.default_rng([cfg['seed'], step, 1])
        captions = pick_captions(train_records, idx, levels, rng)
        gen = torch.Generator().manual_seed(cfg['seed'] * 1_000_003 + step)
        if kind == 'decoder':
            drop = rng.random(B) < cfg['caption_dropout']
            captions = ['' if d else c for c, d in zip(captions, drop)]
            longest = max(captions, key=lambda c: len(enc.tokenizer.encode(c)))
            sigma = train_sigmas(cfg, B, gen)
            c = raw.dit.config
            noise = torch.randn(B, c.in_channels, c.sample_size, c.sample_size, generator=gen)
        else:
            n_tokens = enc.caption_tokens(captions)[1].sum()  # normalise by the global token count
            lm_texts = [train_records[i]['captions']['complete'] for i in idx]  # what the decoder will read
            n_lm = enc.caption_tokens(lm_texts)[1].sum()
        total = torch.zeros((), device=device)
        for m in range(accum):
            sl = slice(rank * per_rank + m * micro, rank * per_rank + (m + 1) * micro)
            imgs = np.stack([train_images[i] for i in idx[sl]])
            last = m == accum - 1 or not hasattr(model, 'no_sync')  # DDP: all-reduce on the last micro-batch only
            with (contextlib.nullcontext() if last else model.no_sync()), autocast(device, cfg['dtype']):
                if kind == 'decoder':
                    loss = decoder_loss(model, enc, pooled, codec, imgs, captions[sl], sigma[sl].to(device),
                                        noise[sl].to(device), longest, latent_weight) / accum
                else:
                    loss = encoder_nll(model, enc, imgs, captions[sl]) * world_size / n_tokens
                    if cfg['lm_weight'] > 0:
                        loss = loss + cfg['lm_weight'] * encoder_lm_nll(model, enc, lm_texts[sl]) * world_size / n_lm
            loss.backward()
            total += loss.detach()
        if world_size > 1:
            dist.all_reduce(total)
            total /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg['grad_clip'])
        # the same on every rank (all-reduced): a NaN/inf loss or gradient skips the update everywhere
        streak = skip_nonfinite(total.item() + float(full_tensor(grad_norm)), streak, cfg['max_nonfinite'],
                                'loss or gradient')
        if streak:
            skipped += 1
            if master:
                print(f'step {step + 1}: non-finite loss or gradient, update skipped ({skipped} so far)', flush=True)
        else:
            opt.step()
            if ema is not None:  # warm-up: early on the average would be mostly the random initialisation
                decay = min(cfg['ema'], (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        opt.zero_grad(set_to_none=True)
        step += 1

        if master and (step % cfg['log_every'] == 0 or step == cfg['max_steps']):
            dt = time.time() - t0
            rate = (step - step_start) / (time.time() - t_start)
            eta = (cfg['max_steps'] - step) / max(rate, 1e-9)
            print(f'step {step}/{cfg["max_steps"]} | loss {total.item():.4f} | grad {float(full_tensor(grad_norm)):.2f} '
                  f'| lr {lr:.2e} | {rate:.2f} it/s | ETA {eta / 60:.1f} min', flush=True)
            log.write(json.dumps(dict(step=step, loss=total.item(), lr=lr, time=time.time() - t_start,
                                      skipped_steps=skipped)) + '\n')
            log.flush()
            t0 = time.time()
        if step % cfg['eval_every'] == 0 or step == cfg['max_steps']:
            if cfg['fsdp'] or master:  # FSDP: every rank takes part in gathering the weights
                if ema is not None:
                    swap(params, ema)
                val = evaluate(cfg, kind, raw, enc, pooled, codec, val_images, val_records, out_dir, step, device)
                if ema is not None:
                    swap(params, ema)
                if master:
                    print(f'eval step {step}: ' + ', '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v!r}'
                                                        for k, v in val.items()), flush=True)
                    log.write(json.dumps(dict(step=step, **{f'val_{k}': v for k, v in val.items()})) + '\n')
                    log.flush()
        if step % cfg['save_every'] == 0 or step == cfg['max_steps']:
            checkpoint(step)
    if world_size > 1:
        teardown_distributed()


if __name__ == '__main__':
    run(main)
