"""The MMDiT decoder against diffusers' SD3Transformer2DModel, checkpoint I/O, and the flow-matching math."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

import model_decoder as md
from lora import apply_lora, lora_layers
from model_decoder import MMDiT, MMDiTConfig

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12)
STYLES = {
    'sd3': {},
    'sd35_large': dict(qk_norm='rms_norm'),
    'sd35_medium': dict(qk_norm='rms_norm', dual_attention_layers=(0, 1)),
}


def make_reference(style, seed=0):
    """A random diffusers model; norm weights moved away from 1 so that qk-norm weights matter."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**TINY, **STYLES[style]).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if 'norm' in name and p.ndim == 1:
                p.normal_(1.0, 0.2)
    return ref


def inputs(B=3, H=16, W=16, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, TINY['in_channels'], H, W, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randn(B, L, TINY['joint_attention_dim'], generator=g),
            torch.randn(B, TINY['pooled_projection_dim'], generator=g))


def run_ref(ref, x, t, c, p):
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t).sample


def run_ours(model, x, t, c, p):
    with torch.no_grad():
        return model(x, t, c, p)


@pytest.fixture(scope='module', params=list(STYLES))
def saved_reference(request, tmp_path_factory):
    ref = make_reference(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(directory)
    return request.param, ref, str(directory)


# -----------------------------------------------------------------------------
# parity with diffusers

@pytest.mark.parametrize('H,W', [(16, 16), (12, 20)])
def test_diffusers_checkpoint_loads_with_equal_outputs(saved_reference, H, W):
    style, ref, directory = saved_reference
    model = MMDiT.from_pretrained(directory).eval()
    assert set(model.state_dict()) == set(ref.state_dict())
    x, t, c, p = inputs(H=H, W=W)
    expected = run_ref(ref, x, t, c, p)
    got = run_ours(model, x, t, c, p)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max() < 1e-5, style


@pytest.mark.parametrize('lora', [False, True])
def test_gradients_equal_diffusers(saved_reference, lora):
    """Same loss, same gradient for every parameter, including the exact zero that diffusers gives the last
    block's unused text queries (ours never computes them); with LoRA on them, their A and B get zeros too."""
    style, _, directory = saved_reference
    model = MMDiT.from_pretrained(directory)
    if lora:
        model.requires_grad_(False)
        apply_lora(model, ['add_q_proj', 'to_out.0'], r=2, alpha=2)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_()
    x, t, c, p = inputs(H=12, W=20)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    ((model(x, t, c, p) - target) ** 2).mean().backward()
    got = {n: w.grad for n, w in model.named_parameters() if w.requires_grad}
    assert all(g is not None for g in got.values()), [n for n, g in got.items() if g is None]
    dead = f'transformer_blocks.{TINY["num_layers"] - 1}.attn.add_q_proj'
    assert (got[dead + ('.lora_B.weight' if lora else '.weight')] == 0).all()
    if lora:
        return
    ref = SD3Transformer2DModel.from_pretrained(directory)  # a fresh copy: the fixture's model keeps no gradients
    out = ref(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t).sample
    ((out - target) ** 2).mean().backward()
    expected = dict(ref.named_parameters())
    assert got.keys() == expected.keys()
    for n, g in got.items():
        assert torch.allclose(g, expected[n].grad, rtol=1e-4, atol=1e-6), (style, n)


def test_our_checkpoint_loads_in_diffusers(saved_reference, tmp_path):
    style, ref, directory = saved_reference
    model = MMDiT.from_pretrained(directory)
    model.save_pretrained(tmp_path)
    back = SD3Transformer2DModel.from_pretrained(tmp_path).eval()
    x, t, c, p = inputs(H=12, W=20)
    assert (run_ref(back, x, t, c, p) - run_ours(model, x, t, c, p)).abs().max() < 1e-5
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_fresh_model_matches_diffusers_layout():
    """Same keys and shapes as diffusers for every style, the last block context-pre-only, and the
    pos-embed table (a buffer a from-scratch model relies on) identical."""
    for style in STYLES:
        ref = SD3Transformer2DModel(**TINY, **STYLES[style])
        ours = MMDiT(MMDiTConfig(**TINY, **STYLES[style]))
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert torch.equal(ours.pos_embed.pos_embed, ref.pos_embed.pos_embed)
    last = f"transformer_blocks.{TINY['num_layers'] - 1}"
    keys = ours.state_dict()
    assert keys[f'{last}.norm1_context.linear.weight'].shape[0] == 2 * 16
    assert f'{last}.attn.to_add_out.weight' not in keys and f'{last}.ff_context.net.2.weight' not in keys
    assert 'transformer_blocks.1.attn2.norm_q.weight' in keys and 'transformer_blocks.2.attn2.to_q.weight' not in keys


def test_bf16_autocast_closer_to_fp32_than_diffusers(saved_reference):
    """fp32 modulation / timestep MLP / qk-norm and an fp32 residual stream under autocast: our bf16
    output is nearer the fp32 result than diffusers' bf16 output (measured: 0.5-0.7x its error)."""
    style, ref, directory = saved_reference
    model = MMDiT.from_pretrained(directory).eval()
    x, t, c, p = inputs(B=4)
    full = run_ref(ref, x, t, c, p)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        err_ref = (run_ref(ref, x, t, c, p).float() - full).norm()
        err_ours = (run_ours(model, x, t, c, p).float() - full).norm()
    assert err_ours < 0.85 * err_ref, (style, err_ours.item(), err_ref.item())


def test_sharded_checkpoint_loads(tmp_path):
    ref = make_reference('sd35_medium')
    ref.save_pretrained(tmp_path, max_shard_size='20KB')
    assert os.path.exists(tmp_path / 'diffusion_pytorch_model.safetensors.index.json')
    assert len([f for f in os.listdir(tmp_path) if f.endswith('.safetensors')]) > 1
    model = MMDiT.from_pretrained(str(tmp_path))
    x, t, c, p = inputs(B=2)
    assert (run_ref(ref, x, t, c, p) - run_ours(model, x, t, c, p)).abs().max() < 1e-5


def test_from_pretrained_dtype_and_input_checks(saved_reference):
    _, _, directory = saved_reference
    model = MMDiT.from_pretrained(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in model.parameters())
    x, t, c, p = inputs(B=1, H=16, W=15)
    with pytest.raises(ValueError, match='multiple of patch_size'):
        model(x.bfloat16(), t, c.bfloat16(), p.bfloat16())
    with pytest.raises(ValueError, match='pos_embed_max_size'):
        model(torch.zeros(1, 4, 26, 26, dtype=torch.bfloat16), t, c.bfloat16(), p.bfloat16())


# -----------------------------------------------------------------------------
# strict loading: every bad input is an error naming the key or file

@pytest.fixture()
def our_checkpoint(tmp_path):
    MMDiT(MMDiTConfig(**TINY)).save_pretrained(tmp_path)
    return tmp_path


def rewrite_weights(directory, edit):
    from safetensors.torch import load_file, save_file
    path = directory / 'diffusion_pytorch_model.safetensors'
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_key_is_named(our_checkpoint):
    rewrite_weights(our_checkpoint, lambda s: s.pop('transformer_blocks.1.attn.add_k_proj.bias'))
    with pytest.raises(ValueError, match=r'missing keys: transformer_blocks\.1\.attn\.add_k_proj\.bias'):
        MMDiT.from_pretrained(str(our_checkpoint))


def test_unexpected_key_is_named(our_checkpoint):
    rewrite_weights(our_checkpoint, lambda s: s.update({'transformer_blocks.0.attn.extra.weight': torch.zeros(2)}))
    with pytest.raises(ValueError, match=r'unexpected keys: transformer_blocks\.0\.attn\.extra\.weight'):
        MMDiT.from_pretrained(str(our_checkpoint))


def test_wrong_shape_is_named(our_checkpoint):
    rewrite_weights(our_checkpoint, lambda s: s.update({'proj_out.weight': torch.zeros(3, 16)}))
    with pytest.raises(ValueError, match=r'wrong shapes: proj_out\.weight: expected \(16, 16\), got \(3, 16\)'):
        MMDiT.from_pretrained(str(our_checkpoint))


def test_truncated_file_is_named(our_checkpoint):
    path = our_checkpoint / 'diffusion_pytorch_model.safetensors'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='diffusion_pytorch_model.safetensors'):
        MMDiT.from_pretrained(str(our_checkpoint))


