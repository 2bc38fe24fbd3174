"""The encoder model against transformers' Qwen2_5_VLForConditionalGeneration (+ peft) on tiny random configs:
logits, generation, UAE prompt embeddings, LoRA, checkpoint layouts. Run: python -m pytest -q tests/test_encoder.py"""
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lora import apply_lora, lora_disabled, lora_layers, load_peft, merge_lora, save_peft, unmerge_lora
from model_encoder import NEGATIVE_PROMPT, Encoder, EncoderConfig, sample_logits, warp_logits
from test_encoder_text import build_tokenizer
from tokenizer import Tokenizer
from train_rl import config as rl_config

LLM_LORA_TARGETS = rl_config['llm_lora_targets']  # UAE's encoder LoRA: every linear layer of the LLM

transformers.logging.set_verbosity_error()
VS, VE, IMG, EOS = 288, 289, 290, 299


def tiny_config(tied=False, **kw):
    """GQA (4 query / 2 kv heads); vision: patch 4, windows of 2x2 merged tokens, block 1 full attention."""
    kw = dict(dict(vocab_size=300, image_token_id=IMG, vision_start_token_id=VS, vision_end_token_id=VE,
                   eos_token_id=EOS), **kw)
    return EncoderConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=10000.0, mrope_section=[2, 3, 3], tie_word_embeddings=tied,
                         vision_depth=3, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2,
                         patch_size=4, window_size=16, fullatt_block_indexes=[1], **kw)


def make_pair(tied=False, seed=0, projector=False, **kw):
    """Our model with random weights (larger than init, so logits are far from ties) and transformers' twin."""
    torch.manual_seed(seed)
    config = tiny_config(tied, **kw)
    if projector:
        config.projector_hidden_size, config.projector_out_size = 96, 48
    ours = Encoder(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in name or 'ln_q' in name else 0.1 * torch.randn_like(p))
    hf_config = {k: v for k, v in config.to_hf().items() if not k.startswith(('projector', 'architectures', 'model_type'))}
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config)).eval()
    hf.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith('projector.')}, strict=True)
    return ours, hf


