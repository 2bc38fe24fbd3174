"""
The Triton flash-attention kernels (kernels/attention.py) against float64 math attention.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below
before kernels/attention.py is loaded), which is slow: shapes stay tiny, and the interpreter config
uses 16/32-wide blocks so that several blocks, ragged tails and causal diagonals are still crossed.
bf16 runs only on a GPU (the interpreter's bf16 dot is broken).
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

import common  # noqa: E402

ka = common.attention_kernels()  # kernels/attention.py

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
needs_gpu_bf16 = pytest.mark.skipif(DEVICE == 'cpu' or ka.INTERPRET, reason='bf16 needs a GPU (interpreter bf16 dot)')
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_gpu_bf16)]


def reference(q, k, v, causal=False, mask=None):
    """Math attention in float64; a row with nothing to attend to gives 0 (as SDPA does)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if causal:
        allowed = allowed & torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        allowed = allowed & mask
    empty = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, float('-inf')).masked_fill(empty, 0.0)
    return torch.softmax(s, -1).masked_fill(empty, 0.0) @ v


def sdpa(q, k, v, causal=False, mask=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def inputs(B, H, Hkv, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    return make(B, H, Nq, D), make(B, Hkv, Nk, D), make(B, Hkv, Nk, D)


def out_and_grads(fn, q, k, v, do, **kw):
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))


def assert_close_as_sdpa(q, k, v, **kw):
    """Output and dq, dk, dv of the kernel are as close to float64 math attention as SDPA's are,
    on the same (possibly low-precision) inputs: within 2x SDPA's error plus a small floor."""
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, q.dtype)
    ref = out_and_grads(reference, q, k, v, do, **kw)
    ours = out_and_grads(ka.flash_attention, q, k, v, do, **kw)
    theirs = out_and_grads(sdpa, q, k, v, do, **kw)
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[q.dtype]
    for name, r, a, b in zip(['out', 'dq', 'dk', 'dv'], ref, ours, theirs):
        assert a.dtype == q.dtype and a.shape == r.shape, name
        err, sdpa_err = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= 2 * sdpa_err + floor * scale, f'{name}: error {err:.3g}, SDPA {sdpa_err:.3g}, |ref| {scale:.3g}'


CASES = {  # (B, H, Hkv, Nq, Nk, D, causal)
    'gqa-uneven': (2, 4, 2, 45, 70, 32, False),  # Nq != Nk, ragged tails of both
    'causal-gqa': (1, 4, 1, 70, 70, 16, True),  # diagonal blocks, group of 4
    'head-dim-80': (1, 2, 2, 37, 37, 80, False),  # head-dim block padded to 128 and masked
    'causal-80': (1, 2, 2, 33, 33, 80, True),
}


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('case', CASES)
def test_matches_math_attention(case, dtype):
    B, H, Hkv, Nq, Nk, D, causal = CASES[case]
    q, k, v = inputs(B, H, Hkv, Nq, Nk, D, dtype)
    assert_close_as_sdpa(q, k, v, causal=causal)