def test_missing_config_is_named(our_checkpoint):
    os.remove(our_checkpoint / 'config.json')
    with pytest.raises(FileNotFoundError, match=f'no config.json in {our_checkpoint}'):
        MMDiT.from_pretrained(str(our_checkpoint))


def test_unknown_config_key_is_named(our_checkpoint):
    path = our_checkpoint / 'config.json'
    config = json.loads(path.read_text())
    assert config['_class_name'] == 'SD3Transformer2DModel'
    config.update(_diffusers_version='0.42.1', num_layer=3)  # '_' keys are ignored, a typo is not
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown MMDiT config keys \['num_layer'\]"):
        MMDiT.from_pretrained(str(our_checkpoint))


def test_missing_weights_file_is_named(our_checkpoint):
    os.remove(our_checkpoint / 'diffusion_pytorch_model.safetensors')
    with pytest.raises(FileNotFoundError, match='no diffusion_pytorch_model.safetensors'):
        MMDiT.from_pretrained(str(our_checkpoint))


# -----------------------------------------------------------------------------
# flow matching

@pytest.mark.parametrize('steps,shift', [(10, 3.0), (40, 3.0), (28, 1.0), (7, 2.5)])
def test_sampling_sigmas_equal_diffusers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = md.sampling_sigmas(steps, shift)
    assert ours.dtype == scheduler.sigmas.dtype and ours.shape == (steps + 1,)
    assert torch.equal(ours, scheduler.sigmas)
    assert ours[0] == 1 and ours[-1] == 0


