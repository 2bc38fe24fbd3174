# G4U ("generation for understanding", UAE's stage 2; the loss: grpo.py) on the real models: the LoRA of UAE's Qwen2.5-VL-3B
# encoder learns to caption so that UAE's frozen SD3.5-Large decoder reconstructs the image. Edit the
# /path/to/ placeholders, then on one node of 8 x 80 GB GPUs (memory plan: docs/memory_plan.md):
#   torchrun --nproc_per_node=8 train_rl.py config/uae_g4u.py
# UAE published no RL hyperparameters: values without a source are our choice.
{
    'stage': 'g4u',
    'data_dir': '/path/to/images',  # a folder with train/ and val/ of image files (jpg/jpeg/png/bmp/tiff/webp)
    'out_dir': 'out/uae_g4u',
    'llm': '/path/to/UAE/llm',  # UAE's Qwen2.5-VL-3B with the projector (docs/uae.md)
    'processor': '/path/to/UAE/llm_model_preprocessor',  # its tokenizer and preprocessor config
    'llm_lora': '',  # '': a fresh LoRA, stage 2 from the start; /path/to/UAE/llm_lora trains UAE's further
    'dit': '/path/to/UAE/dit',  # UAE's SD3.5-Large transformer, frozen; its dit_lora is stage 3's, after G4U
    'dit_lora': '',
    'vae': '/path/to/stable-diffusion-3.5-large/vae',
    # python tools/sd3_pooled.py --sd3=/path/to/stable-diffusion-3.5-large
    'pooled': '/path/to/sd35_pooled.safetensors',
    'negative_prompt': 'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.',  # UAE's CFG negative prompt
    # UAE's encoder LoRA: all linear layers of the LLM (train_rl.py's llm_lora_targets)
    'lora_r': 32, 'lora_alpha': 64, 'lora_init': 'gaussian',
    'steps': 500,
    'images_per_step': 8,  # one image per rank on 8 GPUs; its whole group stays on that rank
    'group_size': 8,  # G = 8 captions per image (DeepSeekMath's GRPO uses 64; 8 is TRL's default)
    'micro_batch': 4,  # captions per backward of the encoder: ~15-26 GB at 300-512 tokens (8: 39-51 GB; memory plan)
    'lr': 1e-5,  # our choice: LoRA-GRPO on LLMs runs at 1e-5..5e-5 (UAE gives none)
    'weight_decay': 0.0, 'grad_clip': 1.0,
    'beta': 0.04,  # k3 KL to the reference: DeepSeekMath's GRPO value, the top of the 0.01-0.04 range GRPO runs use
    # reconstruction similarity: two of Unified-Bench's embedders, each z-scored before mixing (grpo.py)
    'reward': {'clip': 1.0, 'dinov2': 1.0},
    'reward_paths': {'clip': '/path/to/clip-vit-large-patch14', 'dinov2': '/path/to/dinov2-large'},
    'adv_scale': 'std',  # GRPO's (r - mean) / (std + 1e-4)
    # TRL's default: one update per batch of captions. 2 (two updates on the same rollouts) reached the toy
    # world's held-out object F1 of 0.64 at step 15 against 0.41, for ~10% more time per step (one seed)
    'num_iterations': 1,
    'temperature': 1.0,  # sample the full policy in training (UAE captions at 0.7 at inference)
    'max_new_tokens': 512,  # UAE's captions are up to 512 tokens; the aha moment lengthens them
    'eps_low': 0.2, 'eps_high': 0.28,  # TRL's epsilon 0.2, DAPO's clip-higher 0.28
    'sample_steps': 20,  # our choice: half of UAE's 40 for the G x images rollouts; evaluation uses 40
    'guidance': 5.0, 'shift': 3.0, 'size': 1024,  # UAE's text-to-image settings, the resolution Unified-Bench is run at
    'eval_every': 50, 'eval_images': 64, 'eval_steps': 40, 'eval_temperature': 0.7, 'eval_batch': 8,
    'save_every': 50,
    'dtype': 'bfloat16',
}