def make_batch(sides=('right', 'left', 'right'), seed=0):
    """Row 0: two images (6x10 patches: uneven windows; 8x12), row 1: one 4x8 image, row 2: text only."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 280, (n,), generator=g).tolist()
    image = lambda n: [VS] + [IMG] * n + [VE]
    grids = torch.tensor([[1, 6, 10], [1, 8, 12], [1, 4, 8]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g)
    rows = [text(3) + image(15) + text(4) + image(24) + text(5), text(6) + image(8) + text(10), text(30)]
    L = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), L, dtype=torch.long), torch.zeros(len(rows), L, dtype=torch.long)
    for i, (row, side) in enumerate(zip(rows, sides)):
        span = slice(0, len(row)) if side == 'right' else slice(L - len(row), L)
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)


def hf_logits(hf, batch):
    return hf(**batch, mm_token_type_ids=(batch['input_ids'] == IMG).int()).logits


@pytest.mark.parametrize('tied', [False, True])
def test_logits_match_transformers(tied):
    ours, hf = make_pair(tied)
    batch = make_batch()
    with torch.no_grad():
        got, want = ours(**batch), hf_logits(hf, batch)
    real = batch['attention_mask'].bool()
    assert (got - want)[real].abs().max() < 1e-4
    assert want[real].std() > 0.5  # not a trivially small output


def test_greedy_generation_matches_transformers():
    ours, hf = make_pair()
    batch = make_batch(sides=('left', 'left', 'left'))
    L = batch['input_ids'].shape[1]
    with torch.no_grad():
        got = ours.generate(**batch, max_new_tokens=20, greedy=True, pad_token_id=0)
        eos = int(got.tokens[0, 5])  # make row 0 stop at step 5 (its first occurrence of that token)
        first = int((got.tokens[0] == eos).nonzero()[0])
        got = ours.generate(**batch, max_new_tokens=20, greedy=True, eos_token_id=eos, pad_token_id=0)
        want = hf.generate(**batch, mm_token_type_ids=(batch['input_ids'] == IMG).int(), max_new_tokens=20,
                           do_sample=False, eos_token_id=eos, pad_token_id=0)[:, L:]
    assert got.tokens.shape == want.shape and torch.equal(got.tokens, want)
    assert got.mask[0, :first + 1].all() and not got.mask[0, first + 1:].any()
    # padding on either side gives the same continuation (positions and keys follow the attention mask)
    with torch.no_grad():
        right = ours.generate(**make_batch(sides=('right', 'right', 'left')), max_new_tokens=20, greedy=True,
                              eos_token_id=eos, pad_token_id=0)
    assert torch.equal(right.tokens, got.tokens)


def test_sampled_logprobs_equal_full_forward():
    ours, _ = make_pair()
    batch = make_batch(sides=('left', 'left', 'left'))
    kw = dict(max_new_tokens=12, temperature=0.7, top_k=40, top_p=0.9, pad_token_id=0)
    first = ours.generate(**batch, **kw, eos_token_id=-1, generator=torch.Generator().manual_seed(0))
    eos = [int(first.tokens[0, 3]), int(first.tokens[1, 6])]  # the same seed again: rows 0 and 1 stop early
    out = ours.generate(**batch, **kw, eos_token_id=eos, generator=torch.Generator().manual_seed(0))
    assert not out.mask.all() and out.mask[:, 0].all()  # some rows stopped early
    L, T = batch['input_ids'].shape[1], out.tokens.shape[1]
    ids = torch.cat([batch['input_ids'], out.tokens], 1)
    mask = torch.cat([batch['attention_mask'].bool(), out.mask], 1)
    with torch.no_grad():
        logits = ours(ids, mask, batch['pixel_values'], batch['image_grid_thw'])
        rescored = ours.token_logprobs(batch, out.tokens, out.mask, temperature=0.7)
    logp = torch.log_softmax(logits[:, L - 1:L - 1 + T].float() / 0.7, -1).gather(2, out.tokens[..., None])[..., 0]
    assert (logp - out.logprobs)[out.mask].abs().max() < 1e-4
    assert (rescored - out.logprobs).abs().max() < 1e-4
    assert (out.logprobs[~out.mask] == 0).all() and (out.tokens[~out.mask] == 0).all()
    assert not out.logprobs.is_inference()  # usable as GRPO's old log-probs in autograd
    # top-k = 1 and a tiny top-p both reduce sampling to greedy
    logits = torch.randn(4, 300)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert torch.equal(sample_logits(logits, 1.3, **kw)[0], logits.argmax(-1))


def whole_logits_logprobs(enc, batch, tokens, mask, temperature, suppress):
    """token_logprobs and its entropy computed the plain way: every (B, T, vocab) logit at once."""
    ids = torch.cat([batch['input_ids'], tokens], 1)
    full_mask = torch.cat([batch['attention_mask'].bool(), mask], 1)
    logits = enc(ids, full_mask, batch['pixel_values'], batch['image_grid_thw'])[:, -tokens.shape[1] - 1:-1]
    logits = logits.float() / temperature
    logits[..., suppress] = -float('inf')
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0].masked_fill(~mask, 0.0)
    p = logits.softmax(-1)
    ent = -(p * torch.log_softmax(logits, -1).masked_fill(p == 0, 0.0)).sum(-1).masked_fill(~mask, 0.0)
    return logp, ent.detach()


@pytest.mark.parametrize('rows', [2, 1000])
def test_chunked_logprobs_and_gradients_equal_whole_logits(monkeypatch, rows):
    """token_logprobs makes the logits a chunk of positions at a time, checkpointed: the log-probs, the
    entropies and the gradient of every parameter (tied embedding included) equal the plain computation's."""
    import model_encoder
    monkeypatch.setattr(model_encoder, 'LOGITS_CHUNK', rows * 300)
    ours, _ = make_pair(tied=True)
    batch = make_batch(sides=('left', 'left', 'left'))
    tokens = torch.randint(0, 280, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(9) < torch.tensor([9, 4, 0])[:, None]  # row 1 stopped early, row 2 at once
    suppress, weights = [IMG, VS, VE, 7, 8], torch.randn(3, 9, generator=torch.Generator().manual_seed(2))
    grads = []
    for chunked in (True, False):
        ours.zero_grad()
        if chunked:
            logp, ent = ours.token_logprobs(batch, tokens, mask, 0.7, True, suppress)
        else:
            logp, ent = whole_logits_logprobs(ours, batch, tokens, mask, 0.7, suppress)
        (logp * weights).sum().backward()
        grads.append(({n: p.grad.clone() for n, p in ours.named_parameters()}, logp.detach(), ent))
    (got, logp, ent), (want, logp_ref, ent_ref) = grads
    torch.testing.assert_close(logp, logp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-5)
    assert (logp[~mask] == 0).all() and (logp[mask] < 0).all() and (ent[mask] > 0).all()
    assert want.keys() == got.keys() and len(want) > 40
    for n in want:
        scale = want[n].abs().max()
        assert (got[n] - want[n]).abs().max() <= 1e-5 * max(scale, 1), n
    assert want['model.language_model.embed_tokens.weight'].abs().max() > 1e-2  # tied: the lm_head's too
    with torch.no_grad():  # without a graph too, and the log-probs alone
        torch.testing.assert_close(ours.token_logprobs(batch, tokens, mask, 0.7, suppress_tokens=suppress), logp,
                                   rtol=0, atol=1e-5)


def test_embed_prompt_matches_official_padding(tmp_path):
    """UAE pads positive and negative prompts on the right with the pad token, mask = ids != pad; transformers
    4.x (which UAE ran) gave padding position 1. Compare every position, padding included."""
    build_tokenizer(str(tmp_path))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    ids = {k: tok.added[f'<|{k}|>'] for k in ('vision_start', 'vision_end', 'image_pad')}
    ours, hf = make_pair(projector=True, vocab_size=tok.vocab_size, image_token_id=ids['image_pad'],
                         vision_start_token_id=ids['vision_start'], vision_end_token_id=ids['vision_end'])
    captions = ['a red circle', 'x']  # SFT targets: caption ids + <|im_end|>, right-padded
    tokens, mask = ours.caption_tokens(captions, tok)
    assert tokens[0, :mask[0].sum()].tolist() == tok.encode(captions[0]) + [tok.added['<|im_end|>']]
    assert mask.sum(1).tolist() == [len(tok.encode(c)) + 1 for c in captions]
    prompts = ['a red circle above a blue square', NEGATIVE_PROMPT, 'x']
    with torch.no_grad():
        got = ours.embed_prompt(prompts, tok)
        seqs = [tok.chat_ids(p, 'generate') for p in prompts]
        input_ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], True, tok.pad_token_id)
        mask = input_ids.ne(tok.pad_token_id)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)[None].expand(3, -1, -1)
        h = hf.model(input_ids=input_ids, attention_mask=mask.long(), position_ids=pos).last_hidden_state
        want = ours.projector(h)
    assert got.shape == (3, max(map(len, seqs)), 48) and (got - want).abs().max() < 1e-4