@pytest.mark.parametrize('min_sigma', [0.0, 0.7])
def test_sampler_equals_diffusers_scheduler_loop(min_sigma):
    """Our Euler + CFG sampler against diffusers' scheduler.step driving the same model, the
    pipeline's way: uncond first, v_u + w (v_c - v_u), timestep = scheduler.timesteps; with
    guidance_min_sigma 0.7 the steps from sigma 0.60 and 0.01 (of 1, 0.86, 0.60, 0.01) unguided."""
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**TINY, qk_norm='rms_norm')).eval()
    _, _, c, p = inputs(B=2)
    neg_c, neg_p = torch.randn(1, 7, 12), torch.randn(1, 10)
    steps, cfg, shift = 4, 4.0, 3.0
    got = md.sample(model, c, p, neg_c, neg_p, steps=steps, guidance=cfg, shift=shift,
                    generator=torch.Generator().manual_seed(5), guidance_min_sigma=min_sigma)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t, sigma in zip(scheduler.timesteps, scheduler.sigmas):
            v = model(torch.cat([x, x]), t.expand(4), torch.cat([neg_c.expand(2, -1, -1), c]),
                      torch.cat([neg_p.expand(2, -1), p]))
            v_u, v_c = v.chunk(2)
            w = cfg if sigma > min_sigma else 1.0
            x = scheduler.step(v_u + w * (v_c - v_u), t, x).prev_sample
    assert (got - x).abs().max() < 1e-5
    if min_sigma:  # and not the same as guidance at every step
        assert (got - md.sample(model, c, p, neg_c, neg_p, steps=steps, guidance=cfg, shift=shift,
                                generator=torch.Generator().manual_seed(5))).abs().max() > 1e-3
        with pytest.raises(ValueError, match='ODE sampler only'):  # U4G's re-scoring assumes every step guided
            md.sample(model, c, p, neg_c, neg_p, steps=steps, guidance=cfg, shift=shift, sde_steps={1},
                      guidance_min_sigma=min_sigma)


def test_sde_log_prob_is_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigmas = md.sampling_sigmas(10, 3.0)
    for i in (0, 3, 8):  # i = 0: sigma = 1 uses the second sigma in std_t's denominator
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        x_next, logp, mean, std = md.sde_step(x, v, s, s_next, noise_level=0.7, generator=g)
        denominator = 1 - (s_next if s == 1 else s)
        std_t = 0.7 * (s / denominator) ** 0.5
        assert torch.allclose(std.flatten(), torch.full((1,), std_t))
        expected_mean = x * (1 + std_t ** 2 / (2 * s) * (s_next - s)) + \
            v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * (s_next - s)
        assert torch.allclose(mean, expected_mean, atol=1e-6)
        density = torch.distributions.Normal(mean, std_t * (s - s_next) ** 0.5)
        assert torch.allclose(logp, density.log_prob(x_next).mean(dim=(1, 2, 3)), atol=1e-5)
        # scoring a given x_next (a stored trajectory) gives the same log-prob
        _, logp2, _, _ = md.sde_step(x, v, torch.full((3,), s), torch.full((3,), s_next), x_next=x_next)
        assert torch.allclose(logp, logp2)
    # the sampled noise has the stated std
    x_next, _, mean, std = md.sde_step(torch.zeros(1, 4, 64, 64), torch.zeros(1, 4, 64, 64), 0.5, 0.4, generator=g)
    assert abs((x_next - mean).std().item() / (std.item() * 0.1 ** 0.5) - 1) < 0.03


def test_sde_step_without_noise_is_euler():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_next, _, mean, _ = md.sde_step(x, v, 0.8, 0.6, noise_level=0.0, generator=g)
    assert torch.allclose(x_next, x + (0.6 - 0.8) * v, atol=1e-6) and torch.equal(x_next, mean)


