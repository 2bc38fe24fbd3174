"""
Caption an image, draw an image from text, or reconstruct an image through its caption (I2T2I).

    python sample.py                                        # the toy demo: test images, captions, reconstructions
    python sample.py --mode=i2t --image=cat.jpg             # image -> caption
    python sample.py --mode=t2i --prompt="a red circle in the center." --out=x.png
    python sample.py --mode=recon --image=cat.jpg --out=recon.png
    python sample.py config/uae.py --mode=recon --image=cat.jpg   # real UAE checkpoints, paths in the file

The pipeline itself (load_uae, caption, draw) is pipeline.py.
"""
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import make_dir
from common import autocast, configure, keep_freed_memory, pick_device, require_positive, run
from images import load_image, to_pil
from pipeline import caption, draw, load_uae

config = dict(
    mode='demo',              # demo | i2t | t2i | recon
    image='', prompt='', out='out/sample.png',
    # checkpoints (docs/uae.md): the toy ones ship with the repo; for real ones give local directories
    llm='checkpoints/toy/llm',          # Qwen2.5-VL / UAE `llm` directory (with the projector)
    processor='',             # tokenizer + preprocessor_config.json (UAE: llm_model_preprocessor); '' = in llm
    llm_lora='',              # UAE `llm_lora` shards or a PEFT adapter directory (ours)
    dit='checkpoints/toy/dit',          # diffusers SD3Transformer2DModel directory / UAE `dit`
    dit_lora='',              # PEFT adapter directory (UAE `dit_lora`, Flow-GRPO, ours)
    vae='checkpoints/toy/codec.safetensors',  # the latent codec: SD3.5's VAE directory, the toy's LinearCodec
                              # file, or '' (the decoder draws pixels)
    pooled='checkpoints/toy/pooled.safetensors',  # the constant pooled vector (key 'pooled')
    negative_prompt='',       # real UAE: 'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.'
    size=48,                  # output resolution in pixels (real: 1024)
    steps=20, guidance=2.0,   # sampling steps, classifier-free guidance scale (real UAE: 40 steps, 5.0)
    # guidance only at noise levels above this (model_decoder.sample); the last 3 of the toy's 20 steps
    # unguided halve the ghosts at the same Toy-GenEval (docs/toy_world.md, finding 9). Real UAE: 0, every step
    guidance_min_sigma=0.3,
    shift=3.0,                # as the toy decoder is sampled in training (train_sft's sample_shift); real UAE: 3.0
    temperature=0.7, max_new_tokens=512,  # 0.7: what UAE's demo passes to generate, over generation_config.json
    # captioning as transformers' generate: None = the llm's generation_config.json (Qwen2.5-VL's: top_k 1,
    # top_p 0.001, repetition_penalty 1.05, i.e. greedy in effect); no such file = plain sampling
    top_k=None, top_p=None, repetition_penalty=None,
    max_prompt_tokens=512,    # longer prompts are cut, with a note (UAE captions are at most 512 tokens); 0 = no limit
    demo_images=8, data_dir='data/shapes/out',
    seed=0, device='auto', dtype='float32',  # real models: dtype='bfloat16' on a GPU
)
SAMPLING_KEYS = ('top_k', 'top_p', 'repetition_penalty')


# -----------------------------------------------------------------------------
# the toy demo: a contact sheet of originals, captions, reconstructions and their exact scores

def demo_sheet(rows, path, scale=4):
    """rows: (original uint8 HxWx3, caption, reconstruction, score text) -> one PNG."""
    h, w = rows[0][0].shape[:2]
    H, W, text_w = h * scale, w * scale, 520
    sheet = Image.new('RGB', (2 * W + text_w + 30, len(rows) * (H + 10) + 10), 'white')
    pen = ImageDraw.Draw(sheet)
    for i, (orig, text, recon, note) in enumerate(rows):
        y = 10 + i * (H + 10)
        sheet.paste(Image.fromarray(orig).resize((W, H), Image.NEAREST), (10, y))
        sheet.paste(Image.fromarray(recon).resize((W, H), Image.NEAREST), (20 + W, y))
        words, lines = text.split(), ['']
        for word in words:  # wrap the caption to the text column
            if len(lines[-1]) + len(word) > 80:
                lines.append('')
            lines[-1] += word + ' '
        pen.multiline_text((30 + 2 * W, y), '\n'.join(lines[:8] + [note]), fill='black')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    sheet.save(path)


