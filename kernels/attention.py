"""
Flash attention in Triton, forward and backward (FlashAttention-2 style).

Forward: a program owns BLOCK_M query rows of one head and streams the keys in blocks of BLOCK_N,
keeping per row the running max m and the running sum l of exp(score - m) (the online softmax), so
the (Nq, Nk) score matrix never exists in memory. It stores the output and the log-sum-exp per row.
Backward recomputes the probabilities from q, k and that log-sum-exp instead of storing them: one
kernel walks each query block over the keys (dq), one walks each key block over the queries (dk, dv).

Shapes: q (B, H, Nq, D); k, v (B, Hkv, Nk, D), H a multiple of Hkv (grouped-query attention: q head
h reads k/v head h // (H // Hkv), as repeat_interleave would). Any Nq and Nk (the ragged tail block is
masked), any head dim up to 256 (the block is padded to a power of two and masked: 80 -> 128).
fp32, fp16 and bf16 inputs; scores, softmax and accumulators are fp32 whatever the input.

Options: causal (needs Nq == Nk); a bool mask broadcastable to (B, H, Nq, Nk), True = may attend
(a row with nothing to attend to gives 0, as SDPA does); cu_seqlens for sequences packed along N
(block-diagonal attention, the ViT's window attention), where key blocks outside a query block's
sequences are skipped rather than masked.

On a GPU every kernel is autotuned; under TRITON_INTERPRET=1 (CPU) one small fixed config is used,
because autotuning times the configs on a GPU.
"""
import contextlib
import math
import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when this module is imported, so later changes have no effect
INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
MAX_HEAD_DIM = 256