def test_lora_disabled_merged_and_targets():
    ours, _ = make_pair(projector=True)
    batch = make_batch()
    real = batch['attention_mask'].bool()
    with torch.no_grad():
        base = ours(**batch)
        names = apply_lora(ours, LLM_LORA_TARGETS, r=4, alpha=8)
        assert len(names) == 7 * 2 and all(n.startswith('model.language_model.layers.') for n in names)
        for m in lora_layers(ours).values():
            m.lora_B.weight.normal_(0, 0.1)
        tuned = ours(**batch)
        with lora_disabled(ours):
            assert torch.equal(ours(**batch), base)
        merge_lora(ours)
        assert (ours(**batch) - tuned)[real].abs().max() < 1e-4
        unmerge_lora(ours)
        assert (ours(**batch) - tuned)[real].abs().max() < 1e-5
    assert (tuned - base)[real].abs().max() > 1e-2


def test_peft_adapter_loads_into_transformers(tmp_path):
    from peft import PeftModel
    ours, hf = make_pair()
    batch = make_batch()
    real = batch['attention_mask'].bool()
    apply_lora(ours, LLM_LORA_TARGETS, r=4, alpha=8)
    with torch.no_grad():
        for m in lora_layers(ours).values():
            m.lora_B.weight.normal_(0, 0.1)
        want = ours(**batch)
    save_peft(ours, str(tmp_path))
    peft_hf = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    fresh, _ = make_pair()
    load_peft(fresh, str(tmp_path))
    with torch.no_grad():
        assert (hf_logits(peft_hf, batch) - want)[real].abs().max() < 1e-4
        assert (fresh(**batch) - want)[real].abs().max() < 1e-5


