"""
Dress rehearsal at the real widths: random weights with the real architectures at reduced depth, written
in UAE's released layouts, then every real config run on them for one step, in bf16, on this machine,
with the peak memory of each phase beside the memory plan's figures (docs/memory_plan.md).

    python rehearsal.py                 # full width (SD3.5-Large D 2432, Qwen2.5-VL-3B), 2 blocks / layers
    python rehearsal.py --mode=small    # the same code path at small widths, in seconds (CI runs it)
    python rehearsal.py --mode=gpu      # the GPU acceptance run (docs/rehearsal.md); on a CPU, small

What it builds (out_dir/ckpt): llm/ (Qwen2.5-VL + UAE's projector 2048 -> 8192 -> 4096, sharded with an
index), llm_model_preprocessor/ (a small byte-level BPE tokenizer, not Qwen's 151,643 tokens: its ids
fit the model's 151,936-row vocabulary, the rest are suppressed as Qwen's unused rows are;
preprocessor_config.json), llm_lora/ (UAE's layout: three shards of a full state dict with PEFT names),
dit/ (diffusers SD3Transformer2DModel, sharded), dit_lora/ (a PEFT adapter), vae/ (diffusers AutoencoderKL
with SD3.5's config, full size: it has no depth to cut), pooled.safetensors, and CLIP-L / DINOv2-L vision
towers at their widths with 2 layers for the reward. Then train_rl.py config/uae_{g4u,u4g,coldstart}.py
and sample.py config/uae.py (i2t, t2i, recon), each in a subprocess of its own under a probe that
records the peak resident memory of each phase (model loading, caption sampling, DiT sampling, VAE
decode, log-probs, backward, ...). Results: a table, one JSON line, out_dir/report.json.
"""
import ctypes
import json
import os
import runpy
import subprocess
import sys
import time

import numpy as np
import torch

config = dict(
    mode='full',              # full: the real widths; small: tiny widths, the same code path (CI)
    out_dir='out/rehearsal',  # checkpoints in out_dir/ckpt, runs in out_dir/runs, report.json
    size=0,                   # image size in pixels; 0 = the mode's (full 128, small 32)
    max_new_tokens=0,         # caption length; 0 = the mode's (full 16, small 8)
    stages='g4u,u4g,coldstart,i2t,t2i,recon',  # which runs, comma-separated
    dtype='bfloat16',
    # the training stages' dtype ('' = dtype). On a CPU without bf16 instructions (AVX2 only) PyTorch runs
    # the backward's bf16 matmuls at ~0.25 GFLOP/s (fp32: ~45): the full-width rehearsal trains in fp32
    # there (full mode's default), its sample runs stay bf16; small mode keeps bf16 throughout
    train_dtype='',
    checks='kernels,attention,parity,rehearsal,torchrun',  # --mode=gpu: which checks
    device='auto',            # --mode=gpu: where the checks run; auto = CUDA when available, else the CPU
    rebuild=False,            # build the checkpoints again even if out_dir/ckpt holds them
    jobs=1,                   # runs at once (each its own process: the peaks stay per run; full: keep 1)
)

# the architectures. full: the real widths (Qwen2.5-VL-3B's and SD3.5-Large's config.json values), the depth cut
FULL = dict(
    llm=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=2,
             num_attention_heads=16, num_key_value_heads=2, rope_theta=1e6, mrope_section=[16, 24, 24],
             tie_word_embeddings=True, vision_depth=4, vision_hidden_size=1280, vision_intermediate_size=3420,
             vision_num_heads=16, patch_size=14, window_size=112, fullatt_block_indexes=[3]),
    projector=(8192, 4096),
    # Qwen2.5-VL's processor with max_pixels cut to 224 x 224 (16 x 16 patches = 4 windows of 112 px)
    pixels=(3136, 50176),
    dit=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm='rms_norm'),
    vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
    clip=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
              patch_size=14, image_size=224, projection_dim=768),
    dinov2=dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                image_size=518),
    lora_r=32, size=128, max_new_tokens=16,
)
SMALL = dict(
    llm=dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=1e6, mrope_section=[2, 3, 3], tie_word_embeddings=True,
             vision_depth=4, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2,
             patch_size=4, window_size=16, fullatt_block_indexes=[3]),
    projector=(96, 32),
    pixels=(256, 1024),
    dit=dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
             out_channels=16, pos_embed_max_size=16, qk_norm='rms_norm'),
    vae=dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4),
    clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
              image_size=224, projection_dim=16),
    dinov2=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                image_size=518),
    lora_r=4, size=32, max_new_tokens=8,
)
LLM_TARGETS = r'model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)'
DIT_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out']
ROOT = os.path.dirname(os.path.abspath(__file__))
GB = 1e9


# -----------------------------------------------------------------------------
# the checkpoints, in the released layouts

