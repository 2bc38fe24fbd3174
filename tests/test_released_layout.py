"""UAE's released directory layout, end to end: sample.py runs i2t, t2i and recon on a tiny checkpoint laid
out as the release is: llm/ (Qwen2.5-VL weights + projector, config.json, generation_config.json, no
tokenizer), llm_lora/ (three shards of a full state dict with PEFT names, transformers 4.50's key layout),
dit/ (a diffusers SD3Transformer2DModel directory), dit_lora/ (a PEFT adapter directory), and the
tokenizer, chat template and preprocessor config in a directory of their own (UAE's
llm_model_preprocessor). Run: python -m pytest -q tests/test_released_layout.py"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import pipeline
import sample
from common import save_safetensors
from images import CLIP_MEAN, CLIP_STD
from test_encoder import tiny_config
from test_encoder_text import build_tokenizer
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qwen2.5-VL's released generation_config.json, its eos ids mapped to the tiny tokenizer's
QWEN_GENERATION = dict(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05)
LLM_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
DIT_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out']


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    """The released layout in a temporary directory; returns (root, transformers' model with the LoRA)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    d = tmp_path_factory.mktemp('uae')
    torch.manual_seed(0)
    # the processor directory: tokenizer, chat template (tokenizer_config.json), preprocessor config
    build_tokenizer(str(d / 'llm_model_preprocessor'))
    tok = Tokenizer.from_pretrained(str(d / 'llm_model_preprocessor'))
    (d / 'llm_model_preprocessor' / 'preprocessor_config.json').write_text(json.dumps(dict(
        image_processor_type='Qwen2VLImageProcessor', min_pixels=256, max_pixels=1024, patch_size=4, merge_size=2,
        temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)))
    # llm/: the model's vocabulary is larger than the tokenizer's, as Qwen2.5-VL's
    config = tiny_config(vocab_size=tok.vocab_size + 30, image_token_id=tok.added['<|image_pad|>'],
                         vision_start_token_id=tok.added['<|vision_start|>'],
                         vision_end_token_id=tok.added['<|vision_end|>'], eos_token_id=tok.added['<|im_end|>'])
    hf_config = {k: v for k, v in config.to_hf().items()
                 if not k.startswith(('projector', 'architectures', 'model_type'))}
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config)).eval()
    hf.save_pretrained(str(d / 'llm'))
    eos = [tok.added['<|im_end|>'], tok.added['<|endoftext|>']]
    (d / 'llm' / 'generation_config.json').write_text(json.dumps(dict(QWEN_GENERATION, eos_token_id=eos)))
    hf.projector = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    weights = load_file(str(d / 'llm' / 'model.safetensors'))
    weights.update({f'projector.{k}': v for k, v in hf.projector.state_dict().items()})
    save_file(weights, str(d / 'llm' / 'model.safetensors'), metadata={'format': 'pt'})
    # llm_lora/: UAE wrapped the text decoder with peft (r 32, alpha 64, gaussian) and saved the whole state
    # dict in three shards, under transformers 4.50's names (visual.*, model.* = the text decoder)
    hf.model.language_model = get_peft_model(hf.model.language_model, LoraConfig(
        r=32, lora_alpha=64, init_lora_weights='gaussian', target_modules=LLM_TARGETS))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.05)
    state = {k.replace('model.language_model.base_model.model.', 'model.base_model.model.')
             .replace('model.visual.', 'visual.'): v.clone() for k, v in hf.state_dict().items()}
    assert any(k.startswith('model.base_model.model.layers.0.') and 'lora_A.default' in k for k in state)
    keys = sorted(state)
    (d / 'llm_lora').mkdir()
    for i in range(3):
        save_file({k: state[k] for k in keys[i::3]}, str(d / 'llm_lora' / f'model-0000{i + 1}-of-00003.safetensors'))
    # dit/ and dit_lora/: diffusers and peft, pixel space (no VAE)
    dit = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
                                qk_norm='rms_norm')
    dit.save_pretrained(str(d / 'dit'))
    dit = get_peft_model(dit, LoraConfig(r=4, lora_alpha=8, init_lora_weights='gaussian', target_modules=DIT_TARGETS))
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.05)
    dit.save_pretrained(str(d / 'dit_lora'))
    save_safetensors({'pooled': torch.randn(16)}, str(d / 'pooled.safetensors'))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / 'photo.png')
    return d, hf


def paths(d, **kw):
    return dict(dict(llm=d / 'llm', processor=d / 'llm_model_preprocessor', llm_lora=d / 'llm_lora', dit=d / 'dit',
                     dit_lora=d / 'dit_lora', vae='', pooled=d / 'pooled.safetensors'), **kw)


def run_sample(**kw):
    args = [f'--{k}={v}' for k, v in dict(steps=2, size=16, max_new_tokens=8, **kw).items()]
    p = subprocess.run([sys.executable, 'sample.py', *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_sample_runs_on_the_released_layout(release, tmp_path):
    d, hf = release
    cfg = dict(sample.config, **{k: str(v) for k, v in paths(d).items()}, device='cpu')
    enc, _, vae, _ = pipeline.load_uae(cfg, 'cpu')
    assert vae is None and os.path.dirname(enc.tokenizer.files[0]) == str(d / 'llm_model_preprocessor')
    assert (enc.min_pixels, enc.max_pixels) == (256, 1024)  # from the processor directory
    ids = torch.tensor([enc.tokenizer.chat_ids('a red circle', 'generate')])
    with torch.no_grad():  # the llm_lora shards load as transformers + peft run them
        assert (enc(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4
    # generation_config.json (top_k 1) makes captioning greedy in effect: the seed does not matter
    want = [pipeline.caption(enc, [Image.open(d / 'photo.png')], 0.7, 8, generator=torch.Generator().manual_seed(s),
                           **{k: cfg[k] for k in sample.SAMPLING_KEYS})[0][0] for s in (0, 1)]
    assert want[0] == want[1] and want[0].strip()
    text = run_sample(**paths(d), mode='i2t', image=d / 'photo.png', seed=0)
    assert want[0] in text
    out = tmp_path / 'recon.png'
    text = run_sample(**paths(d), mode='recon', image=d / 'photo.png', out=out, seed=1)
    assert want[0] in text and f'reconstruction: {out}' in text
    t2i = tmp_path / 't2i.png'
    assert f'image: {t2i}' in run_sample(**paths(d), mode='t2i', prompt='"a red circle"', out=t2i)
    for path in (out, t2i):
        img = np.asarray(Image.open(path))
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and img.std() > 0


def test_missing_tokenizer_names_the_directories(release):
    d, _ = release
    cfg = dict(sample.config, **{k: str(v) for k, v in paths(d, processor='').items()}, device='cpu')
    missing = f"no tokenizer.json or vocab.json + merges.txt in {d / 'llm'} "
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        pipeline.load_uae(cfg, 'cpu')
    cfg['processor'] = str(d / 'dit')  # a directory without one: both are named
    with pytest.raises(FileNotFoundError, match=re.escape(f"in {d / 'dit'} or {d / 'llm'}")):
        pipeline.load_uae(cfg, 'cpu')