def test_uae_llm_lora_full_state_dict(tmp_path):
    """UAE wraps `model` with peft and saves the whole state dict in three shards; we load it strictly."""
    from peft import LoraConfig, get_peft_model
    ours, hf = make_pair(projector=True)
    ours.save_pretrained(str(tmp_path / 'llm'))
    hf.projector = ours.projector  # UAE's Qwen2_5_VLWithLongContext holds the projector beside model/lm_head
    targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']  # vision MLP too
    hf.model = get_peft_model(hf.model, LoraConfig(r=4, lora_alpha=8, init_lora_weights='gaussian', target_modules=targets))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.1)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    assert any(k.startswith('model.base_model.model.language_model.') and '.lora_A.default.' in k for k in state)
    (tmp_path / 'lora').mkdir()
    keys = sorted(state)
    for i in range(3):
        save_file({k: state[k] for k in keys[i::3]}, str(tmp_path / 'lora' / f'model-0000{i + 1}-of-00003.safetensors'))
    enc = Encoder.from_pretrained(str(tmp_path / 'llm'))
    enc.load_llm_lora(str(tmp_path / 'lora'), alpha=8)
    assert any('visual' in n for n in lora_layers(enc)) and len(lora_layers(enc)) == 7 * 2 + 3 * 3
    batch = make_batch()
    with torch.no_grad():
        assert (enc(**batch) - hf_logits(hf, batch))[batch['attention_mask'].bool()].abs().max() < 1e-4
    # the old (transformers < 4.52) layout: visual.*, model.layers.*, PEFT around the text model
    for old, new in [('model.base_model.model.layers.0.mlp.up_proj.lora_A.default.weight',
                      'model.language_model.layers.0.mlp.up_proj.lora_A.weight'),
                     ('model.base_model.model.layers.1.self_attn.q_proj.base_layer.bias',
                      'model.language_model.layers.1.self_attn.q_proj.bias'),
                     ('visual.merger.mlp.0.weight', 'model.visual.merger.mlp.0.weight'),
                     ('model.embed_tokens.weight', 'model.language_model.embed_tokens.weight'),
                     ('lm_head.weight', 'lm_head.weight'), ('projector.2.bias', 'projector.2.bias')]:
        assert Encoder.canonical_key(old) == new