def save_sharded(state, directory, stem, shards):
    """state in `shards` safetensors files + stem.safetensors.index.json, as save_pretrained shards."""
    from common import save_safetensors
    os.makedirs(directory, exist_ok=True)
    keys = sorted(state)
    size = sum(state[k].numel() * state[k].element_size() for k in keys)
    bounds = np.linspace(0, len(keys), shards + 1).astype(int)
    weight_map = {}
    for i in range(shards):
        name = f'{stem}-{i + 1:05d}-of-{shards:05d}.safetensors'
        part = {k: state[k].contiguous() for k in keys[bounds[i]:bounds[i + 1]]}
        save_safetensors(part, os.path.join(directory, name), metadata={'format': 'pt'})
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, f'{stem}.safetensors.index.json'), 'w') as f:
        json.dump(dict(metadata=dict(total_size=size), weight_map=weight_map), f, indent=2)


def randomize(model, std=0.02):
    """Random weights of the scale a trained model has (zero-initialised gates would hide dtype bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            elif 'norm' in name:
                p.normal_(1, std)
            else:
                p.normal_(0, std)
    return model


def uae_lora_key(key, lora_names):
    """Our key -> the name in UAE's llm_lora shards (transformers 4.50 layout, the text decoder wrapped by
    peft): visual.*, model.base_model.model.* (with base_layer / lora_A.default), lm_head, projector."""
    if key.startswith('model.visual.'):
        return key[len('model.'):]
    if not key.startswith('model.language_model.'):
        return key
    key = key[len('model.language_model.'):]
    layer, _, leaf = key.rpartition('.')
    if f'model.language_model.{layer}' in lora_names:  # the wrapped Linear's own weight and bias
        key = f'{layer}.base_layer.{leaf}'
    elif layer.endswith(('.lora_A', '.lora_B')):
        key = f'{layer}.default.{leaf}'
    return 'model.base_model.model.' + key


def build(cfg, arch, d):
    """Every checkpoint directory under d; returns the parameter counts."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    import model_decoder as D
    from common import save_safetensors
    from images import CLIP_MEAN, CLIP_STD
    from lora import apply_lora, base_state_dict, lora_layers, save_peft
    from model_encoder import Encoder, EncoderConfig
    from tokenizer import Tokenizer
    dtype = getattr(torch, cfg['dtype'])
    torch.manual_seed(0)
    counts = {}
    # the processor directory: the toy's byte-level BPE tokenizer (502 tokens + Qwen's 6 special ones)
    proc = os.path.join(d, 'llm_model_preprocessor')
    os.makedirs(proc, exist_ok=True)
    with open(os.path.join(ROOT, 'checkpoints/toy/llm/tokenizer.json')) as f:
        text = f.read()
    with open(os.path.join(proc, 'tokenizer.json'), 'w') as f:
        f.write(text)
    tok = Tokenizer.from_pretrained(proc)
    c = EncoderConfig(**arch['llm'], image_token_id=tok.added['<|image_pad|>'],
                      vision_start_token_id=tok.added['<|vision_start|>'],
                      vision_end_token_id=tok.added['<|vision_end|>'], eos_token_id=tok.added['<|im_end|>'])
    c.projector_hidden_size, c.projector_out_size = arch['projector']
    with open(os.path.join(proc, 'preprocessor_config.json'), 'w') as f:
        json.dump(dict(image_processor_type='Qwen2VLImageProcessor', min_pixels=arch['pixels'][0],
                       max_pixels=arch['pixels'][1], patch_size=c.patch_size, merge_size=c.spatial_merge_size,
                       temporal_patch_size=c.temporal_patch_size, image_mean=CLIP_MEAN, image_std=CLIP_STD), f)
    # llm/: Qwen2.5-VL's weights + UAE's projector, bf16, sharded with an index; no tokenizer (UAE's has none)
    torch.set_default_dtype(dtype)  # made in bf16: full depth in fp32 would need 48 GB of host memory
    try:
        enc = Encoder(c)  # Encoder's own init: N(0, 0.02), as transformers'
        dit = randomize(D.MMDiT(D.MMDiTConfig(**arch['dit'])))
    finally:
        torch.set_default_dtype(torch.float32)
    counts['encoder'] = sum(p.numel() for p in enc.parameters())  # the tied lm_head counted once
    counts['projector'] = sum(p.numel() for p in enc.projector.parameters())
    state = base_state_dict(enc)
    state.pop('lm_head.weight')  # tied to the embedding: transformers saves one copy
    save_sharded(state, os.path.join(d, 'llm'), 'model', 3)
    hf = {k: v for k, v in c.to_hf().items() if not k.startswith('projector')}
    with open(os.path.join(d, 'llm', 'config.json'), 'w') as f:
        json.dump(hf, f, indent=2)
    eos = [tok.added['<|im_end|>'], tok.added['<|endoftext|>']]
    with open(os.path.join(d, 'llm', 'generation_config.json'), 'w') as f:  # Qwen2.5-VL's, greedy in effect
        json.dump(dict(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05,
                       eos_token_id=eos), f)
    # llm_lora/: UAE's stage-2 LoRA (r 32, alpha 64) on every linear layer of the LLM, saved as the whole
    # state dict in three shards under PEFT's names
    names = apply_lora(enc, LLM_TARGETS, arch['lora_r'], 2 * arch['lora_r'])
    with torch.no_grad():
        for m in lora_layers(enc).values():
            m.lora_B.weight.normal_(0, 0.02)
    state = {uae_lora_key(k, set(names)): v.to(dtype) for k, v in enc.state_dict().items()}
    save_sharded(state, os.path.join(d, 'llm_lora'), 'model', 3)
    counts['llm_lora'] = sum(p.numel() for n, p in enc.named_parameters() if 'lora_' in n)
    del enc, state
    # dit/ and dit_lora/: SD3.5's MMDiT (diffusers layout, sharded) and a PEFT adapter on it
    counts['dit'] = sum(p.numel() for p in dit.parameters())
    save_sharded(base_state_dict(dit), os.path.join(d, 'dit'), 'diffusion_pytorch_model', 2)
    with open(os.path.join(d, 'dit', 'config.json'), 'w') as f:
        json.dump(dit.config.to_dict(), f, indent=2)
    apply_lora(dit, DIT_TARGETS, arch['lora_r'], 2 * arch['lora_r'])
    with torch.no_grad():
        for m in lora_layers(dit).values():
            m.lora_B.weight.normal_(0, 0.02)
    save_peft(dit, os.path.join(d, 'dit_lora'), os.path.join(d, 'dit'))
    counts['dit_lora'] = sum(p.numel() for n, p in dit.named_parameters() if 'lora_' in n)
    del dit
    # vae/: SD3.5's AutoencoderKL config (16 latent channels, no quant convs, its scaling and shift)
    v = arch['vae']
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, sample_size=1024,
                        down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4,
                        block_out_channels=v['block_out_channels'], layers_per_block=v['layers_per_block'],
                        norm_num_groups=v['norm_num_groups'], scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    counts['vae'] = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(os.path.join(d, 'vae'))
    save_safetensors({'pooled': torch.randn(arch['dit']['pooled_projection_dim'])}, os.path.join(d, 'pooled.safetensors'))
    # the reward's embedders: CLIP-L/14 and DINOv2-L vision towers at their widths, 2 layers
    clip = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**arch['clip'])))
    clip.save_pretrained(os.path.join(d, 'clip'))
    dino = randomize(Dinov2Model(Dinov2Config(**arch['dinov2'], layer_norm_eps=1e-6)))
    dino.save_pretrained(os.path.join(d, 'dinov2'))
    counts['reward'] = sum(p.numel() for m in (clip, dino) for p in m.parameters())
    # data: random photos of varied sizes in train/ and val/
    rng = np.random.default_rng(0)
    from PIL import Image
    for split, n in (('train', 2), ('val', 1)):
        os.makedirs(os.path.join(d, 'images', split), exist_ok=True)
        for i in range(n):
            h, w = rng.integers(200, 400, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(d, 'images', split, f'{i}.png'))
    with open(os.path.join(d, 'counts.json'), 'w') as f:
        json.dump(dict(counts, mode=cfg['mode']), f)
    return counts


