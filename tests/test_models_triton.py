"""Both models with every attention call forced through the Triton kernels (the interpreter on a CPU):
the same parity with diffusers / transformers as with SDPA, and proof that the models reach the kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported

import common  # noqa: E402
from model_decoder import MMDiT  # noqa: E402
from test_decoder import inputs, make_reference, run_ref  # noqa: E402
from test_encoder import hf_logits, make_batch, make_pair  # noqa: E402

ka = common.attention_kernels()  # kernels/attention.py, the module common.attention calls


@pytest.fixture
def triton_forced(monkeypatch):
    """Force the Triton backend and count the kernel calls."""
    monkeypatch.setenv('NANOUAE_ATTENTION', 'triton')
    calls = []
    real = ka.flash_attention

    def counting(*args, **kw):
        calls.append(kw.get('causal', False))
        return real(*args, **kw)
    monkeypatch.setattr(ka, 'flash_attention', counting)
    return calls


@pytest.mark.parametrize('style', ['sd35_large', 'sd35_medium'])
def test_decoder_parity_through_triton(triton_forced, style, tmp_path):
    ref = make_reference(style)
    ref.save_pretrained(tmp_path)
    model = MMDiT.from_pretrained(str(tmp_path)).eval()
    x, t, c, p = inputs(B=2, H=8, W=12, L=5)
    with torch.no_grad():
        got = model(x, t, c, p)
    expected = run_ref(ref, x, t, c, p)
    assert len(triton_forced) == 3 + (2 if style == 'sd35_medium' else 0)  # one per block (+ attn2)
    assert (got - expected).abs().max() < 1e-4


def test_encoder_parity_through_triton(triton_forced):
    ours, hf = make_pair(tied=True)
    batch = make_batch()
    with torch.no_grad():
        got, want = ours(**batch), hf_logits(hf, batch)
    real = batch['attention_mask'].bool()
    c = ours.config
    assert len(triton_forced) == c.vision_depth + c.num_hidden_layers  # every vision and LLM layer
    assert (got - want)[real].abs().max() < 1e-4
