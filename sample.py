"""
Caption an image, generate from text, or reconstruct an image through its caption (I2T2I).

    python sample.py                                        # the toy demo: test images, captions, reconstructions
    python sample.py --mode=i2t --image=cat.jpg             # image -> caption
    python sample.py --mode=t2i --prompt="a red circle in the center." --out=x.png
    python sample.py --mode=recon --image=cat.jpg --out=recon.png
    python sample.py config/uae_real.py --mode=recon --image=cat.jpg   # real UAE checkpoints, paths in the file

The functions load_uae / caption / generate are the UAE inference pipeline; bench.py and train_rl.py
use them too.
"""
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import model_decoder as D
from common import autocast, configure, keep_freed_memory, load_safetensors, pick_device
from lora import load_peft
from model_encoder import Encoder, load_image

config = dict(
    mode='demo',              # demo | i2t | t2i | recon
    image='', prompt='', out='out/sample.png',
    # checkpoints (SPEC §3): the toy ones ship with the repo; for real ones give local directories
    llm='checkpoints/toy/llm',          # Qwen2.5-VL / UAE `llm` directory (with the projector)
    llm_lora='',              # UAE `llm_lora` shards or a PEFT adapter directory (ours)
    dit='checkpoints/toy/dit',          # diffusers SD3Transformer2DModel directory / UAE `dit`
    dit_lora='',              # PEFT adapter directory (UAE `dit_lora`, Flow-GRPO, ours)
    vae='checkpoints/toy/codec.safetensors',  # SD3.5's AutoencoderKL directory, the toy's LinearCodec file, or '' (pixels)
    pooled='checkpoints/toy/pooled.safetensors',  # the constant pooled vector (key 'pooled')
    negative_prompt='',       # real UAE: 'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.'
    size=48,                  # output resolution in pixels (real: 1024)
    steps=20, cfg=2.0, shift=3.0,  # shift as the toy decoder is sampled in training (train_sft's sample_shift); real UAE: 40 steps, CFG 5.0, shift 3.0
    temperature=0.7, max_new_tokens=512,
    max_prompt_tokens=512,    # longer prompts are cut, with a note (UAE captions are at most 512 tokens); 0 = no limit
    demo_images=8, data_dir='data/shapes/out',
    seed=0, device='auto', dtype='float32',  # real models: dtype='bfloat16' on a GPU
)


# -----------------------------------------------------------------------------
# the UAE pipeline

def load_uae(cfg, device):
    """(encoder, decoder, vae or None, pooled (1, P)) from the paths in cfg; adapters applied."""
    for key in ('llm', 'dit', 'pooled') + (('vae',) if cfg['vae'] else ()):
        if not os.path.exists(cfg[key]):
            raise FileNotFoundError(f"--{key}={cfg[key]} does not exist" +
                                    (': train or unpack the toy checkpoints (see README)' if 'toy' in cfg[key] else ''))
    # frozen weights in the run's dtype (bf16 halves real models' memory: the README's memory plan); LoRA
    # adapters stay fp32 (lora.py), the codec / VAE fp32
    dtype = getattr(torch, cfg.get('dtype', 'float32'))
    enc = Encoder.from_pretrained(cfg['llm'], dtype=dtype, device=device).eval()
    if cfg['llm_lora']:
        if os.path.exists(os.path.join(cfg['llm_lora'], 'adapter_config.json')):
            load_peft(enc, cfg['llm_lora'])
        else:
            enc.load_llm_lora(cfg['llm_lora'])
    dit = D.MMDiT.from_pretrained(cfg['dit'], dtype=dtype, device=device).eval()
    if cfg['dit_lora']:
        load_peft(dit, cfg['dit_lora'])
    vae = D.load_vae(cfg['vae'], device=device) if cfg['vae'] else None
    pooled = load_safetensors(cfg['pooled'])['pooled'].to(device, dtype).view(1, -1)
    return enc, dit, vae, pooled


@torch.no_grad()
def caption(enc, images, temperature=0.7, max_new_tokens=512, greedy=False, generator=None):
    """PIL images -> (captions, Generation with tokens / log-probs / mask)."""
    out = enc.generate(**enc.caption_inputs(images), max_new_tokens=max_new_tokens, temperature=temperature,
                       greedy=greedy, generator=generator, suppress_tokens=enc.vision_tokens())
    if bool(out.mask[:, -1].any()) and out.mask.shape[1] == max_new_tokens:
        truncated = int(out.mask[:, -1].sum())
        print(f'note: {truncated} caption(s) hit max_new_tokens={max_new_tokens} and were cut short')
    texts = [enc.tokenizer.decode(t[m].tolist(), skip_special_tokens=True).strip()
             for t, m in zip(out.tokens, out.mask)]
    return texts, out


@torch.no_grad()
def fit_prompt(tokenizer, prompt, max_tokens, index=0):
    ids = tokenizer.encode(prompt)
    if max_tokens and len(ids) > max_tokens:
        print(f'note: prompt {index} has {len(ids)} tokens, more than max_prompt_tokens={max_tokens}: '
              f'truncated to {max_tokens}')
        return tokenizer.decode(ids[:max_tokens])
    return prompt


