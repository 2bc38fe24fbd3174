"""
Speed benchmarks, each against the reference implementation with the same weights, in one process
(the machine's load moves both sides alike: read the ratios, not the times).

    python bench_speed.py --task decoder     # our MMDiT against diffusers' SD3Transformer2DModel
    python bench_speed.py --task encoder     # our caption sampler against transformers' generate
    python bench_speed.py --task attention   # the Triton attention kernels against SDPA (CUDA only)

Each task takes --key=value options (see its config dict). Results and their history: docs/results.md.
"""
import json
import os
import sys
import time

import torch

from common import keep_freed_memory


def timeit(fn, warmup=2, iters=5):
    """Median wall time of fn() in seconds (synchronising CUDA when present)."""
    times = []
    for i in range(warmup + iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# -----------------------------------------------------------------------------
# task: decoder

# (layers, heads x 64, batch, input channels, input side -> patch-2 image tokens, text tokens, widths);
# SD3.5 style (qk RMSNorm), like UAE's decoder
DECODER_SIZES = {
    'toy': dict(num_layers=4, num_attention_heads=2, batch=32, in_channels=3, side=16, text=48,
                joint_attention_dim=128, pooled_projection_dim=128),   # 64 image tokens
    'small': dict(num_layers=8, num_attention_heads=6, batch=8, in_channels=16, side=32, text=77,
                  joint_attention_dim=4096, pooled_projection_dim=2048),  # 256 image tokens
}


def interleaved_times(fns, warmup, iters, clock=time.perf_counter):
    """Median time of each fn, measured in alternation so that machine noise hits all alike.
    clock=time.process_time counts this process's CPU time only (CPU runs on a shared machine)."""
    times = [[] for _ in fns]
    for i in range(warmup + iters):
        for fn, ts in zip(fns, times):
            t0 = clock()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                ts.append(clock() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def bench_decoder(args):
    """Our MMDiT against diffusers' SD3Transformer2DModel with the same weights: a training step
    (forward + backward + AdamW) and a sampling step (forward, no_grad), fp32 and bf16 autocast."""
    from diffusers import SD3Transformer2DModel
    from common import autocast, configure, load_state_dict_strict, pick_device
    from model_decoder import MMDiT, MMDiTConfig
    config = dict(sizes='toy,small', dtypes='float32,bfloat16', warmup=2, iters=7, device='auto', seed=0,
                  threads=0, clock='wall')
    # threads: torch CPU threads, 0 = torch's default; clock: 'wall' or 'cpu' (process CPU time).
    # On a busy shared CPU, --threads=1 --clock=cpu gives the steadiest ratios.
    configure(config, args)
    device = pick_device(config['device'])
    if config['threads']:
        torch.set_num_threads(config['threads'])
    clock = {'wall': time.perf_counter, 'cpu': time.process_time}[config['clock']]
    rows = []
    for size in config['sizes'].split(','):
        s = dict(DECODER_SIZES[size])
        batch, side, text = s.pop('batch'), s.pop('side'), s.pop('text')
        cfg = dict(s, attention_head_dim=64, caption_projection_dim=64 * s['num_attention_heads'], qk_norm='rms_norm',
                   out_channels=s['in_channels'], patch_size=2, sample_size=side, pos_embed_max_size=side)
        torch.manual_seed(config['seed'])
        ref = SD3Transformer2DModel(**cfg).to(device).train()
        ours = MMDiT(MMDiTConfig(**cfg)).to(device).train()
        load_state_dict_strict(ours, ref.state_dict(), 'diffusers model')
        g = torch.Generator().manual_seed(config['seed'])
        x = torch.randn(batch, cfg['in_channels'], side, side, generator=g).to(device)
        target = torch.randn(x.shape, generator=g).to(device)
        t = (torch.rand(batch, generator=g) * 1000).to(device)
        c = torch.randn(batch, text, cfg['joint_attention_dim'], generator=g).to(device)
        p = torch.randn(batch, cfg['pooled_projection_dim'], generator=g).to(device)
        run = {'ours': lambda: ours(x, t, c, p),
               'diffusers': lambda: ref(hidden_states=x, encoder_hidden_states=c, pooled_projections=p,
                                        timestep=t).sample}
        for dtype in config['dtypes'].split(','):
            def train_step(model, forward, opt):
                opt.zero_grad(set_to_none=True)
                with autocast(device, dtype):
                    loss = torch.nn.functional.mse_loss(forward().float(), target)
                loss.backward()
                opt.step()

            def sample_step(forward):
                with torch.no_grad(), autocast(device, dtype):
                    forward()

            opts = {'ours': torch.optim.AdamW(ours.parameters(), lr=1e-6),
                    'diffusers': torch.optim.AdamW(ref.parameters(), lr=1e-6)}
            for kind in ('train', 'sample'):
                fns = [(lambda m=m: train_step(m, run[m], opts[m])) if kind == 'train' else
                       (lambda m=m: sample_step(run[m])) for m in ('ours', 'diffusers')]
                t_ours, t_ref = interleaved_times(fns, config['warmup'], config['iters'], clock)
                rows.append((size, dtype, kind, t_ours, t_ref))
                print(f'{size:6s} {dtype:9s} {kind:6s} ours {t_ours * 1e3:8.1f} ms  diffusers {t_ref * 1e3:8.1f} ms'
                      f'  speed-up {t_ref / t_ours:.2f}x', flush=True)
    load = ', '.join(f'{x:.1f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'
    print(f'\n{device}, {torch.get_num_threads()} threads, {config["clock"]} clock, '
          f'median of {config["iters"]} interleaved runs, '
          f'load average {load}\n')
    print('| config | precision | step | ours (ms) | diffusers (ms) | diffusers / ours |')
    print('|---|---|---|---:|---:|---:|')
    for size, dtype, kind, t_ours, t_ref in rows:
        print(f'| {size} | {dtype} | {kind} | {t_ours * 1e3:.1f} | {t_ref * 1e3:.1f} | {t_ref / t_ours:.2f} |')


# -----------------------------------------------------------------------------
# task: encoder

# 'tiny': the tests' scale; 'toy': the toy world's encoder (config/toy_encoder.json)
ENCODER_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=[2, 3, 3], vocab_size=512, vision_hidden_size=32,
                    vision_intermediate_size=64, vision_depth=2, vision_num_heads=2, patch_size=8, window_size=32,
                    fullatt_block_indexes=[1], image_token_id=511, vision_start_token_id=509,
                    vision_end_token_id=510, eos_token_id=508)


def bench_encoder(args):
    """Sampling throughput (prefill + new tokens, tokens/s) of Encoder.generate against transformers'
    Qwen2_5_VLForConditionalGeneration.generate with the same weights, prompts (a 64x64 image + text)
    and sampling settings (temperature 1, no top-k/top-p, no early stop)."""
    import transformers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from common import autocast, configure, pick_device
    from model_encoder import Encoder, EncoderConfig
    transformers.logging.set_verbosity_error()
    config = dict(sizes='tiny,toy', batches='1,16', new_tokens=64, text_tokens=40, dtype='float32',
                  warmup=1, iters=20, device='auto', seed=0, threads=0)
    # iters: on this shared CPU the best of 5 runs moved the toy batch-16 ratio between 1.29 and 1.64 from one
    # invocation to the next; the best of 20 moves less (the whole task takes about 30 s)
    configure(config, args)
    device = pick_device(config['device'])
    if config['threads']:  # on a shared CPU, waking a second thread for tiny ops can cost a whole time slice
        torch.set_num_threads(config['threads'])
    rows = []
    for size in config['sizes'].split(','):
        if size == 'toy':
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'toy_encoder.json')
            with open(path) as f:
                c = EncoderConfig.from_hf(json.load(f), path)
        else:
            c = EncoderConfig(**ENCODER_TINY)
        c.eos_token_id = c.vocab_size + 1  # never sampled: every run makes new_tokens tokens
        torch.manual_seed(config['seed'])
        ours = Encoder(c).to(device).eval()
        hf_cfg = {k: v for k, v in c.to_hf().items() if not k.startswith(('projector', 'architectures', 'model_type'))}
        ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_cfg)).to(device).eval()
        ref.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith('projector.')})
        grid, n_image = 64 // c.patch_size, (64 // c.patch_size // c.spatial_merge_size) ** 2
        for batch in map(int, config['batches'].split(',')):
            g = torch.Generator().manual_seed(config['seed'])
            text = torch.randint(0, c.vocab_size - 16, (batch, config['text_tokens']), generator=g)
            image = torch.tensor([[c.vision_start_token_id] + [c.image_token_id] * n_image + [c.vision_end_token_id]])
            ids = torch.cat([text[:, :4], image.expand(batch, -1), text[:, 4:]], 1).to(device)
            pixels = torch.randn(batch * grid ** 2, 3 * 2 * c.patch_size ** 2, generator=g).to(device)
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                      image_grid_thw=torch.tensor([[1, grid, grid]] * batch, device=device))
            n = config['new_tokens']

            def run_ours():
                with autocast(device, config['dtype']):
                    out = ours.generate(**kw, max_new_tokens=n, temperature=1.0)
                assert out.tokens.shape == (batch, n)

            def run_hf():
                with torch.no_grad(), autocast(device, config['dtype']):
                    out = ref.generate(**kw, mm_token_type_ids=(ids == c.image_token_id).int(), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                       eos_token_id=c.eos_token_id, pad_token_id=0)
                assert out.shape == (batch, ids.shape[1] + n)

            times = [[], []]  # interleaved runs; the fastest of each (other processes only ever add time)
            for i in range(config['warmup'] + config['iters']):
                for fn, ts in zip((run_ours, run_hf), times):
                    t0 = time.perf_counter()
                    fn()
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    if i >= config['warmup']:
                        ts.append(time.perf_counter() - t0)
            t_ours, t_ref = min(times[0]), min(times[1])
            rows.append((size, batch, batch * n / t_ours, batch * n / t_ref))
            print(f'{size:5s} batch {batch:3d}  ours {rows[-1][2]:9.0f} tok/s  transformers {rows[-1][3]:9.0f} tok/s'
                  f'  speed-up {t_ref / t_ours:.2f}x', flush=True)
    print(f'\n{device}, {config["dtype"]}, {torch.get_num_threads()} threads, prompt: {config["text_tokens"]} text tokens '
          f'+ a 64x64 image, {config["new_tokens"]} new tokens, best of {config["iters"]} interleaved runs\n')
    print('| config | batch | ours (tokens/s) | transformers generate (tokens/s) | ours / transformers |')
    print('|---|---:|---:|---:|---:|')
    for size, batch, ours_tps, ref_tps in rows:
        print(f'| {size} | {batch} | {ours_tps:.0f} | {ref_tps:.0f} | {ours_tps / ref_tps:.2f} |')


