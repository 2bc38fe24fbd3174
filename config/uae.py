# Real UAE checkpoints for sample.py and bench.py (docs/uae.md): edit the paths to your local copies.
#   python sample.py config/uae.py --mode=recon --image=photo.jpg --out=recon.png
#   python bench.py config/uae.py --images=/path/to/Unified-Bench/Image --clip=... --dinov2=...
{
    'llm': '/path/to/UAE/llm',              # Qwen2.5-VL-3B fine-tuned by UAE, holds the projector
    'processor': '/path/to/UAE/llm_model_preprocessor',  # its tokenizer, chat template, preprocessor config
    'llm_lora': '/path/to/UAE/llm_lora',    # stage-2 (G4U) LoRA: full state dict shards, PEFT names
    'dit': '/path/to/UAE/dit',              # SD3.5-Large transformer fine-tuned by UAE (diffusers dir)
    'dit_lora': '/path/to/UAE/dit_lora',    # stage-3 (U4G) PEFT adapter
    'vae': '/path/to/stable-diffusion-3.5-large/vae',
    'pooled': '/path/to/sd35_pooled.safetensors',  # python tools/sd3_pooled.py --sd3=/path/to/stable-diffusion-3.5-large
    'negative_prompt': 'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.',
    'size': 1024, 'steps': 40, 'guidance': 5.0, 'shift': 3.0,
    'guidance_min_sigma': 0.0,              # guidance at every step, as UAE's inference (the toy's default: 0.3)
    'temperature': 0.7, 'max_new_tokens': 512,
    'dtype': 'bfloat16',
}
