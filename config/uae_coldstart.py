# Cold start (UAE's stage 1) on the real models: end to end, the caption tokens' projected hidden states of
# UAE's Qwen2.5-VL-3B condition UAE's SD3.5-Large decoder through a few differentiable sampling steps;
# trains both LoRAs and the projector on 1 - similarity. Edit the /path/to/ placeholders, then:
#   torchrun --nproc_per_node=8 train_rl.py config/uae_coldstart.py
# Real images come without captions: the encoder captions them itself (caption_temperature), without gradient.
{
    'stage': 'coldstart',
    'data_dir': '/path/to/images',  # a folder with train/ and val/ of image files (jpg/jpeg/png/bmp/tiff/webp)
    'out_dir': 'out/uae_coldstart',
    'llm': '/path/to/UAE/llm',  # UAE's Qwen2.5-VL-3B with the projector (trained here too)
    'processor': '/path/to/UAE/llm_model_preprocessor',  # its tokenizer and preprocessor config
    'llm_lora': '',  # fresh LoRAs on both models
    'dit': '/path/to/UAE/dit',
    'dit_lora': '',
    'vae': '/path/to/stable-diffusion-3.5-large/vae',
    # python tools/sd3_pooled.py --sd3=/path/to/stable-diffusion-3.5-large
    'pooled': '/path/to/sd35_pooled.safetensors',
    'negative_prompt': 'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.',  # UAE's CFG negative prompt
    'lora_r': 32, 'lora_alpha': 64, 'lora_init': 'gaussian',  # UAE's encoder LoRA settings
    'steps': 300,
    'images_per_step': 8,  # one image per rank on 8 GPUs
    'lr': 1e-5,  # our choice: "gently initialise" (the paper); the projector is trained in full
    'weight_decay': 0.0, 'grad_clip': 1.0,
    'coldstart_steps': 4,  # differentiable Euler steps, each a DiT forward kept for the backward
    'shift': 3.0,  # UAE's sampling shift
    'size': 512,  # the backward runs through the DiT and the VAE decoder: ~3x more per image at 1024 (memory plan)
    'max_new_tokens': 512, 'caption_temperature': 0.7,  # captions as UAE's demo samples them
    # the evaluation: I2T2I scored by these embedders (the training loss is the pixel similarity)
    'reward': {'clip': 1.0, 'dinov2': 1.0},
    'reward_paths': {'clip': '/path/to/clip-vit-large-patch14', 'dinov2': '/path/to/dinov2-large'},
    'guidance': 5.0,  # UAE's CFG scale, for the evaluation's sampling
    'eval_every': 50, 'eval_images': 64, 'eval_steps': 40, 'eval_temperature': 0.7, 'eval_batch': 8,
    'save_every': 50,
    'grad_checkpointing': True,
    'dtype': 'bfloat16',
}