# -----------------------------------------------------------------------------
# task: attention

ATTENTION_SHAPES = [  # (name, B, H, Hkv, N, D, causal)
    ('SD3.5-Large joint', 1, 38, 38, 4350, 64, False),
    ('Qwen2.5-VL-3B LLM', 1, 16, 2, 2048, 128, True),
]


def bench_attention(args):
    """The Triton flash attention (kernels/attention.py) against torch SDPA, bf16, in TFLOP/s."""
    import torch.nn.functional as F
    from common import attention_kernels, configure
    config = dict(warmup=3, iters=20)
    configure(config, args)
    if not torch.cuda.is_available():
        sys.exit('--task attention needs a CUDA GPU: on the CPU the Triton kernels run only in the '
                 'interpreter (TRITON_INTERPRET=1), which is far too slow to time')
    flash_attention = attention_kernels().flash_attention
    gpu = dict(device=pick_device(), dtype=torch.bfloat16, requires_grad=True)  # CUDA, checked above
    rows = []
    for name, B, H, Hkv, N, D, causal in ATTENTION_SHAPES:
        q = torch.randn(B, H, N, D, **gpu)
        k = torch.randn(B, Hkv, N, D, **gpu)
        v = torch.randn(B, Hkv, N, D, **gpu)
        do = torch.randn_like(q)
        impls = {'SDPA': lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv),
                 'Triton': lambda: flash_attention(q, k, v, causal=causal)}
        with torch.no_grad():
            diff = (impls['Triton']() - impls['SDPA']()).abs().max().item()
        # the matmuls q k^T and p v take 2 N^2 D FLOPs each (half when causal); backward is 2.5x forward
        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        for step, mult in (('forward', 1.0), ('forward+backward', 3.5)):
            def run(fn):
                if step == 'forward':
                    with torch.no_grad():
                        fn()
                else:
                    torch.autograd.grad(fn(), (q, k, v), do)
            # the first calls compile and autotune the kernels: warmup covers them
            t = {impl: timeit(lambda: run(fn), config['warmup'], config['iters']) for impl, fn in impls.items()}
            rows.append((f'{name} ({H}/{Hkv} heads x {D}, N={N}{", causal" if causal else ""})', step,
                         t['SDPA'], t['Triton'], flops * mult, diff))
    print(f'\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, '
          f'median of {config["iters"]} runs\n')
    print('| shape | step | SDPA ms | SDPA TFLOP/s | Triton ms | Triton TFLOP/s | SDPA / Triton time | max abs diff |')
    print('|---|---|---:|---:|---:|---:|---:|---:|')
    for shape, step, t_sdpa, t_ours, flops, diff in rows:
        print(f'| {shape} | {step} | {t_sdpa * 1e3:.2f} | {flops / t_sdpa / 1e12:.1f} | {t_ours * 1e3:.2f} | '
              f'{flops / t_ours / 1e12:.1f} | {t_sdpa / t_ours:.2f} | {diff:.1e} |')


TASKS = {'attention': bench_attention, 'decoder': bench_decoder, 'encoder': bench_encoder}

if __name__ == '__main__':
    args = sys.argv[1:]
    task = None
    for i, a in enumerate(args):
        if a == '--task' or a.startswith('--task='):
            task = a.split('=', 1)[1] if '=' in a else (args[i + 1] if i + 1 < len(args) else '')
            args = args[:i] + args[i + (1 if '=' in a else 2):]
            break
    if task not in TASKS:
        sys.exit(f"bench_speed.py: --task must be one of {', '.join(sorted(TASKS))} (got {task!r})")
    keep_freed_memory()  # both sides of each comparison run on the same allocator
    TASKS[task](args)
