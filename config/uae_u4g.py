# U4G ("understanding for generation", UAE's stage 3; the loss: grpo.py) on the real models: Flow-GRPO on a LoRA of UAE's
# SD3.5-Large decoder, reconstructing from the captions of UAE's G4U-trained encoder (frozen). Edit the
# /path/to/ placeholders, then on one node of 8 x 80 GB GPUs (memory plan: docs/memory_plan.md):
#   torchrun --nproc_per_node=8 train_rl.py config/uae_u4g.py
# Flow-GRPO = its SD3.5 configs (config/grpo.py, base.py of yifan123/flow_grpo); UAE published no RL
# hyperparameters.
{
    'stage': 'u4g',
    'data_dir': '/path/to/images',  # a folder with train/ and val/ of image files (jpg/jpeg/png/bmp/tiff/webp)
    'out_dir': 'out/uae_u4g',
    'llm': '/path/to/UAE/llm',  # the encoder, frozen: UAE's Qwen2.5-VL-3B + projector ...
    'processor': '/path/to/UAE/llm_model_preprocessor',  # its tokenizer and preprocessor config
    'llm_lora': '/path/to/UAE/llm_lora',  # ... with its stage-2 (G4U) LoRA, or ours: out/uae_g4u/llm_lora
    'dit': '/path/to/UAE/dit',  # UAE's SD3.5-Large transformer
    'dit_lora': '',  # '': a fresh LoRA, stage 3 from the start; /path/to/UAE/dit_lora trains UAE's further
    'vae': '/path/to/stable-diffusion-3.5-large/vae',
    # python tools/sd3_pooled.py --sd3=/path/to/stable-diffusion-3.5-large
    'pooled': '/path/to/sd35_pooled.safetensors',
    'negative_prompt': 'Generate a random, low quality, ugly, blur, bad and anime, cartoon image.',  # UAE's CFG negative prompt
    'lora_r': 32, 'lora_alpha': 64, 'lora_init': 'gaussian',  # Flow-GRPO's LoRA: r 32, alpha 64, gaussian init
    'dit_lora_targets': ['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out'],
    'steps': 500,
    'images_per_step': 8,  # one caption per rank on 8 GPUs; its whole group stays on that rank
    'group_size': 16,  # Flow-GRPO uses 8-24 (24 on 32 GPUs)
    'micro_batch': 4,  # rollouts per backward: 4 x 2 (CFG) DiT passes with checkpointing (memory plan)
    'lr': 3e-4, 'weight_decay': 1e-4, 'grad_clip': 1.0,  # Flow-GRPO: learning_rate, adam_weight_decay, max_grad_norm
    # KL on the means: Flow-GRPO's SD3.5 GenEval / OCR beta, in the form its code computes (divided by std_t^2,
    # not by the step's variance std_t^2 * (sigma - sigma'): on this 10-step schedule 'exact' would weigh
    # each SDE step 3.7-25x more, 13x on average; grpo.py)
    'beta': 0.04, 'kl_form': 'flow_grpo',
    'drop_zero_advantage': True,  # Flow-GRPO drops samples of zero advantage before the loss
    # Flow-GRPO: num_inner_epochs 1; its two updates per batch are over the two halves of the rollouts
    'num_iterations': 1,
    'reward': {'clip': 1.0, 'dinov2': 1.0},  # as G4U: UAE's one reward for both stages
    'reward_paths': {'clip': '/path/to/clip-vit-large-patch14', 'dinov2': '/path/to/dinov2-large'},
    'adv_scale': 'std',
    'max_new_tokens': 512, 'caption_temperature': 0.7,  # the encoder captions as UAE's demo does
    'sample_steps': 10,  # Flow-GRPO: 10 SDE sampling steps in training, 40 in evaluation
    'guidance': 5.0, 'shift': 3.0,  # UAE's inference CFG scale and shift (Flow-GRPO trains with CFG, 4.5 for SD3.5-M)
    'size': 512,  # Flow-GRPO's resolution; 1024 costs 3.3x the tokens (memory plan)
    'noise_level': 0.7,  # Flow-GRPO: sample.noise_level
    'sde_window': 0,  # 0 = all steps but the last: Flow-GRPO's timestep_fraction 0.99 of 10 = 9
    'flow_eps': 1e-4, 'adv_clip': 5.0,  # Flow-GRPO: clip_range 1e-4, adv_clip_max 5
    'eval_every': 50, 'eval_images': 64, 'eval_steps': 40, 'eval_temperature': 0.7, 'eval_batch': 8,
    'save_every': 50,
    'grad_checkpointing': True,
    'dtype': 'bfloat16',
}