def _configs(gpu, interpret):
    """Autotune over gpu = [(BLOCK_M, BLOCK_N, num_warps, num_stages)], or the one interpreter config."""
    if INTERPRET:
        return [triton.Config({'BLOCK_M': interpret[0], 'BLOCK_N': interpret[1]})]
    return [triton.Config({'BLOCK_M': m, 'BLOCK_N': n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# lengths enter the autotune key rounded up to a power of two: one tuning per bucket, not per length
_KEY = ['N_Q_BUCKET', 'N_K_BUCKET', 'HEAD_DIM', 'CAUSAL', 'HAS_MASK', 'VARLEN']


@triton.jit
def _allowed(rows, cols, b, h, N_Q, N_K, MASK, s_mb, s_mh, s_mq, s_mk, SEQ_LO, SEQ_HI,
             CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bools: which scores of the (rows, cols) tile take part in the softmax."""
    ok = (rows[:, None] < N_Q) & (cols[None, :] < N_K)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if VARLEN:  # row i sees only its own packed sequence, keys SEQ_LO[i] <= j < SEQ_HI[i]
        lo = tl.load(SEQ_LO + rows, mask=rows < N_Q, other=0)
        hi = tl.load(SEQ_HI + rows, mask=rows < N_Q, other=0)
        ok = ok & (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    if HAS_MASK:
        m = tl.load(MASK + b * s_mb + h * s_mh + rows[:, None] * s_mq + cols[None, :] * s_mk, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _key_range(start_m, N_Q, N_K, SEQ_LO, SEQ_HI, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """Keys [lo, hi) that query rows start_m .. start_m + BLOCK_M - 1 can see; lo is block-aligned."""
    lo = 0
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    if VARLEN:
        rows = start_m + tl.arange(0, BLOCK_M)
        lo = tl.min(tl.load(SEQ_LO + rows, mask=rows < N_Q, other=N_K)) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, tl.max(tl.load(SEQ_HI + rows, mask=rows < N_Q, other=0)))
    return lo, hi


@triton.autotune(_configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                           (64, 64, 4, 3), (64, 32, 4, 4)], interpret=(32, 16)), key=_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, MASK, SEQ_LO, SEQ_HI, qk_scale,
                s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                s_mb, s_mh, s_mq, s_mk, H, GROUP, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM  # the padded head-dim columns load as 0 and are never stored
    row_ok = (rows[:, None] < N_Q) & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + d[None, :], mask=row_ok, other=0.0)
    K += b * s_kb + (h // GROUP) * s_kh
    V += b * s_vb + (h // GROUP) * s_vh

    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    lo, hi = _key_range(start_m, N_Q, N_K, SEQ_LO, SEQ_HI, BLOCK_M, BLOCK_N, CAUSAL, VARLEN)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = (cols[:, None] < N_K) & d_ok[None, :]
        k = tl.load(K + cols[:, None] * s_kn + d[None, :], mask=col_ok, other=0.0)
        v = tl.load(V + cols[:, None] * s_vn + d[None, :], mask=col_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _allowed(rows, cols, b, h, N_Q, N_K, MASK, s_mb, s_mh, s_mq, s_mk, SEQ_LO, SEQ_HI,
                      CAUSAL, HAS_MASK, VARLEN)
        s = tl.where(ok, s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no allowed key yet keeps m = -inf: subtract 0 so exp2 gives 0, not nan
        m_sub = tl.where(m_new == float('-inf'), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # a row with nothing to attend to outputs 0 (as SDPA does); its lse = +inf makes p = 0 in backward
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    acc = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_on + d[None, :], acc.to(O.dtype.element_ty), mask=row_ok)
    lse = tl.where(empty, float('inf'), m_i + tl.math.log2(l_i))
    tl.store(LSE + (b * H + h) * N_Q + rows, lse, mask=rows < N_Q)


@triton.autotune(_configs([(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
                          interpret=(32, 16)), key=_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, MASK, SEQ_LO, SEQ_HI, qk_scale, sm_scale,
                   s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                   s_dob, s_doh, s_don, s_dqb, s_dqh, s_dqn,
                   s_mb, s_mh, s_mq, s_mk, H, GROUP, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq for BLOCK_M query rows; also stores delta = rowsum(dO * O), which the dk/dv kernel reads."""
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row_ok = (rows[:, None] < N_Q) & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + d[None, :], mask=row_ok, other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_on + d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + rows[:, None] * s_don + d[None, :], mask=row_ok, other=0.0)
    # dS = P * (dP - delta) with delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id: the softmax backward
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * N_Q + rows, delta, mask=rows < N_Q)
    lse = tl.load(LSE + (b * H + h) * N_Q + rows, mask=rows < N_Q, other=float('inf'))
    K += b * s_kb + (h // GROUP) * s_kh
    V += b * s_vb + (h // GROUP) * s_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, N_Q, N_K, SEQ_LO, SEQ_HI, BLOCK_M, BLOCK_N, CAUSAL, VARLEN)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = (cols[:, None] < N_K) & d_ok[None, :]
        k = tl.load(K + cols[:, None] * s_kn + d[None, :], mask=col_ok, other=0.0)
        v = tl.load(V + cols[:, None] * s_vn + d[None, :], mask=col_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _allowed(rows, cols, b, h, N_Q, N_K, MASK, s_mb, s_mh, s_mq, s_mk, SEQ_LO, SEQ_HI,
                      CAUSAL, HAS_MASK, VARLEN)
        p = tl.math.exp2(tl.where(ok, s, float('-inf')) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + rows[:, None] * s_dqn + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok)


@triton.autotune(_configs([(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3)],
                          interpret=(16, 32)), key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, MASK, SEQ_LO, SEQ_HI, qk_scale, sm_scale,
                     s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                     s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                     s_mb, s_mh, s_mq, s_mk, H, GROUP, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of BLOCK_N keys as seen by q head h; the wrapper sums the heads of a GQA group."""
    start_n = tl.program_id(0) * BLOCK_N
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    cols = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    col_ok = (cols[:, None] < N_K) & d_ok[None, :]
    k = tl.load(K + b * s_kb + (h // GROUP) * s_kh + cols[:, None] * s_kn + d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + b * s_vb + (h // GROUP) * s_vh + cols[:, None] * s_vn + d[None, :], mask=col_ok, other=0.0)
    Q += b * s_qb + h * s_qh
    DO += b * s_dob + h * s_doh

    # queries that can see these keys: causal starts at the diagonal; packed sequences are
    # block-diagonal (Nq == Nk), so key j is seen by exactly the rows of its own sequence
    lo = 0
    hi = N_Q
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
    if VARLEN:
        lo = tl.maximum(lo, tl.min(tl.load(SEQ_LO + cols, mask=cols < N_K, other=N_Q)) // BLOCK_M * BLOCK_M)
        hi = tl.max(tl.load(SEQ_HI + cols, mask=cols < N_K, other=0))
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = (rows[:, None] < N_Q) & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * s_qn + d[None, :], mask=row_ok, other=0.0)
        do = tl.load(DO + rows[:, None] * s_don + d[None, :], mask=row_ok, other=0.0)
        lse = tl.load(LSE + (b * H + h) * N_Q + rows, mask=rows < N_Q, other=float('inf'))
        delta = tl.load(DELTA + (b * H + h) * N_Q + rows, mask=rows < N_Q, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _allowed(rows, cols, b, h, N_Q, N_K, MASK, s_mb, s_mh, s_mq, s_mk, SEQ_LO, SEQ_HI,
                      CAUSAL, HAS_MASK, VARLEN)
        p = tl.math.exp2(tl.where(ok, s, float('-inf')) - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * s_dkb + h * s_dkh + cols[:, None] * s_dkn + d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok)
    tl.store(DV + b * s_dvb + h * s_dvh + cols[:, None] * s_dvn + d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok)


# -----------------------------------------------------------------------------
# launch

def _launch_args(q, k, mask, causal, seq):
    """Keyword arguments every kernel takes, and the (B, H, Nq, Nk) sizes."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    kw = dict(MASK=mask, SEQ_LO=seq[0] if seq else None, SEQ_HI=seq[1] if seq else None,
              s_mb=mask_strides[0], s_mh=mask_strides[1], s_mq=mask_strides[2], s_mk=mask_strides[3],
              H=H, GROUP=H // k.shape[1], N_Q=Nq, N_K=Nk,
              N_Q_BUCKET=triton.next_power_of_2(Nq), N_K_BUCKET=triton.next_power_of_2(Nk),
              HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
              HAS_MASK=mask is not None, VARLEN=seq is not None,
              # fp32: a true fp32 product (as SDPA computes), not tf32; fp16/bf16: the default
              PRECISION='ieee' if q.dtype == torch.float32 else None)
    return kw, (B, H, Nq, Nk)


def _strides(name, t):
    """{s_<name>b, s_<name>h, s_<name>n}: the kernels' stride arguments (the head-dim stride is 1)."""
    return dict(zip([f's_{name}b', f's_{name}h', f's_{name}n'], t.stride()[:3]))


def _on_device(t):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, mask, seq):
        kw, (B, H, Nq, Nk) = _launch_args(q, k, mask, causal, seq)
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
        o = torch.empty_like(q)  # keeps q's layout, so a transposed (B, N, H, D) view stays cheap
        lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)  # log2 units
        grid = lambda meta: (triton.cdiv(Nq, meta['BLOCK_M']), B * H)
        with _on_device(q):
            _fwd_kernel[grid](q, k, v, o, lse, qk_scale=sm_scale * math.log2(math.e), **_strides('q', q),
                              **_strides('k', k), **_strides('v', v), **_strides('o', o), **kw)
        ctx.save_for_backward(q, k, v, o, lse, mask, *(seq or ()))
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, mask, *seq = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        kw, (B, H, Nq, Nk) = _launch_args(q, k, mask, ctx.causal, seq or None)
        group = kw['GROUP']
        dq = torch.empty_like(q)
        delta = torch.empty_like(lse)
        # each q head writes its own dk, dv; a GQA group is summed below, in fp32
        if group == 1:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
        else:
            dk = torch.empty((B, H, Nk, q.shape[-1]), device=q.device, dtype=torch.float32)
            dv = torch.empty_like(dk)
        scales = dict(qk_scale=ctx.sm_scale * math.log2(math.e), sm_scale=ctx.sm_scale)
        qkv = {**_strides('q', q), **_strides('k', k), **_strides('v', v), **_strides('do', do)}
        with _on_device(q):
            # dq first: it also computes delta, which the dk/dv kernel reads
            _bwd_dq_kernel[lambda meta: (triton.cdiv(Nq, meta['BLOCK_M']), B * H)](
                q, k, v, o, do, dq, lse, delta, **scales, **qkv, **_strides('o', o), **_strides('dq', dq), **kw)
            _bwd_dkdv_kernel[lambda meta: (triton.cdiv(Nk, meta['BLOCK_N']), B * H)](
                q, k, v, do, dk, dv, lse, delta, **scales, **qkv, **_strides('dk', dk), **_strides('dv', dv), **kw)
        if group > 1:
            dk = dk.view(B, H // group, group, Nk, -1).sum(2).to(k.dtype)
            dv = dv.view(B, H // group, group, Nk, -1).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None


def _check(q, k, v, causal, mask, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Nq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"k, v must be (B, Hkv, Nk, D) with H a multiple of Hkv; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of float32/float16/bfloat16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} > {MAX_HEAD_DIM} is not supported")
    if causal and Nq != k.shape[2]:
        raise ValueError(f"causal attention needs Nq == Nk, got {Nq} and {k.shape[2]}")
    if cu_seqlens is not None and Nq != k.shape[2]:
        raise ValueError(f"cu_seqlens packs q and k alike: needs Nq == Nk, got {Nq} and {k.shape[2]}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = may attend), got {mask.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise RuntimeError("bfloat16 gives wrong numbers in Triton's interpreter (TRITON_INTERPRET=1): "
                           "use float32 or float16 there, bfloat16 on a GPU")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton attention kernels need CUDA tensors; on the CPU they run only in "
                           "Triton's interpreter: set TRITON_INTERPRET=1 before this file is loaded")


def _sequence_bounds(cu_seqlens, n, device):
    """Per token, the [start, end) of its packed sequence, from cu_seqlens = [0, n1, n1 + n2, ..., n]."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = cu.diff()
    if cu.dim() != 1 or cu[0] != 0 or cu[-1] != n or (lengths < 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to N={n}, got {cu_seqlens.tolist()}")
    lo = cu[:-1].repeat_interleave(lengths).to(torch.int32)
    hi = cu[1:].repeat_interleave(lengths).to(torch.int32)
    return lo, hi


def flash_attention(q, k, v, causal=False, mask=None, cu_seqlens=None):
    """softmax(q k^T / sqrt(D)) v, fused; differentiable in q, k and v.

    q (B, H, Nq, D); k, v (B, Hkv, Nk, D) with H a multiple of Hkv. causal: query i sees keys j <= i
    (Nq == Nk). mask: bool, broadcastable to (B, H, Nq, Nk), True = may attend. cu_seqlens: 1-D
    ints [0, n1, n1 + n2, ..., N]: the N positions hold several sequences back to back (in every
    batch row) and each attends only within itself. Returns (B, H, Nq, D) in q's dtype.
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):  # autocast runs SDPA in its low precision: so do we
        q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
    _check(q, k, v, causal, mask, cu_seqlens)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if mask is not None:
        # stride 0 on the broadcast dims: the kernel reads the small mask, nothing is copied
        mask = mask.view(torch.uint8).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    seq = _sequence_bounds(cu_seqlens, q.shape[2], q.device) if cu_seqlens is not None else None
    return FlashAttention.apply(q, k, v, causal, mask, seq)