def demo(cfg, enc, dit, codec, pooled, device):
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
    texts, _ = caption(enc, to_pil(images), cfg['temperature'], 64, generator=gen,
                       **{k: cfg[k] for k in SAMPLING_KEYS})
    recon = draw(enc, dit, codec, pooled, texts, cfg['negative_prompt'], None, cfg['steps'], cfg['guidance'],
                 cfg['shift'], gen, max_prompt_tokens=cfg['max_prompt_tokens'],
                 guidance_min_sigma=cfg['guidance_min_sigma'])
    rows, f1s = [], []
    for im, text, rec, scene in zip(images, texts, recon, scenes):
        s = world.score(world.parse_image(rec), scene)
        c = world.score(world.parse_caption(text), scene)
        f1s.append(s['object_f1'])
        note = f"caption recall {c['object_recall']:.2f} | reconstruction F1 {s['object_f1']:.2f}"
        rows.append((np.asarray(im), text, rec, note))
        print(f'{text!r}\n    {note}')
    demo_sheet(rows, cfg['out'])
    print(f'mean object F1 of the reconstructions: {np.mean(f1s):.3f}; contact sheet: {cfg["out"]}')


def main():
    keep_freed_memory()
    cfg = configure(config)
    # everything the models are not needed for is checked before they load
    require_positive(cfg, 'steps', 'max_new_tokens', 'demo_images')
    require_positive(cfg, 'size', 'max_prompt_tokens', 'temperature', minimum=0)
    if cfg['mode'] not in ('demo', 'i2t', 't2i', 'recon'):
        raise ValueError(f"unknown --mode={cfg['mode']}: demo, i2t, t2i or recon")
    if cfg['mode'] in ('i2t', 'recon') and not cfg['image']:
        raise ValueError(f"--mode={cfg['mode']} needs --image=PATH")
    if cfg['mode'] == 't2i' and not cfg['prompt'].strip():
        raise ValueError('--mode=t2i needs a non-empty --prompt="..."')
    image = load_image(cfg['image']) if cfg['mode'] in ('i2t', 'recon') else None
    if cfg['mode'] != 'i2t':  # where the image or contact sheet goes
        if os.path.isdir(cfg['out']) or os.path.splitext(cfg['out'])[1].lower() not in Image.registered_extensions():
            raise ValueError(f"--out={cfg['out']}: give an image file name (.png, .jpg, ...)")
        make_dir(os.path.dirname(cfg['out']) or '.', 'out')
    device = pick_device(cfg['device'])
    t0 = time.time()
    torch.manual_seed(cfg['seed'])
    enc, dit, codec, pooled = load_uae(cfg, device)
    gen = torch.Generator(device).manual_seed(cfg['seed'])
    with autocast(device, cfg['dtype']):
        if cfg['mode'] == 'demo':
            demo(cfg, enc, dit, codec, pooled, device)
        elif cfg['mode'] in ('i2t', 'recon'):
            texts, _ = caption(enc, [image], cfg['temperature'], cfg['max_new_tokens'], generator=gen,
                               **{k: cfg[k] for k in SAMPLING_KEYS})
            print(texts[0])
            if cfg['mode'] == 'recon':
                img = draw(enc, dit, codec, pooled, texts, cfg['negative_prompt'], cfg['size'], cfg['steps'],
                           cfg['guidance'], cfg['shift'], gen, max_prompt_tokens=cfg['max_prompt_tokens'],
                           guidance_min_sigma=cfg['guidance_min_sigma'])[0]
                os.makedirs(os.path.dirname(cfg['out']) or '.', exist_ok=True)
                Image.fromarray(img).save(cfg['out'])
                print(f"reconstruction: {cfg['out']}")
        elif cfg['mode'] == 't2i':
            img = draw(enc, dit, codec, pooled, [cfg['prompt']], cfg['negative_prompt'], cfg['size'], cfg['steps'],
                       cfg['guidance'], cfg['shift'], gen, max_prompt_tokens=cfg['max_prompt_tokens'],
                       guidance_min_sigma=cfg['guidance_min_sigma'])[0]
            os.makedirs(os.path.dirname(cfg['out']) or '.', exist_ok=True)
            Image.fromarray(img).save(cfg['out'])
            print(f"image: {cfg['out']}")
    print(f'done in {time.time() - t0:.1f} s')


if __name__ == '__main__':
    run(main)
