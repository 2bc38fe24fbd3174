"""
Parity on a device: our decoder (model_decoder.MMDiT) and encoder (model_encoder.Encoder) against diffusers'
SD3Transformer2DModel and transformers' Qwen2_5_VLForConditionalGeneration, the same random weights and
inputs, in fp32 and in bf16. The tests check the same on tiny configs on the CPU; this is the check to run
on a GPU, where the Triton attention kernels and bf16 matmuls take part (rehearsal.py --mode=gpu runs it).

    python tools/parity.py --device=cuda        # moderate configs (SD3.5-Large's head size, 1,024 image tokens)
    python tools/parity.py --device=cpu         # tiny configs, ~20 s

Prints a table and writes --out (JSON: {model: errors, tolerances, ok}); exits 1 when a model fails.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config = dict(device='auto', out='')  # out: where to write the JSON result ('' = nowhere)


# the configs compared: on a GPU moderate (SD3.5-Large's head size 64 and qk RMSNorm, 4 blocks, 1,024 image
# + 77 text tokens; a 4-layer GQA LLM with a 4-block vision tower, 64 image tokens), on a CPU tiny
CASES = dict(
    cuda=dict(dit=dict(sample_size=64, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
                       num_attention_heads=8, joint_attention_dim=1024, caption_projection_dim=512,
                       pooled_projection_dim=256, out_channels=16, pos_embed_max_size=96, qk_norm='rms_norm'),
              latent=64, text=77,
              llm=dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12],
                       vision_depth=4, vision_hidden_size=256, vision_intermediate_size=512, vision_num_heads=4,
                       patch_size=14, window_size=112, fullatt_block_indexes=[3]),
              grid=(1, 16, 16), prompt=40),
    cpu=dict(dit=dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                      pooled_projection_dim=16, out_channels=16, pos_embed_max_size=16, qk_norm='rms_norm'),
             latent=16, text=7,
             llm=dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, mrope_section=[2, 3, 3],
                      tie_word_embeddings=True, vision_depth=4, vision_hidden_size=32, vision_intermediate_size=64,
                      vision_num_heads=2, patch_size=4, window_size=16, fullatt_block_indexes=[3]),
             grid=(1, 8, 12), prompt=10),
)


def random_weights(model, seed):
    """Weights of unit gain (std 1 / sqrt(fan-in)), norm scales 1 + N(0, 0.1), biases N(0, 0.1): outputs of
    order one, every parameter mattering (diffusers' zero-initialised layers would hide a missing term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + ('norm' in name or 'ln_q' in name))
    return model


def relative_error(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


def parity(device):
    """Our decoder (model_decoder.MMDiT) and encoder (model_encoder.Encoder) against diffusers'
    SD3Transformer2DModel and transformers' Qwen2_5_VLForConditionalGeneration with the same random weights
    and inputs, on `device`: in fp32 ours must equal the reference to rounding (relative error
    |ours - ref| / |ref| below 1e-5 on a CPU, 1e-4 on a GPU, TF32 off); in bf16 (weights and inputs, as
    the real runs hold them, no autocast) ours must be as near the fp32 reference as the reference's own
    bf16 output is (at most 1.5x its error + 1e-3) and within 5 %. Returns {model: result}."""
    from diffusers import SD3Transformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    import diffusers
    import transformers
    import model_decoder as D
    from model_encoder import Encoder, EncoderConfig
    diffusers.logging.set_verbosity_error()  # notes on casting the references with .to() and on their configs
    transformers.logging.set_verbosity_error()
    device = torch.device(device)
    p = CASES['cuda' if device.type == 'cuda' else 'cpu']
    fp32_tol = 1e-4 if device.type == 'cuda' else 1e-5
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    # the decoder: velocity (B, 16, h, w) for latents, timesteps, text context and pooled vector
    ref = random_weights(SD3Transformer2DModel(**p['dit']), 1).eval()
    ours = D.MMDiT(D.MMDiTConfig(**p['dit'])).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    c = p['dit']
    x = torch.randn(2, c['in_channels'], p['latent'], p['latent'], generator=g)
    ctx = torch.randn(2, p['text'], c['joint_attention_dim'], generator=g)
    pooled, t = torch.randn(2, c['pooled_projection_dim'], generator=g), torch.tensor([250.0, 900.0])
    run_ref = lambda m, dt: m(hidden_states=x.to(device, dt), encoder_hidden_states=ctx.to(device, dt),
                              pooled_projections=pooled.to(device, dt), timestep=t.to(device)).sample
    run_ours = lambda m, dt: m(x.to(device, dt), t.to(device), ctx.to(device, dt), pooled.to(device, dt))
    dit = (ref, ours, run_ref, run_ours, None)
    # the encoder: logits (B, L, vocab) of a left-padded batch, one row with an image, one text only
    V = p['llm']['vocab_size']
    ec = EncoderConfig(**p['llm'], image_token_id=V - 3, vision_start_token_id=V - 2, vision_end_token_id=V - 1,
                       eos_token_id=V - 4)
    ours = random_weights(Encoder(ec), 2).eval()
    hf_config = {k: v for k, v in ec.to_hf().items() if not k.startswith(('projector', 'architectures', 'model_type'))}
    ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    grid = torch.tensor([p['grid']])
    n_img = int(grid.prod()) // ec.spatial_merge_size ** 2
    text = lambda n: torch.randint(0, V - 4, (n,), generator=g).tolist()
    rows = [text(5) + [V - 2] + [V - 3] * n_img + [V - 1] + text(p['prompt']), text(p['prompt'])]
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.arange(L) >= L - torch.tensor([len(r) for r in rows])[:, None]
    pixels = torch.randn(int(grid.prod()), 3 * ec.temporal_patch_size * ec.patch_size ** 2, generator=g)
    batch = lambda dt: dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                            pixel_values=pixels.to(device, dt), image_grid_thw=grid.to(device))
    run_ref = lambda m, dt: m(**batch(dt), mm_token_type_ids=(ids == V - 3).int().to(device)).logits
    run_ours = lambda m, dt: m(**batch(dt))
    enc = (ref, ours, run_ref, run_ours, mask.to(device))
    results = {}
    try:
        for name, (ref, ours, run_ref, run_ours, keep) in (('decoder', dit), ('encoder', enc)):
            pick = (lambda y: y[keep]) if keep is not None else (lambda y: y)  # logits of real tokens only
            out = {}
            with torch.no_grad():
                for dt in (torch.float32, torch.bfloat16):
                    ref.to(device, dt)
                    ours.to(device, dt)
                    out[dt] = pick(run_ref(ref, dt)).float(), pick(run_ours(ours, dt)).float()
            full = out[torch.float32][0]
            r = dict(fp32=relative_error(out[torch.float32][1], full), bf16=relative_error(out[torch.bfloat16][1], full),
                     bf16_reference=relative_error(out[torch.bfloat16][0], full), fp32_tol=fp32_tol)
            r['bf16_tol'] = min(1.5 * r['bf16_reference'] + 1e-3, 0.05)
            r['ok'] = bool(r['fp32'] < fp32_tol and r['bf16'] <= r['bf16_tol'])
            results[name] = r
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return results


def main():
    from common import configure, pick_device, save_json
    cfg = configure(config)
    results = parity(pick_device(cfg['device']))
    print('| parity | fp32 err | tol | bf16 err | reference | tol | ok |\n|---|---:|---:|---:|---:|---:|---|')
    for name, r in results.items():
        print(f"| {name} | {r['fp32']:.1e} | {r['fp32_tol']:.0e} | {r['bf16']:.2e} | {r['bf16_reference']:.2e} "
              f"| {r['bf16_tol']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    if cfg['out']:
        os.makedirs(os.path.dirname(os.path.abspath(cfg['out'])), exist_ok=True)
        save_json(results, cfg['out'])
    print(json.dumps({k: {e: float(f'{r[e]:.2e}') for e in ('fp32', 'bf16', 'bf16_reference')} for k, r in results.items()}))
    if not all(r['ok'] for r in results.values()):
        sys.exit(1)


if __name__ == '__main__':
    from common import run
    run(main)