@pytest.mark.parametrize('tied', [False, True])
def test_checkpoints_round_trip_with_transformers(tmp_path, tied):
    ours, hf = make_pair(tied)
    batch = make_batch()
    real = batch['attention_mask'].bool()
    with torch.no_grad():
        want = ours(**batch)
        ours.save_pretrained(str(tmp_path / 'ours'))  # ours -> transformers
        assert (hf_logits(Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / 'ours')).eval(), batch)
                - want)[real].abs().max() < 1e-4
        hf.save_pretrained(str(tmp_path / 'hf'))  # transformers -> ours
        loaded = Encoder.from_pretrained(str(tmp_path / 'hf'))
        assert torch.equal(loaded(**batch), want)
        # still tied: one tensor (trained as one, and the 3B model's 311M-parameter embedding held once)
        embed = loaded.model.language_model.embed_tokens.weight
        assert (loaded.lm_head.weight is embed) == tied
        # old layout: flat config with rope_scaling, keys visual.* / model.*, sharded with an index
        config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
        flat = dict(config, **config.pop('text_config'))
        flat['rope_scaling'] = dict(type='mrope', mrope_section=flat.pop('rope_parameters')['mrope_section'])
        flat['rope_theta'] = 10000.0
        old = tmp_path / 'old'
        old.mkdir()
        (old / 'config.json').write_text(json.dumps(flat))
        state = {k.replace('model.language_model.', 'model.').replace('model.visual.', 'visual.'): v
                 for k, v in ours.state_dict().items() if not (tied and k == 'lm_head.weight')}
        keys = sorted(state)
        shards = {k: f'model-0000{1 + i % 2}-of-00002.safetensors' for i, k in enumerate(keys)}
        for name in set(shards.values()):
            save_file({k: state[k].contiguous() for k in keys if shards[k] == name}, str(old / name))
        (old / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': shards}))
        assert torch.equal(Encoder.from_pretrained(str(old))(**batch), want)


def test_loading_assigns_in_the_asked_dtype(tmp_path):
    """from_pretrained builds on the meta device and takes the file's tensors (cast): an fp32 file loads as
    bf16, tied weights stay one tensor; load_llm_lora then replaces the weights and keeps each tensor's
    dtype (bf16 base, fp32 LoRA) and whether it trains."""
    from lora import lora_parameters
    ours, _ = make_pair(tied=True)
    ours.save_pretrained(str(tmp_path / 'llm'))
    enc = Encoder.from_pretrained(str(tmp_path / 'llm'), dtype=torch.bfloat16)
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16} and not any(p.is_meta for p in enc.parameters())
    assert enc.lm_head.weight is enc.model.language_model.embed_tokens.weight
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(enc(**batch), ours.to(torch.bfloat16)(**batch))
    ours.float()
    apply_lora(ours, LLM_LORA_TARGETS, r=4, alpha=8)
    for m in lora_layers(ours).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    (tmp_path / 'lora').mkdir()
    save_file({k: v.clone() for k, v in ours.state_dict().items()}, str(tmp_path / 'lora' / 'model.safetensors'))
    apply_lora(enc, LLM_LORA_TARGETS, r=4, alpha=8)
    trains = {n: p.requires_grad for n, p in enc.named_parameters()}
    enc.load_llm_lora(str(tmp_path / 'lora'), alpha=8)
    assert {n: p.requires_grad for n, p in enc.named_parameters()} == trains
    assert {p.dtype for p in lora_parameters(enc)} == {torch.float32}
    assert enc.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert enc.lm_head.weight is enc.model.language_model.embed_tokens.weight
    with torch.no_grad():
        assert (enc(**batch).float() - ours(**batch)).abs().max() < 0.1 * ours(**batch).abs().max()


def test_strict_loading_names_bad_keys(tmp_path):
    ours, _ = make_pair()
    state = ours.state_dict()
    good = {k: v for k, v in state.items()}
    cases = {'missing': ({k: v for k, v in good.items() if k != 'model.visual.blocks.1.attn.qkv.bias'},
                         'model.visual.blocks.1.attn.qkv.bias'),
             'unexpected': (dict(good, **{'model.language_model.layers.9.mlp.up_proj.weight': torch.zeros(1)}),
                            'model.language_model.layers.9.mlp.up_proj.weight'),
             'shape': (dict(good, **{'lm_head.weight': torch.zeros(3, 64)}), 'lm_head.weight')}
    for state, key in cases.values():
        with pytest.raises(ValueError, match=key.replace('.', r'\.')):
            Encoder(tiny_config()).load_weights(state, 'test')
    with pytest.raises(FileNotFoundError, match='config.json'):
        Encoder.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# captioning: ids a caption may not contain, and the released generation_config.json

def test_captions_never_hold_ids_the_tokenizer_cannot_write(tmp_path):
    """The model's vocabulary may be larger than the tokenizer's (Qwen2.5-VL: 151665-151935). Even from
    logits that favour them, captions never hold those ids nor vision tokens; token_logprobs given the same
    list is the sampler's distribution; and decode drops such ids where they do come (plain generate)."""
    build_tokenizer(str(tmp_path))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    n, slot = tok.vocab_size, {k: tok.added[f'<|{k}|>'] for k in ('vision_start', 'vision_end', 'image_pad')}
    ours, _ = make_pair(vocab_size=n + 16, image_token_id=slot['image_pad'], eos_token_id=-1,
                        vision_start_token_id=slot['vision_start'], vision_end_token_id=slot['vision_end'])
    ours.tokenizer, ours.min_pixels, ours.max_pixels = tok, 256, 256
    banned = ours.caption_suppress_tokens()
    assert banned == [slot['image_pad'], slot['vision_start'], slot['vision_end'], *range(n, n + 16)]
    bias = torch.zeros(n + 16)
    bias[banned] = 20.0
    ours.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    rng = np.random.default_rng(0)
    batch = ours.caption_inputs([Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(2)])
    kw = dict(max_new_tokens=12, temperature=1.0)
    free = ours.generate(**batch, **kw, generator=torch.Generator().manual_seed(0))
    assert torch.isin(free.tokens, torch.tensor(banned)).float().mean() > 0.5  # the logits do favour them
    assert tok.decode(free.tokens[0]) == tok.decode([t for t in free.tokens[0].tolist() if t < n])
    out = ours.generate(**batch, **kw, suppress_tokens=banned, generator=torch.Generator().manual_seed(0))
    assert not torch.isin(out.tokens, torch.tensor(banned)).any()
    with torch.no_grad():
        logp = ours.token_logprobs(batch, out.tokens, out.mask, 1.0, suppress_tokens=banned)
    assert (logp - out.logprobs).abs().max() < 1e-4