# -----------------------------------------------------------------------------
# the probe: peak resident memory per phase of a script run in this process

# (module, attribute, phase): each call of these, when not inside another, is one phase. The scripts
# import them by name after the patch, so they see the wrapped ones
PHASES = [('pipeline', 'load_uae', 'load models'), ('embedders', 'load_embedder', 'load reward'),
          ('model_encoder', 'Encoder.generate', 'captions (generate)'),
          ('model_encoder', 'Encoder.embed_prompt', 'embed prompts'),
          ('model_encoder', 'Encoder.hidden_states', 'encoder forward'),
          ('model_encoder', 'Encoder.token_logprobs', 'encoder log-probs'),
          ('model_decoder', 'sample', 'DiT sampling'), ('model_decoder', 'decode', 'VAE decode'),
          ('model_decoder', 'transition_logprob', 'DiT transition log-prob'),
          ('embedders', 'similarities', 'reward'), ('torch', 'Tensor.backward', 'backward')]


CUDA = []  # set by probe() when the run is on a GPU: then memory is torch.cuda's allocator's


def memory():
    """(in use now, peak since the last reset) in bytes: on a GPU torch.cuda's allocated memory (what the
    memory plan counts), else the resident size of this process from /proc/self/status."""
    if CUDA:
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    f = {l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmRSS', 'VmHWM'))}
    return int(f['VmRSS']) * 1024, int(f['VmHWM']) * 1024


def reset_peak():
    """Hand freed heap back to the kernel, then reset the peak to the resident size (Linux >= 4.0)."""
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL(None).malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def shapes(args, kwargs):
    """What a phase worked on, for the plan's per-token figures: the shapes of its tensor arguments."""
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(list(a.shape))
        elif isinstance(a, dict):
            out.append({k: list(v.shape) for k, v in a.items() if isinstance(v, torch.Tensor)})
    return out


def probe(script, argv, path):
    """Run script with argv in this process, each phase's peak memory written to path as JSON."""
    import importlib
    if any(a.startswith('--device=cuda') for a in argv):
        CUDA.append(True)
    phases, depth = [], [0]
    peak = dict(between=0)

    def wrap(fn, name):
        def wrapped(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            peak['between'] = max(peak['between'], memory()[1])
            reset_peak()
            start = memory()[0]
            t0 = time.time()
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                grad = torch.is_grad_enabled() and name not in ('backward', 'load models', 'load reward')
                phases.append(dict(phase=name + (' [grad]' if grad else ''), start=start, peak=memory()[1],
                                   seconds=time.time() - t0, shapes=shapes(args[1:] if args else (), kwargs)))
                reset_peak()
        return wrapped

    if not CUDA:
        # a CPU without bf16 instructions (AVX2 only) runs bf16 convolutions ~90x slower than fp32 (18 s
        # against 0.2 s for one 512-channel 3x3 conv at 32 x 32): the VAE, which autocast would run in bf16,
        # runs in fp32 here, its activations twice the bf16 size the memory plan counts
        import model_decoder
        decode = model_decoder.VAE.decode
        def fp32_decode(self, latents):
            with torch.autocast('cpu', enabled=False):
                return decode(self, latents)
        model_decoder.VAE.decode = fp32_decode
    for module, attr, name in PHASES:
        obj = importlib.import_module(module)
        *owner, leaf = attr.split('.')
        for o in owner:
            obj = getattr(obj, o)
        setattr(obj, leaf, wrap(getattr(obj, leaf), name))
    sys.argv = [script, *argv]
    t0 = time.time()
    try:
        runpy.run_path(script, run_name='__main__')
    finally:
        peak['between'] = max(peak['between'], memory()[1])
        with open(path, 'w') as f:
            json.dump(dict(phases=phases, between=peak['between'], seconds=time.time() - t0), f)


# -----------------------------------------------------------------------------
# the runs and the memory plan's figures for them

def runs(cfg, d, size, T, device='cpu', real=False, tag=''):
    """name -> command line (script, args) of every run: the real configs with paths and sizes cut.
    real: keep the configs' group sizes, micro-batches and sampling steps (the GPU run); else 2 of each."""
    paths = dict(llm=f'{d}/llm', processor=f'{d}/llm_model_preprocessor', dit=f'{d}/dit', vae=f'{d}/vae',
                 pooled=f'{d}/pooled.safetensors')
    common = dict(paths, size=size, max_new_tokens=T, device=device, dtype=cfg['dtype'])
    train_dtype = cfg.get('train_dtype') or cfg['dtype']
    train = dict(common, data_dir=f'{d}/images', steps=1, images_per_step=1, eval_every=1, eval_images=1,
                 eval_steps=1, eval_batch=1, save_every=1,
                 reward_paths={'clip': f'{d}/clip', 'dinov2': f'{d}/dinov2'})
    out = {}
    runs_dir = os.path.join(cfg['out_dir'], 'runs', time.strftime('%Y%m%d-%H%M%S') + tag)
    cut = lambda **kw: {} if real else kw
    for stage, extra in (('g4u', cut(group_size=2, micro_batch=2, sample_steps=2)),
                         ('u4g', dict(cut(group_size=2, micro_batch=2, sample_steps=2), llm_lora=f'{d}/llm_lora')),
                         ('coldstart', cut(coldstart_steps=2))):
        out[tag + stage] = ('train_rl.py', f'config/uae_{stage}.py',
                      dict(train, **extra, dtype=train_dtype, out_dir=os.path.join(runs_dir, stage)))
    sample = dict(common, llm_lora=f'{d}/llm_lora', dit_lora=f'{d}/dit_lora', steps=2, seed=0)
    photo = f'{d}/images/val/0.png'
    out[tag + 'i2t'] = ('sample.py', 'config/uae.py', dict(sample, mode='i2t', image=photo))
    out[tag + 't2i'] = ('sample.py', 'config/uae.py', dict(sample, mode='t2i', prompt='a red circle on a blue square',
                                                     out=os.path.join(runs_dir, 't2i.png')))
    out[tag + 'recon'] = ('sample.py', 'config/uae.py', dict(sample, mode='recon', image=photo,
                                                       out=os.path.join(runs_dir, 'recon.png')))
    return out


def plan_bytes(phase, shapes, arch, b=2, vae_b=2):
    """The memory plan's estimate of what one phase adds on top of the weights (bytes), from the shapes
    it was called with; None where the plan gives no per-token figure. The plan's figures, scaled:
    DiT block kept for backward 22 D values per token (bf16), checkpointed 1 D per block and token plus
    one block; DiT without grad 10 D live per token; LLM layer kept for backward 61 K values per token,
    logits 14 B x vocabulary per caption token; VAE decode 2.5 GB at 1024^2 (no grad), 3.5 GB at 512^2
    with the backward, both scaled by the pixels. b: bytes per activation value (the plan's 2, bf16; 4 in
    fp32); the VAE runs in fp32 on the CPU (probe), in bf16 under autocast on a GPU."""
    D = arch['dit']['num_attention_heads'] * arch['dit']['attention_head_dim']
    nb, nl, V = arch['dit']['num_layers'], arch['llm']['num_hidden_layers'], arch['llm']['vocab_size']
    H = arch['llm']['hidden_size']
    if phase.startswith(('DiT sampling', 'DiT transition')):
        # sample(model, context, pooled, neg, neg_pooled, ..., noise=(B, C, h, w)) / transition (t, context, ...)
        ctx = next(s for s in shapes if isinstance(s, list) and len(s) == 3)
        lat = [s for s in shapes if isinstance(s, list) and len(s) == 4]
        x = next((s for s in shapes if isinstance(s, dict) and 'x' in s), {}).get('x') or (lat[0] if lat else None)
        if x is None:
            return None
        p = arch['dit']['patch_size']
        rows = 2 * ctx[0] if phase.startswith('DiT transition') or len(shapes) > 3 else ctx[0]  # CFG
        tokens = rows * (x[2] * x[3] // p ** 2 + ctx[1])
        if '[grad]' not in phase:
            return tokens * 10 * D * b
        steps = 1 if phase.startswith('DiT transition') else None
        return tokens * (nb * D * b * (steps or 2) + 22 * D * b)  # checkpointed (the configs turn it on)
    if phase.startswith('VAE decode'):
        z = shapes[0] if shapes and isinstance(shapes[0], list) else None
        if z is None or len(z) != 4:
            return None
        pixels = z[0] * (z[2] * 8) * (z[3] * 8) * vae_b / 2
        return pixels / 1024 ** 2 * 2.5 * GB if '[grad]' not in phase else pixels / 512 ** 2 * 3.5 * GB
    if phase.startswith('encoder log-probs'):
        batch, tokens = shapes[0], shapes[1]
        n = tokens[0] * (batch['input_ids'][1] + tokens[1])
        act = n * nl * 61_000 * b * (H / 2048) if '[grad]' in phase else 0
        return act + tokens[0] * tokens[1] * 14 * V
    return None


def summarize(name, result, arch, b=2, vae_b=2):
    rows = []
    for p in result['phases']:
        est = plan_bytes(p['phase'], p['shapes'], arch, b, vae_b)
        rows.append(dict(run=name, phase=p['phase'], start_gb=p['start'] / GB, peak_gb=p['peak'] / GB,
                         added_gb=(p['peak'] - p['start']) / GB, plan_added_gb=None if est is None else est / GB,
                         seconds=p['seconds']))
    # merge repeated phases: the largest peak, the largest addition
    merged = {}
    for r in rows:
        m = merged.setdefault(r['phase'], dict(r, calls=0))
        m['calls'] += 1
        for k in ('peak_gb', 'added_gb', 'start_gb'):
            m[k] = max(m[k], r[k])
        if r['plan_added_gb'] is not None:
            m['plan_added_gb'] = max(m['plan_added_gb'] or 0, r['plan_added_gb'])
        m['seconds'] = m['seconds'] + r['seconds'] if m['calls'] > 1 else r['seconds']
    return list(merged.values())


def finish(name, p, t0, phases_file, log, command, arch):
    """Wait for one run; its summary (phases, peak, the command, the end of its log if it failed)."""
    ok = p.wait() == 0
    log.close()
    run = dict(ok=ok, seconds=time.time() - t0, command=command)
    if not ok:
        with open(log.name) as f:
            run['error'] = f.read()[-3000:]
        print(f"{name}: FAILED\n{run['error']}", flush=True)
    if os.path.exists(phases_file):
        with open(phases_file) as f:
            result = json.load(f)
        b = 4 if '--dtype=float32' in command else 2
        run['phases'] = summarize(name, result, arch, b, 4 if '--device=cpu' in command else 2)
        run['peak_gb'] = max([result['between']] + [x['peak'] for x in result['phases']]) / GB
    print(f"{name}: {'ok' if ok else 'FAILED'} in {run['seconds']:.0f} s, peak "
          f"{run.get('peak_gb', float('nan')):.2f} GB", flush=True)
    return run


def rehearse(todo, arch, out_dir, jobs=1):
    """Run every (script, config, overrides) of todo under the probe, jobs at a time -> {name: summary}."""
    os.makedirs(out_dir, exist_ok=True)
    started, done = {}, {}
    for i, (name, (script, conf, kw)) in enumerate(todo.items()):
        args = [conf] + [f'--{k}={v!r}' if isinstance(v, dict) else f'--{k}={v}' for k, v in kw.items()]
        phases_file = os.path.join(out_dir, f'phases_{name}.json')
        if os.path.exists(phases_file):
            os.remove(phases_file)
        log = open(os.path.join(out_dir, f'{name}.log'), 'w')
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), 'probe', script, phases_file, *args],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        started[name] = (p, time.time(), phases_file, log, ' '.join(['python', script, *args]))
        if len(started) - len(done) >= jobs or i == len(todo) - 1:
            for n, job in started.items():
                if n not in done:
                    done[n] = finish(n, *job, arch)
    return done


def print_table(report):
    print(f"\n{'run':<14} {'phase':<32} {'calls':>5} {'start GB':>9} {'peak GB':>8} {'added GB':>9} "
          f"{'plan GB':>8} {'s':>6}")
    for name, run in report['runs'].items():
        for r in run.get('phases', []):
            plan = '' if r['plan_added_gb'] is None else f"{r['plan_added_gb']:.3f}"
            print(f"{name:<14} {r['phase']:<32} {r['calls']:>5} {r['start_gb']:>9.2f} {r['peak_gb']:>8.2f} "
                  f"{r['added_gb']:>9.3f} {plan:>8} {r['seconds']:>6.1f}")


def plan_weights(counts, dtype):
    """The weights as the memory plan counts them: frozen encoder + DiT in the run's dtype, the trained
    LoRA at 16 B/param (fp32 weight, gradient, two AdamW moments), VAE and reward embedders in fp32."""
    b = torch.finfo(getattr(torch, dtype)).bits // 8
    return dict(frozen=(counts['encoder'] + counts['dit']) * b / GB, vae_fp32=counts['vae'] * 4 / GB,
                reward_fp32=counts['reward'] * 4 / GB, llm_lora_adamw=counts['llm_lora'] * 16 / GB,
                dit_lora_adamw=counts['dit_lora'] * 16 / GB)


def checkpoints(cfg, arch, mode):
    d = os.path.join(cfg['out_dir'], 'ckpt', mode)
    if cfg['rebuild'] or not os.path.exists(os.path.join(d, 'counts.json')):
        t0 = time.time()
        print(f'building {mode} checkpoints in {d} ...', flush=True)
        build(dict(cfg, mode=mode), arch, d)
        print(f'built in {time.time() - t0:.0f} s', flush=True)
    with open(os.path.join(d, 'counts.json')) as f:
        return d, json.load(f)


# -----------------------------------------------------------------------------
# the GPU acceptance run: what a lent GPU should run first

# full depth: SD3.5-Large's 38 blocks, Qwen2.5-VL-3B's 36 layers and 32 vision blocks
DEEP = dict(FULL, llm=dict(FULL['llm'], num_hidden_layers=36, vision_depth=32, fullatt_block_indexes=[7, 15, 23, 31]),
            dit=dict(FULL['dit'], num_layers=38), pixels=(3136, 65536))


def command(name, argv, env=None, timeout=None):
    """Run one check's command -> dict(ok, seconds, command, output tail)."""
    t0 = time.time()
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    out = (p.stdout + p.stderr).strip()
    print(f"{name}: {'ok' if p.returncode == 0 else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    return dict(ok=p.returncode == 0, seconds=time.time() - t0, command=' '.join(argv), output=out[-4000:])


def gpu_acceptance(cfg):
    """On CUDA: the kernel tests (bf16 too), attention speed Triton vs SDPA, decoder and encoder parity with
    diffusers / transformers in fp32 and bf16 (tools/parity.py), the rehearsal at full depth at
    512^2 and 1024^2 with torch.cuda.max_memory_allocated per phase, and a two-step G4U under torchrun on
    all GPUs. Without CUDA, the same steps at the small widths (the rehearsal, torchrun on 2 CPU ranks
    over gloo), and every GPU-only check listed as not exercised."""
    from common import pick_device, read_json
    device = pick_device(cfg['device'])
    cuda = device.type == 'cuda'
    n_gpu = torch.cuda.device_count() if cuda else 0
    py = sys.executable
    report = dict(device=torch.cuda.get_device_name(device) if cuda else 'cpu', gpus=n_gpu, checks={},
                  not_exercised=[])
    checks, todo_checks = report['checks'], cfg['checks'].split(',')
    unknown = sorted(set(todo_checks) - {'kernels', 'attention', 'parity', 'rehearsal', 'torchrun'})
    if unknown:
        raise ValueError(f'--checks: unknown {unknown}; choose from kernels,attention,parity,rehearsal,torchrun')
    # 1. the Triton kernels against float64 attention, forward and backward (bf16 only on a GPU)
    if 'kernels' in todo_checks:
        checks['kernel tests'] = command('kernel tests', [py, '-m', 'pytest', '-q', 'tests/test_kernels.py'])
    if not cuda:
        report['not_exercised'].append('Triton kernels compiled, and in bf16 (the CPU runs the interpreter, '
                                       'fp32 / fp16 only)')
    # 2. attention speed at SD3.5-Large and Qwen2.5-VL shapes (bench_speed.py's attention task)
    if cuda and 'attention' in todo_checks:
        checks['attention speed'] = command('attention speed', [py, 'bench_speed.py', '--task', 'attention'])
    elif not cuda:
        report['not_exercised'].append('attention speed, Triton vs SDPA (bench_speed.py --task attention)')
    # 3. decoder and encoder parity against diffusers / transformers on the device, fp32 and bf16
    if 'parity' in todo_checks:
        out = os.path.join(cfg['out_dir'], 'gpu', 'parity.json')
        if os.path.exists(out):
            os.remove(out)  # a crashed check must not report the last run's figures
        checks['parity'] = command('parity', [py, 'tools/parity.py', f'--device={device}', f'--out={out}'])
        report['parity'] = read_json(out) if os.path.exists(out) else {}
    if not cuda:
        report['not_exercised'].append('decoder / encoder parity on CUDA in bf16 (ran: on the CPU, tiny configs)')
    # 4. the rehearsal: full depth on a GPU at 512 and 1024, else the small widths
    mode, arch = ('deep', DEEP) if cuda else ('small', SMALL)
    d, counts = checkpoints(cfg, arch, mode)
    todo = {}
    for size in ((512, 1024) if cuda else (arch['size'],)) if 'rehearsal' in todo_checks else ():
        T = 512 if cuda else arch['max_new_tokens']  # random weights caption to the limit: the worst case
        todo.update({k: v for k, v in runs(cfg, d, size, T, str(device), real=cuda, tag=f'{size}_').items()
                     if not k.endswith(('i2t', 't2i'))})
    t0 = time.time()
    report['rehearsal'] = dict(mode=mode, parameters=counts, plan_weights_gb=plan_weights(counts, cfg['dtype']),
                               runs=rehearse(todo, arch, os.path.join(cfg['out_dir'], 'gpu'), cfg['jobs']))
    for name, run in report['rehearsal']['runs'].items():
        rollouts = [p for p in run.get('phases', []) if p['phase'] == 'DiT sampling']
        if rollouts:  # images drawn per second of DiT sampling (rollouts and evaluation alike)
            run['sampling_seconds'] = sum(p['seconds'] for p in rollouts)
    if todo:
        checks['rehearsal'] = dict(ok=all(r['ok'] for r in report['rehearsal']['runs'].values()),
                                   seconds=time.time() - t0)
    if not cuda:
        report['not_exercised'].append('the rehearsal at full depth (8.1 B + 3.75 B parameters: 24 GB in bf16, '
                                       'beyond this machine) and torch.cuda.max_memory_allocated per phase')
    # 5. G4U for two steps on every GPU (torchrun), or on 2 CPU ranks over gloo
    ranks = n_gpu if n_gpu > 1 else 2
    if 'torchrun' not in todo_checks:
        pass
    elif cuda and n_gpu < 2:
        report['not_exercised'].append('torchrun G4U on several GPUs (one GPU visible)')
    else:
        g4u = runs(cfg, d, arch['size'] if not cuda else 512, 16 if cuda else arch['max_new_tokens'], str(device),
                   tag='torchrun_')['torchrun_g4u'][2]
        kw = dict(g4u, steps=2, images_per_step=ranks, eval_every=2, save_every=2)
        kw['data_dir'] = os.path.join(cfg['out_dir'], 'gpu', 'torchrun_images')
        for split, n in (('train', ranks), ('val', 1)):  # enough images for every rank
            os.makedirs(os.path.join(kw['data_dir'], split), exist_ok=True)
            for i in range(n):  # the 2 train / 1 val images built, linked again under more names
                src = os.path.join(d, 'images', split, f"{i % (2 if split == 'train' else 1)}.png")
                dst = os.path.join(kw['data_dir'], split, f'{i}.png')
                if not os.path.exists(dst):
                    os.symlink(src, dst)
        args = [f'--{k}={v!r}' if isinstance(v, dict) else f'--{k}={v}' for k, v in kw.items()]
        checks['torchrun g4u'] = command(f'torchrun g4u ({ranks} ranks)', [
            py, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}', 'train_rl.py',
            'config/uae_g4u.py', *args])
        checks['torchrun g4u']['in_sync'] = 'ranks in sync' in checks['torchrun g4u']['output']
        if not cuda:
            report['not_exercised'].append('torchrun over NCCL on several GPUs (ran: 2 CPU ranks over gloo)')
    report['ok'] = all(c['ok'] for c in checks.values()) and checks.get('torchrun g4u', {}).get('in_sync', True)
    return report


def main():
    from common import configure, read_json, require_positive, save_json
    cfg = configure(config)
    require_positive(cfg, 'size', 'max_new_tokens', minimum=0)
    require_positive(cfg, 'jobs')
    if cfg['mode'] not in ('full', 'small', 'gpu'):
        raise ValueError(f"--mode={cfg['mode']}: full, small or gpu")
    cfg['out_dir'] = os.path.abspath(cfg['out_dir'])
    t_start = time.time()
    if cfg['mode'] == 'gpu':
        report = gpu_acceptance(cfg)
        report['seconds'] = time.time() - t_start
        print_table(report['rehearsal'])
        print(f"\n{'check':<16} {'ok':<4} {'s':>6}")
        for name, c in report['checks'].items():
            print(f"{name:<16} {'yes' if c['ok'] else 'NO':<4} {c.get('seconds', 0):>6.0f}")
        for check in ('attention speed', 'parity'):  # their own tables
            for o in report['checks'].get(check, {}).get('output', '').splitlines():
                if o.startswith('|'):
                    print(o)
        print('not exercised here:' + ''.join(f'\n  - {x}' for x in report['not_exercised']))
        line = dict(mode='gpu', ok=report['ok'], device=report['device'], gpus=report['gpus'],
                    seconds=round(report['seconds']), checks={k: c['ok'] for k, c in report['checks'].items()},
                    parity={k: {e: float(f'{r[e]:.2e}') for e in ('fp32', 'bf16', 'bf16_reference')}
                            for k, r in report.get('parity', {}).items()},
                    peaks_gb={k: round(r.get('peak_gb', float('nan')), 3)
                              for k, r in report['rehearsal']['runs'].items()})
    else:
        arch = FULL if cfg['mode'] == 'full' else SMALL
        if cfg['mode'] == 'full' and not cfg['train_dtype'] and cfg['dtype'] == 'bfloat16':
            cfg['train_dtype'] = 'float32'  # see train_dtype above
        size, T = cfg['size'] or arch['size'], cfg['max_new_tokens'] or arch['max_new_tokens']
        if size % 16:
            raise ValueError(f'--size={size}: give a multiple of 16 (VAE factor 8 x patch 2)')
        stages = [s for s in cfg['stages'].split(',') if s]
        unknown = sorted(set(stages) - {'g4u', 'u4g', 'coldstart', 'i2t', 't2i', 'recon'})
        if unknown:
            raise ValueError(f'--stages: unknown {unknown}; choose from g4u,u4g,coldstart,i2t,t2i,recon')
        d, counts = checkpoints(cfg, arch, cfg['mode'])
        todo = {n: r for n, r in runs(cfg, d, size, T).items() if n in stages}
        report = dict(mode=cfg['mode'], size=size, max_new_tokens=T, dtype=cfg['dtype'],
                      train_dtype=cfg['train_dtype'] or cfg['dtype'], parameters=counts,
                      plan_weights_gb=plan_weights(counts, cfg['dtype']),
                      runs=rehearse(todo, arch, cfg['out_dir'], cfg['jobs']))
        # runs not asked for this time are kept from the last report of the same mode and size
        last = os.path.join(cfg['out_dir'], 'report.json')
        if os.path.exists(last):
            old = read_json(last)
            if (old.get('mode'), old.get('size'), old.get('max_new_tokens')) == (cfg['mode'], size, T):
                kept = {k: dict(r, kept_from_last_report=True) for k, r in old['runs'].items() if k not in todo}
                report['runs'] = dict(kept, **report['runs'])
        report['seconds'] = time.time() - t_start
        report['ok'] = all(r['ok'] for r in report['runs'].values()) and set(stages) <= set(report['runs'])
        print_table(report)
        w = report['plan_weights_gb']
        print(f"weights by the plan's count: frozen encoder + DiT {w['frozen']:.2f} GB ({cfg['dtype']}), VAE "
              f"{w['vae_fp32']:.2f} GB, reward embedders {w['reward_fp32']:.2f} GB (fp32), LoRA + AdamW "
              f"{w['llm_lora_adamw'] + w['dit_lora_adamw']:.3f} GB")
        line = dict(mode=report['mode'], ok=report['ok'], seconds=round(report['seconds']),
                    peaks_gb={k: round(r.get('peak_gb', float('nan')), 3) for k, r in report['runs'].items()})
    os.makedirs(cfg['out_dir'], exist_ok=True)
    save_json(report, os.path.join(cfg['out_dir'], 'report.json'))
    print(json.dumps(line))
    if not report['ok']:
        sys.exit(1)


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'probe':  # python rehearsal.py probe SCRIPT PHASES.json ARGS...
        sys.path.insert(0, ROOT)
        probe(sys.argv[2], sys.argv[4:], sys.argv[3])
    else:
        from common import run
        run(main)