def test_transposed_layout():
    """(B, N, H, D) tensors viewed as (B, H, N, D), as the models make them: no copy needed, same result,
    and the output keeps the layout so transposing it back is free."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in inputs(2, 4, 2, 40, 40, 32, torch.float32))
    assert_close_as_sdpa(q, k, v)
    assert ka.flash_attention(q, k, v).transpose(1, 2).is_contiguous()


def test_mask():
    """A broadcast (B, 1, Nq, Nk) bool mask with a fully masked row (which gives 0, as in SDPA)."""
    q, k, v = inputs(2, 2, 1, 35, 50, 16, torch.float32)
    mask = torch.rand(2, 1, 35, 50, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0, 0, 3] = False
    mask = mask.to(DEVICE)
    assert_close_as_sdpa(q, k, v, mask=mask)
    assert ka.flash_attention(q, k, v, mask=mask)[0, :, 3].abs().max() == 0


@pytest.mark.parametrize('causal', [False, True])
def test_packed_sequences(causal):
    """cu_seqlens (block-diagonal attention) equals the same sequences run one by one."""
    cu_seqlens = torch.tensor([0, 20, 21, 50, 64])
    q, k, v = inputs(2, 4, 2, 64, 64, 16, torch.float32)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = out_and_grads(ka.flash_attention, q, k, v, do, causal=causal, cu_seqlens=cu_seqlens)
    pieces = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        pieces.append(reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal))
    ref = torch.cat(pieces, 2)
    ref = (ref, *torch.autograd.grad(ref, (q, k, v), do.double()))
    for name, r, a in zip(['out', 'dq', 'dk', 'dv'], ref, ours):
        torch.testing.assert_close(a.double(), r.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f'{name}: {m}')


def test_bad_inputs():
    q, k, v = inputs(1, 4, 2, 20, 24, 16, torch.float32)
    with pytest.raises(ValueError, match='causal attention needs Nq == Nk'):
        ka.flash_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match='H a multiple of Hkv'):
        ka.flash_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match='one dtype'):
        ka.flash_attention(q.half(), k, v)
    with pytest.raises(ValueError, match='mask must be bool'):
        ka.flash_attention(q, k, v, mask=torch.zeros(20, 24, device=DEVICE))
    with pytest.raises(ValueError, match='cu_seqlens must rise from 0'):
        ka.flash_attention(q, q, q, cu_seqlens=torch.tensor([0, 5, 3, 20]))


@pytest.mark.skipif(DEVICE == 'cuda', reason='CPU behaviour')
def test_cpu_limits_are_clear_errors(monkeypatch):
    q, k, v = inputs(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match='bfloat16 gives wrong numbers'):
        ka.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    monkeypatch.setattr(ka, 'INTERPRET', False)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        ka.flash_attention(q, k, v)


def test_common_attention_dispatch(monkeypatch):
    """NANOUAE_ATTENTION picks the backend of common.attention, the function both models call."""
    calls = []
    real = ka.flash_attention
    monkeypatch.setattr(ka, 'flash_attention', lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = inputs(1, 4, 2, 24, 24, 16, torch.float32)
    mask = (torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(3)) > 0.5).to(DEVICE)
    expected = sdpa(q, k, v, causal=True)

    monkeypatch.setenv('NANOUAE_ATTENTION', 'triton')
    torch.testing.assert_close(common.attention(q, k, v, causal=True), expected)
    torch.testing.assert_close(common.attention(q, k, v, mask=mask), sdpa(q, k, v, mask=mask))
    assert calls == [dict(causal=True, mask=None), dict(causal=False, mask=mask)]

    monkeypatch.setenv('NANOUAE_ATTENTION', 'sdpa')
    torch.testing.assert_close(common.attention(q, k, v, causal=True), expected)
    assert len(calls) == 2

    monkeypatch.setenv('NANOUAE_ATTENTION', 'auto')
    common.attention(q, k, v, causal=True)
    assert len(calls) == 2  # fp32: SDPA, on any device
    if DEVICE == 'cuda':
        common.attention(q.half(), k.half(), v.half(), causal=True)
        assert len(calls) == 3

    monkeypatch.setenv('NANOUAE_ATTENTION', 'flash')
    with pytest.raises(ValueError, match='NANOUAE_ATTENTION must be auto, sdpa or triton'):
        common.attention(q, k, v)


def test_cpu_low_precision_attention_runs_in_fp32(monkeypatch):
    """On the CPU, long unmasked bf16 / fp16 attention (the decoder's) runs as fp32 SDPA, with autocast on or
    off (autocast would cast the fp32 copies back), when it is trained: faster there (bench.py --task decoder)
    and no further from the exact result than SDPA in bf16 (measured: 7 % nearer). Without gradients, and for
    a decoding step's few rows, SDPA runs in the inputs' dtype."""
    monkeypatch.setenv('NANOUAE_ATTENTION', 'auto')
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 80, 16, generator=g) * s for s in (3.0, 1.0, 1.0))  # peaked softmax
    for dtype in (torch.bfloat16, torch.float16):
        qd, kd, vd = (t.to(dtype).requires_grad_() for t in (q, k, v))
        in_fp32 = F.scaled_dot_product_attention(qd.float(), kd.float(), vd.float()).to(dtype)
        for on in (False, True):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=on):
                out = common.attention(qd, kd, vd)
                assert torch.equal(out, in_fp32), (dtype, on)
        out.float().square().sum().backward()
        assert qd.grad.dtype == dtype and qd.grad.abs().sum() > 0
        with torch.no_grad():  # the gain is the backward's: without gradients SDPA runs in the inputs' dtype
            assert torch.equal(common.attention(qd, kd, vd), F.scaled_dot_product_attention(qd, kd, vd))
        step = common.attention(qd[:, :, -2:], kd, vd)
        assert torch.equal(step, F.scaled_dot_product_attention(qd[:, :, -2:], kd, vd))
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    exact = reference(qb, kb, vb)
    err = lambda o: (o.double() - exact).norm().item()
    assert err(common.attention(qb, kb, vb)) < err(F.scaled_dot_product_attention(qb, kb, vb))
