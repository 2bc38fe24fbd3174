"""
The UAE inference pipeline, shared by sample.py, bench.py and train_rl.py: load the checkpoints,
caption images (image -> text), draw images from text (text -> image).

    enc, dit, codec, pooled = load_uae(cfg, device)      # cfg: the path keys below
    texts, out = caption(enc, [load_image('x.jpg')])     # out: the sampled tokens and their log-probs
    images = draw(enc, dit, codec, pooled, texts)         # uint8 (B, H, W, 3)

How UAE wires the two models together (docs/uae.md): the decoder is conditioned by the encoder's LLM,
the projected hidden states of every token of a prompt in the `generate` chat template, with a
constant pooled vector; classifier-free guidance against a negative prompt embedded the same way.
"""
import os

import torch

import model_decoder as D
from images import to_uint8
from lora import load_peft
from model_encoder import Encoder


def load_uae(cfg, device):
    """(encoder, decoder, codec or None, pooled (1, P)) from the paths in cfg: llm, processor (the
    tokenizer's directory, '' = llm), llm_lora, dit, dit_lora, vae (the latent codec: SD3.5's VAE
    directory or the toy's LinearCodec file; '' = pixel space), pooled; adapters applied."""
    for key in ('llm', 'dit', 'pooled') + tuple(k for k in ('vae', 'processor') if cfg.get(k)):
        if not os.path.exists(cfg[key]):
            raise FileNotFoundError(f"--{key}={cfg[key]} does not exist" +
                                    (': train or unpack the toy checkpoints (see README)' if 'toy' in cfg[key] else ''))
    # frozen weights in the run's dtype (bf16 halves the real models' memory: docs/memory_plan.md); LoRA
    # adapters stay fp32 (lora.py), the codec fp32
    dtype = getattr(torch, cfg.get('dtype', 'float32'))
    enc = Encoder.from_pretrained(cfg['llm'], dtype, device, processor=cfg.get('processor', '')).eval()
    enc.get_tokenizer()  # no tokenizer found: the error names where it was looked for
    if cfg['llm_lora']:
        if os.path.exists(os.path.join(cfg['llm_lora'], 'adapter_config.json')):
            load_peft(enc, cfg['llm_lora'])
        else:
            enc.load_llm_lora(cfg['llm_lora'])
    dit = D.MMDiT.from_pretrained(cfg['dit'], dtype=dtype, device=device).eval()
    if cfg['dit_lora']:
        load_peft(dit, cfg['dit_lora'])
    codec = D.load_codec(cfg['vae'], device=device) if cfg['vae'] else None
    pooled = D.load_pooled(cfg['pooled'], dit.config.pooled_projection_dim).to(device, dtype).view(1, -1)
    return enc, dit, codec, pooled


@torch.no_grad()
def caption(enc, images, temperature=0.7, max_new_tokens=512, greedy=False, generator=None, top_k=None,
            top_p=None, repetition_penalty=None):
    """PIL images -> (captions, Generation with tokens / log-probs / mask), one caption each.
    top_k, top_p, repetition_penalty: None = the checkpoint's generation_config.json, as transformers'
    generate samples (Encoder.sampling_settings); UAE's demo overrides only the temperature, 0.7."""
    out = enc.generate(**enc.caption_inputs(images), max_new_tokens=max_new_tokens, temperature=temperature,
                       greedy=greedy, generator=generator, suppress_tokens=enc.caption_suppress_tokens(),
                       **enc.sampling_settings(top_k, top_p, repetition_penalty))
    if bool(out.mask[:, -1].any()) and out.mask.shape[1] == max_new_tokens:
        truncated = int(out.mask[:, -1].sum())
        print(f'note: {truncated} caption(s) hit max_new_tokens={max_new_tokens} and were cut short')
    return caption_texts(enc, out), out


def caption_texts(enc, out):
    """The text of each sampled caption (a Generation): its tokens up to and with the end-of-sequence
    token, special tokens dropped, surrounding white space stripped."""
    return [enc.tokenizer.decode(t[m].tolist(), skip_special_tokens=True).strip()
            for t, m in zip(out.tokens, out.mask)]


def fit_prompt(tokenizer, prompt, max_tokens, index=0):
    """The prompt, cut to max_tokens tokens (0 / None: no limit) with a note when it is longer."""
    ids = tokenizer.encode(prompt)
    if max_tokens and len(ids) > max_tokens:
        print(f'note: prompt {index} has {len(ids)} tokens, more than max_prompt_tokens={max_tokens}: '
              f'truncated to {max_tokens}')
        return tokenizer.decode(ids[:max_tokens])
    return prompt


@torch.no_grad()
def draw(enc, dit, codec, pooled, prompts, negative_prompt='', size=None, steps=40, guidance=5.0, shift=3.0,
         generator=None, noise=None, max_prompt_tokens=None, guidance_min_sigma=0.0):
    """Prompts -> uint8 images (B, H, W, 3): the prompts and the negative prompt embedded by the LLM
    together (right-padded to one length), then the decoder's sampler, then the codec.
    size: pixels (default the decoder's native size); noise (B, C, h, w) overrides the starting draw
    (G4U shares one draw among the G captions of an image); guidance_min_sigma: model_decoder.sample's."""
    prompts = [fit_prompt(enc.tokenizer, p, max_prompt_tokens, i) for i, p in enumerate(prompts)]
    ctx = enc.embed_prompt(list(prompts) + [negative_prompt])  # (B + 1, L, joint_dim)
    n = len(prompts)
    down = codec.factor if codec is not None else 1  # pixels per latent position
    size = size or dit.config.sample_size * down
    shape = (dit.config.in_channels, size // down, size // down)
    x = D.sample(dit, ctx[:n], pooled.expand(n, -1), ctx[n:], pooled, steps=steps, guidance=guidance, shift=shift,
                 generator=generator, shape=shape, noise=noise, guidance_min_sigma=guidance_min_sigma)
    x = D.decode(codec, x)
    if not bool(x.isfinite().all()):  # uint8 would turn NaN into black pixels without a word
        raise ValueError('the decoder produced NaN or inf values: check the --dit / --dit_lora / --vae weights, '
                         'or use --dtype=float32 (fp16 overflows)')
    return to_uint8(x)
