"""
Compute UAE's constant pooled vector once: SD3's pooled CLIP-L + CLIP-G embedding of the empty prompt
(docs/uae.md, "Wiring"), written as a safetensors file {'pooled': (2048,)} that sample.py / bench.py / train_rl.py
read with --pooled=PATH, so no CLIP text encoder is ever loaded at run time.

    python tools/sd3_pooled.py --sd3=/path/to/stable-diffusion-3.5-large --out=checkpoints/sd35_pooled.safetensors

Reads the local SD3.5 directory's text_encoder / text_encoder_2 (CLIPTextModelWithProjection) and
tokenizer / tokenizer_2 with transformers, as diffusers' StableDiffusion3Pipeline.encode_prompt does
for prompt "". Not yet run against the real SD3.5 weights.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import configure, save_safetensors  # noqa: E402

config = dict(sd3='', out='checkpoints/sd35_pooled.safetensors', prompt='')


@torch.no_grad()
def pooled_embedding(sd3_dir, prompt=''):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    parts = []
    for enc_name, tok_name in (('text_encoder', 'tokenizer'), ('text_encoder_2', 'tokenizer_2')):
        tok = CLIPTokenizer.from_pretrained(os.path.join(sd3_dir, tok_name), local_files_only=True)
        enc = CLIPTextModelWithProjection.from_pretrained(os.path.join(sd3_dir, enc_name), local_files_only=True,
                                                          use_safetensors=True).eval()
        ids = tok([prompt], padding='max_length', max_length=77, truncation=True, return_tensors='pt').input_ids
        parts.append(enc(ids).text_embeds.float())  # (1, 768) and (1, 1280)
    return torch.cat(parts, dim=-1)[0]  # (2048,)


if __name__ == '__main__':
    cfg = configure(config)
    if not cfg['sd3'] or not os.path.isdir(cfg['sd3']):
        sys.exit(f"--sd3 must be a local SD3/SD3.5 directory, got {cfg['sd3']!r}")
    pooled = pooled_embedding(cfg['sd3'], cfg['prompt'])
    os.makedirs(os.path.dirname(cfg['out']) or '.', exist_ok=True)
    save_safetensors({'pooled': pooled}, cfg['out'])
    print(f"pooled {tuple(pooled.shape)} -> {cfg['out']}")