def generate(enc, dit, vae, pooled, prompts, negative_prompt='', size=None, steps=40, cfg=5.0, shift=3.0,
             generator=None, noise=None, max_prompt_tokens=None):
    """Prompts -> uint8 images (B, H, W, 3). Conditioning as UAE (SPEC §2): the LLM's projected hidden
    states of the `generate` template, prompts and the negative prompt right-padded together.
    noise (B, C, h, w) overrides the starting draw (e.g. one draw shared by a group of captions).
    A prompt longer than max_prompt_tokens is cut to that length, and said so."""
    prompts = [fit_prompt(enc.tokenizer, p, max_prompt_tokens, i) for i, p in enumerate(prompts)]
    ctx = enc.embed_prompt(list(prompts) + [negative_prompt])
    n = len(prompts)
    down = vae.factor if vae is not None else 1  # pixels per latent position
    size = size or dit.config.sample_size * down
    shape = (dit.config.in_channels, size // down, size // down)
    x = D.sample(dit, ctx[:n], pooled.expand(n, -1), ctx[n:], pooled, steps=steps, cfg=cfg, shift=shift,
                 generator=generator, shape=shape, noise=noise)
    x = D.decode(vae, x)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# -----------------------------------------------------------------------------
# the toy demo: a contact sheet of originals, captions, reconstructions and their exact scores

def contact_sheet(rows, path, scale=4):
    """rows: (original uint8 HxWx3, caption, reconstruction, score text) -> one PNG."""
    h, w = rows[0][0].shape[:2]
    H, W, text_w = h * scale, w * scale, 520
    sheet = Image.new('RGB', (2 * W + text_w + 30, len(rows) * (H + 10) + 10), 'white')
    draw = ImageDraw.Draw(sheet)
    for i, (orig, text, recon, note) in enumerate(rows):
        y = 10 + i * (H + 10)
        sheet.paste(Image.fromarray(orig).resize((W, H), Image.NEAREST), (10, y))
        sheet.paste(Image.fromarray(recon).resize((W, H), Image.NEAREST), (20 + W, y))
        words, lines = text.split(), ['']
        for word in words:  # wrap the caption to the text column
            if len(lines[-1]) + len(word) > 80:
                lines.append('')
            lines[-1] += word + ' '
        draw.multiline_text((30 + 2 * W, y), '\n'.join(lines[:8] + [note]), fill='black')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    sheet.save(path)


def demo(cfg, enc, dit, vae, pooled, device):
    from data.shapes import world
    test_dir = os.path.join(cfg['data_dir'], 'test')
    if os.path.exists(os.path.join(test_dir, 'scenes.jsonl')):
        images, records = world.load_split(test_dir)
        scenes = [r['scene'] for r in records[:cfg['demo_images']]]
        images = images[:cfg['demo_images']]
    else:  # no prepared data: draw fresh scenes (same world, same seed every run)
        rng = np.random.default_rng(cfg['seed'])
        scenes = [world.sample_scene(rng) for _ in range(cfg['demo_images'])]
        images = np.stack([world.render(s) for s in scenes])
    gen = torch.Generator(device).manual_seed(cfg['seed'])
    texts, _ = caption(enc, [Image.fromarray(np.asarray(im)) for im in images], cfg['temperature'], 64, generator=gen)
    recon = generate(enc, dit, vae, pooled, texts, cfg['negative_prompt'], None, cfg['steps'], cfg['cfg'],
                     cfg['shift'], gen, max_prompt_tokens=cfg['max_prompt_tokens'])
    rows, f1s = [], []
    for im, text, rec, scene in zip(images, texts, recon, scenes):
        s = world.score(world.parse_image(rec), scene)
        c = world.score(world.parse_caption(text), scene)
        f1s.append(s['object_f1'])
        note = f"caption recall {c['object_recall']:.2f} | reconstruction F1 {s['object_f1']:.2f}"
        rows.append((np.asarray(im), text, rec, note))
        print(f'{text!r}\n    {note}')
    contact_sheet(rows, cfg['out'])
    print(f'mean object F1 of the reconstructions: {np.mean(f1s):.3f}; contact sheet: {cfg["out"]}')


def main():
    keep_freed_memory()
    cfg = configure(config)
    device = pick_device(cfg['device'])
    t0 = time.time()
    torch.manual_seed(cfg['seed'])
    enc, dit, vae, pooled = load_uae(cfg, device)
    gen = torch.Generator(device).manual_seed(cfg['seed'])
    with autocast(device, cfg['dtype']):
        if cfg['mode'] == 'demo':
            demo(cfg, enc, dit, vae, pooled, device)
        elif cfg['mode'] in ('i2t', 'recon'):
            if not cfg['image']:
                raise ValueError(f"--mode={cfg['mode']} needs --image=PATH")
            texts, _ = caption(enc, [load_image(cfg['image'])], cfg['temperature'], cfg['max_new_tokens'], generator=gen)
            print(texts[0])
            if cfg['mode'] == 'recon':
                img = generate(enc, dit, vae, pooled, texts, cfg['negative_prompt'], cfg['size'], cfg['steps'],
                               cfg['cfg'], cfg['shift'], gen, max_prompt_tokens=cfg['max_prompt_tokens'])[0]
                os.makedirs(os.path.dirname(cfg['out']) or '.', exist_ok=True)
                Image.fromarray(img).save(cfg['out'])
                print(f"reconstruction: {cfg['out']}")
        elif cfg['mode'] == 't2i':
            if not cfg['prompt'].strip():
                raise ValueError('--mode=t2i needs a non-empty --prompt="..."')
            img = generate(enc, dit, vae, pooled, [cfg['prompt']], cfg['negative_prompt'], cfg['size'], cfg['steps'],
                           cfg['cfg'], cfg['shift'], gen, max_prompt_tokens=cfg['max_prompt_tokens'])[0]
            os.makedirs(os.path.dirname(cfg['out']) or '.', exist_ok=True)
            Image.fromarray(img).save(cfg['out'])
            print(f"image: {cfg['out']}")
        else:
            raise ValueError(f"unknown --mode={cfg['mode']}: demo, i2t, t2i or recon")
    print(f'done in {time.time() - t0:.1f} s')


if __name__ == '__main__':
    main()
