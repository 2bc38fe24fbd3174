"""Hand-written LoRA (lora.py) on the MMDiT decoder, against itself and against the real peft library."""
import pytest
import torch

from peft import LoraConfig, PeftModel, get_peft_model
from test_decoder import TINY, inputs, make_reference, run_ours, run_ref

import lora
import model_decoder as md
from model_decoder import MMDiT, MMDiTConfig

# Flow-GRPO's decoder targets: the attention projections of both streams
TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out']
STYLE = dict(qk_norm='rms_norm', dual_attention_layers=(0,))  # attn2 layers are targets too


def randomise_lora_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def base_and_lora(seed=0, targets=TARGETS):
    torch.manual_seed(seed)
    model = MMDiT(MMDiTConfig(**TINY, **STYLE)).eval()
    x, t, c, p = inputs()
    base = run_ours(model, x, t, c, p)
    names = lora.apply_lora(model, targets, r=4, alpha=8)
    randomise_lora_B(model)
    return model, (x, t, c, p), base, names


def test_targets_wrap_diffusers_names():
    model, _, _, names = base_and_lora()
    assert 'transformer_blocks.0.attn.to_out.0' in names and 'transformer_blocks.0.attn2.to_q' in names
    assert 'transformer_blocks.0.attn.to_add_out' in names
    last = TINY['num_layers'] - 1
    assert f'transformer_blocks.{last}.attn.add_q_proj' in names  # the last block has no to_add_out
    assert not any('ff' in n or 'norm' in n for n in names)
    per_block = 8 + 4  # joint attention + attn2 (to_q, to_k, to_v, to_out.0)
    assert len(names) == per_block + 8 * (TINY['num_layers'] - 2) + 7
    # the base checkpoint keys are unchanged by wrapping
    assert set(lora.base_state_dict(model)) == set(MMDiT(MMDiTConfig(**TINY, **STYLE)).state_dict())


def test_merged_equals_unmerged_and_disabled_equals_base():
    model, args, base, _ = base_and_lora()
    with_lora = run_ours(model, *args)
    assert (with_lora - base).abs().max() > 1e-3  # B != 0: the adapter changes the output
    with lora.lora_disabled(model):
        assert (run_ours(model, *args) - base).abs().max() < 1e-6
    lora.merge_lora(model)
    assert (run_ours(model, *args) - with_lora).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match='unmerge'):
        lora.set_lora_enabled(model, False)
    lora.unmerge_lora(model)
    assert (run_ours(model, *args) - with_lora).abs().max() < 1e-5
    with lora.lora_disabled(model):
        assert (run_ours(model, *args) - base).abs().max() < 1e-5


def test_only_adapters_get_gradients_and_checkpointing_agrees():
    model, (x, t, c, p), _, _ = base_and_lora()
    model.requires_grad_(False)
    params = lora.lora_parameters(model)
    for q in params:
        q.requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        md.flow_matching_loss(model, x, c, p, generator=torch.Generator().manual_seed(0)).backward()
        grads.append([q.grad.clone() for q in params])
    names = [n for n, m in lora.lora_layers(model).items() for _ in (m.lora_A, m.lora_B)]
    last_q = f"transformer_blocks.{TINY['num_layers'] - 1}.attn.add_q_proj"
    for name, g in zip(names[1::2], grads[0][1::2]):
        # the last block's text queries feed nothing (its text output is dropped): no signal there
        assert (g.abs().sum() == 0) == (name == last_q), name
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_peft_round_trip(tmp_path):
    model, args, _, _ = base_and_lora()
    expected = run_ours(model, *args)
    lora.save_peft(model, tmp_path)
    fresh, _, _, _ = base_and_lora(seed=0)  # same base weights, different adapter values
    randomise_lora_B(fresh, seed=1)
    assert (run_ours(fresh, *args) - expected).abs().max() > 1e-3
    lora.load_peft(fresh, tmp_path)
    assert (run_ours(fresh, *args) - expected).abs().max() < 1e-6
    # and into an unwrapped model: load_peft wraps it as adapter_config.json says
    torch.manual_seed(0)
    plain = MMDiT(MMDiTConfig(**TINY, **STYLE)).eval()
    lora.load_peft(plain, tmp_path)
    assert (run_ours(plain, *args) - expected).abs().max() < 1e-6


def test_save_pretrained_refuses_unmerged_lora(tmp_path):
    model, args, _, _ = base_and_lora()
    with pytest.raises(ValueError, match='unmerged LoRA'):
        model.save_pretrained(tmp_path)
    expected = run_ours(model, *args)
    lora.merge_lora(model)
    model.save_pretrained(tmp_path)  # merged weights, base keys only
    assert (run_ours(MMDiT.from_pretrained(str(tmp_path)), *args) - expected).abs().max() < 1e-5


def test_targets_matching_nothing_is_an_error():
    model = MMDiT(MMDiTConfig(**TINY))
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.apply_lora(model, ['to_qq', 'attn.out'], r=4, alpha=8)


def saved_diffusers_base(tmp_path):
    ref = make_reference('sd35_medium')
    ref.save_pretrained(tmp_path / 'base')
    return ref


def test_peft_library_adapter_loads_into_ours(tmp_path):
    peft_model = get_peft_model(saved_diffusers_base(tmp_path),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights='gaussian'))
    with torch.no_grad():
        for name, w in peft_model.named_parameters():
            if 'lora_B' in name:
                w.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / 'adapter')
    x, t, c, p = inputs()
    expected = run_ref(peft_model, x, t, c, p)
    ours = MMDiT.from_pretrained(str(tmp_path / 'base')).eval()
    assert (run_ours(ours, x, t, c, p) - expected).abs().max() > 1e-3
    lora.load_peft(ours, tmp_path / 'adapter')
    assert (run_ours(ours, x, t, c, p) - expected).abs().max() < 1e-5


def test_our_adapter_loads_into_diffusers_with_peft(tmp_path):
    saved_diffusers_base(tmp_path)
    ours = MMDiT.from_pretrained(str(tmp_path / 'base')).eval()
    lora.apply_lora(ours, TARGETS, r=4, alpha=8)
    randomise_lora_B(ours)
    lora.save_peft(ours, tmp_path / 'ours')
    from diffusers import SD3Transformer2DModel
    ref = SD3Transformer2DModel.from_pretrained(tmp_path / 'base').eval()
    loaded = PeftModel.from_pretrained(ref, tmp_path / 'ours')
    x, t, c, p = inputs()
    assert (run_ref(loaded, x, t, c, p) - run_ours(ours, x, t, c, p)).abs().max() < 1e-5


def test_adapter_is_fp32_on_a_bf16_base():
    """A bf16 base (real models' frozen weights) gets an fp32 adapter, so AdamW's small updates are not
    rounded away; the output keeps the base's dtype and equals base + B A x scaling."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = lora.LoRALinear(base, r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    expected = base(x).float() + (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), expected, atol=0.05, rtol=0.02)