def test_train_sigmas_logit_normal_and_shift():
    s = md.sample_sigmas_train(20000, shift=1.0, generator=torch.Generator().manual_seed(0))
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    s3 = md.sample_sigmas_train(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s3, 3 * s / (1 + 2 * s))


def test_loss_backprop_with_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**TINY, qk_norm='rms_norm', dual_attention_layers=(0,)))
    x0, _, c, p = inputs(B=2)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        loss = md.flow_matching_loss(model, x0, c, p, shift=3.0, generator=torch.Generator().manual_seed(3))
        assert torch.isfinite(loss)
        loss.backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    # the loss is the velocity MSE at the drawn sigma and noise
    sigma, noise = torch.tensor([0.3, 0.9]), torch.randn_like(x0)
    with torch.no_grad():
        s = sigma.view(2, 1, 1, 1)
        v = model((1 - s) * x0 + s * noise, 1000 * sigma, c, p)
        loss = md.flow_matching_loss(model, x0, c, p, sigma=sigma, noise=noise)
        # per-channel weights (train_sft's latent_weight_power) multiply each channel's squared error
        w = torch.rand(x0.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5
        weighted = md.flow_matching_loss(model, x0, c, p, sigma=sigma, noise=noise, weight=w)
    assert torch.allclose(loss, ((v - (noise - x0)) ** 2).mean())
    assert torch.allclose(weighted, ((v - (noise - x0)) ** 2 * w.view(1, -1, 1, 1)).mean())
    assert not torch.allclose(weighted, loss)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('weight_grad', [True, False])
def test_rms_norm_backward_equals_autograd(dtype, weight_grad):
    """The CPU's hand-written RMSNorm backward against autograd through F.rms_norm (the GPU path)."""
    g = torch.Generator().manual_seed(0)
    x0 = (3 * torch.randn(2, 5, 3, 16, generator=g)).to(dtype)
    w0 = torch.randn(16, generator=g)
    grad = torch.randn(2, 5, 3, 16, generator=g).to(dtype)
    results = []
    for fn in (lambda x, w: md.RMSNormFunction.apply(x, w, 1e-6),
               lambda x, w: F.rms_norm(x.float(), (16,), w, 1e-6).to(x.dtype)):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(weight_grad)
        y = fn(x, w)
        y.backward(grad)
        results.append((y, x.grad, w.grad))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = results
    assert y.dtype == gx.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert torch.allclose(y.float(), y_ref.float(), **tol)
    assert torch.allclose(gx.float(), gx_ref.float(), **tol)
    if weight_grad:
        assert torch.allclose(gw, gw_ref, rtol=1e-5, atol=1e-5)
    else:
        assert gw is None


def test_bf16_autocast_keeps_conditioning_in_fp32():
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**TINY, qk_norm='rms_norm')).eval()
    x, t, c, p = inputs(B=2)
    with torch.no_grad():
        full = model(x, t, c, p)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert model.conditioning(t, p).dtype == torch.float32
            assert model.transformer_blocks[0].norm1(torch.randn(2, 16))[0].dtype == torch.float32
            q = torch.randn(2, 5, 2, 8).bfloat16()
            assert model.transformer_blocks[0].attn.norm_q(q).dtype == torch.bfloat16
            half = model(x, t, c, p)
    assert half.dtype == torch.bfloat16
    assert ((half.float() - full).norm() / full.norm()) < 0.02
    model.to(torch.bfloat16)  # bf16 weights without autocast (Flow-GRPO's setup), fp32 inputs
    with torch.no_grad():
        pure = model(x, t, c, p)
    assert pure.dtype == torch.bfloat16
    assert ((pure.float() - full).norm() / full.norm()) < 0.02


# -----------------------------------------------------------------------------
# latents

def test_vae_helpers(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',),
                        norm_num_groups=4, layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609)
    vae.save_pretrained(tmp_path)
    loaded = md.load_codec(str(tmp_path))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    z = md.encode(loaded, pixels, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
        assert torch.allclose(z, (raw - 0.0609) * 1.5305, atol=1e-6)
        assert torch.allclose(md.decode(loaded, z), vae.decode(raw).sample, atol=1e-5)
    assert md.encode(None, pixels) is pixels and md.decode(None, pixels) is pixels


def test_initialize_weights_starts_at_zero_velocity():
    """adaLN-Zero: a freshly initialised model predicts zero velocity; the loss still reaches the output
    projection, and the blocks' modulations are in the graph."""
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**TINY, qk_norm='rms_norm'))
    model.initialize_weights()
    x, t, c, p = inputs(B=2)
    out = model(x, t, c, p)
    assert torch.equal(out, torch.zeros_like(out))
    (out - x).square().mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0
    assert model.transformer_blocks[0].norm1.linear.weight.grad is not None