QWEN_GENERATION = dict(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05,
                       eos_token_id=[EOS, 298])  # Qwen2.5-VL's released values (its eos ids: 151645, 151643)


def rows_alone(batch):
    """Each row of make_batch() unpadded, with its own images: how the official demo captions (one at a time)."""
    patches = batch['image_grid_thw'].prod(-1)
    start = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
    for row, images in enumerate([[0, 1], [2], []]):
        real = batch['attention_mask'][row].bool()
        one = dict(input_ids=batch['input_ids'][row, real][None])
        if images:
            one.update(pixel_values=batch['pixel_values'][start[images[0]]:start[images[-1] + 1]],
                       image_grid_thw=batch['image_grid_thw'][images])
        yield one


@pytest.mark.parametrize('generation', ['qwen2.5-vl', 'no top_k'])
def test_sampling_follows_generation_config_as_transformers(tmp_path, generation):
    """With the checkpoint's generation_config.json and UAE's demo overrides (do_sample, temperature 0.7),
    each next-token distribution equals the one transformers' logits processors make (repetition penalty
    over prompt + generated ids, temperature, top-k, top-p; a key the file lacks: transformers' default,
    top_k 50). Qwen2.5-VL's file makes it greedy: the tokens then equal transformers' own, batched or not."""
    ours, _ = make_pair()
    ours.save_pretrained(str(tmp_path))
    file = QWEN_GENERATION if generation == 'qwen2.5-vl' else dict(do_sample=True, top_p=0.8, repetition_penalty=1.3)
    (tmp_path / 'generation_config.json').write_text(json.dumps(file))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ours = Encoder.from_pretrained(str(tmp_path))
    settings = ours.sampling_settings()
    assert settings == dict(top_k=file.get('top_k', 50), top_p=file['top_p'],
                            repetition_penalty=file['repetition_penalty'])
    torch.manual_seed(0)
    want, penalty_matters = [], False
    for row in rows_alone(make_batch()):
        with torch.no_grad():
            o = hf.generate(**row, mm_token_type_ids=(row['input_ids'] == IMG).int(), do_sample=True,
                            temperature=0.7, max_new_tokens=16, output_scores=True, return_dict_in_generate=True)
            L = row['input_ids'].shape[1]
            new = o.sequences[0, L:]
            logits = ours(o.sequences, pixel_values=row.get('pixel_values'),
                          image_grid_thw=row.get('image_grid_thw'))[0, L - 1:-1]
        for t, scores in enumerate(o.scores):
            seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
            seen[0, torch.cat([row['input_ids'][0], new[:t]])] = True
            got = warp_logits(logits[t:t + 1], 0.7, seen=seen, **settings)
            assert torch.equal(got.isinf(), scores.isinf())
            assert (got - scores)[~got.isinf()].abs().max() < 1e-4
            plain = warp_logits(logits[t:t + 1], 0.7, settings['top_k'], settings['top_p'])
            penalty_matters |= not torch.equal(plain.isinf(), scores.isinf()) or \
                bool((plain - scores)[~plain.isinf()].abs().max() > 1e-3)
        want.append(new)
    assert penalty_matters
    if generation == 'qwen2.5-vl':  # greedy in effect: the tokens themselves, left-padded in one batch
        out = ours.generate(**make_batch(sides=('left', 'left', 'left')), temperature=0.7, max_new_tokens=16,
                            **settings)
        assert [t[m].tolist() for t, m in zip(out.tokens, out.mask)] == [w.tolist() for w in want]
