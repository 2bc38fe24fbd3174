"""
Unified-GRPO, the three RL stages of UAE, on the toy world (default) or on real checkpoints.

    python train_rl.py --stage=g4u          # encoder LoRA learns to caption for reconstruction
    python train_rl.py --stage=u4g          # decoder LoRA learns to reconstruct from the encoder's captions
    python train_rl.py --stage=coldstart    # end-to-end: caption hidden states -> decoder -> 1 - similarity
    torchrun --nproc_per_node=2 train_rl.py --stage=g4u     # DDP: gloo on CPU, nccl on GPU
    python train_rl.py config/uae_g4u.py    # real UAE / Qwen2.5-VL / SD3.5 checkpoints on a folder of images

This file is the loop, read top to bottom: the reward, one step per stage (rollouts, reward, group
advantages, loss), evaluation, data, then main (LoRA, optimiser, gradient all-reduce, logging,
checkpoints). The math of the advantages and the two losses, with their sources, is grpo.py; the
samplers are the models' (Encoder.generate, model_decoder.sample); pipeline.py loads and draws.
data_dir is the toy world (prepare.py's splits, scored exactly by its parser) or a folder of real
images with train/ and val/ subfolders (scored by the reward's embedders). Every random draw is seeded
by (seed, step, rank), so a resumed run repeats the uninterrupted one exactly; the rollouts, and so the
results, depend on the number of ranks.
"""
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import grpo
import model_decoder as D
from checkpoint import (check_checkpoint, check_optimizer_files, check_run_dir, load_checkpoint,
                        optimizer_from_files, optimizer_to_files, save_checkpoint, skip_nonfinite,
                        truncate_log)
from common import (all_gather_cat, all_reduce_grads, autocast, check_ranks_in_sync, configure, keep_freed_memory,
                    require_positive, run, setup_distributed, teardown_distributed)
from data.shapes import world
from embedders import SCENE_METRICS, load_embedder, similarities
from images import IMAGE_EXTENSIONS, load_image, to_pil, to_pixels, to_uint8
from lora import apply_lora, lora_disabled, lora_layers, lora_parameters, save_peft, target_names
from pipeline import caption, caption_texts, draw, load_uae

TOY = 'checkpoints/toy'  # the shipped toy checkpoints
config = dict(
    stage='g4u',                     # coldstart | g4u | u4g
    data_dir='data/shapes/out',      # the toy world, or a folder with train/ and val/ of jpg/png/webp/bmp/tiff
    out_dir='',                      # default out/rl_<stage>
    resume=False,                    # continue from out_dir/ckpt (a new run refuses an out_dir that holds one)
    # the models (as sample.py's keys); an adapter given here is loaded: trained further if its model is, else frozen
    llm=f'{TOY}/llm',                # Qwen2.5-VL / UAE `llm` directory (with the projector)
    processor='',                    # its tokenizer + preprocessor_config.json (UAE: llm_model_preprocessor); '' = llm
    dit=f'{TOY}/dit',                # diffusers SD3Transformer2DModel directory / UAE `dit`
    dit_lora='',                     # PEFT adapter directory
    vae=f'{TOY}/codec.safetensors',  # the latent codec: SD3.5's VAE directory or the toy's LinearCodec file
    pooled=f'{TOY}/pooled.safetensors',  # the constant pooled vector (tools/sd3_pooled.py for SD3.5)
    negative_prompt='',              # the CFG negative prompt (UAE's: config/uae_*.py)
    # None: none for coldstart and g4u; for u4g on the toy encoder, the shipped G4U adapter. UAE runs U4G
    # after G4U, so the decoder learns from the captions of the RL-trained encoder; the SFT encoder's terse
    # captions ("a white square.") leave the decoder little it could get right. '' = no adapter
    llm_lora=None,
    # the LoRA being trained: r=32, alpha=64, gaussian init, as UAE's encoder LoRA
    lora_r=32, lora_alpha=64, lora_init='gaussian',
    # where it goes (regex or list of name suffixes, lora.matches): UAE's encoder LoRA is on every linear layer
    # of the LLM (not the vision tower, lm_head or projector); the decoder's on the attention projections
    llm_lora_targets=r'model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)',
    # ... but not on the LLM layers below the one the decoder reads (the llm's config.json prompt_layer; the
    # toy decoder reads the states after layer 0): adapting them changes what the decoder reads of every
    # caption. Measured (the speedrun, seed 2, G4U 40 steps): with layer 0 adapted, the decoder's reading of
    # true captions fell 0.99 -> 0.47 and I2T2I object F1 reached 0.43; without, 0.91 at step 20, reading
    # unchanged. UAE's decoder reads the last layer (no prompt_layer): every layer is adapted. True: adapt them
    llm_lora_below_prompt_layer=False,
    dit_lora_targets=['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out'],
    steps=100, images_per_step=8, group_size=8, micro_batch=64,
    lr=3e-4, weight_decay=0.0, grad_clip=1.0,
    beta=0.01,                       # KL to the reference (the same model with its LoRA disabled)
    # metric -> weight; names: scene, scene_attributes, pixel, clip, dinov2, dinov3, longclip (embedders.py).
    # The toy default gives partial credit per attribute: `python bench.py --task reward` shows it rising
    # with caption completeness on the shipped checkpoints, while exact object F1 stays near 0 for them
    reward={'scene_attributes': 1.0},
    reward_paths={},                 # metric -> local checkpoint path for the real embedders
    adv_scale='std',                 # 'std' (GRPO) or 'none' (only subtract the group mean)
    # g4u, u4g: optimiser updates per batch of rollouts (TRL's num_iterations): the rollouts, advantages and
    # old log-probs are computed once, the new log-probs at each update; ratio, clip_frac, kl and grad_norm
    # are logged for the last update. drop_zero_advantage: samples of advantage exactly 0 (groups of equal
    # rewards) leave the loss, averaged over the kept ones of all ranks (Flow-GRPO); a step that keeps none
    # makes no update (logged as updates 0)
    num_iterations=1, drop_zero_advantage=False,
    # g4u: caption sampling and the token loss. Plain sampling at `temperature`, on purpose without the top-k,
    # top-p or repetition penalty of generation_config.json (Qwen2.5-VL's is greedy in effect): the policy
    # gradient needs the policy's full distribution, and G captions of one image must differ
    temperature=1.0, max_new_tokens=64, eps_low=0.2, eps_high=0.28,
    # decoding (all stages) and u4g's SDE
    # guidance: the classifier-free guidance scale. shift 3.0: the toy decoder is sampled with it (train_sft's
    # sample_shift), as SD3.5 is; rollouts on another schedule would reward images the decoder was never checked on
    sample_steps=10, guidance=2.0, shift=3.0,
    size=0,                          # image size in pixels; 0 = the decoder's native size (real images are cropped to it)
    noise_level=0.7, sde_window=3,   # u4g: SDE (trained) on a window of this many steps; 0 = all but the last
    sde_start=-1,                    # u4g: the window's first step; -1 = a random start each step
    flow_eps=1e-4, adv_clip=5.0,
    # u4g's KL to the reference: 'exact' the Gaussian KL of each SDE step (divided by its variance std_t^2 *
    # (sigma - sigma')), 'flow_grpo' Flow-GRPO's code (divided by std_t^2 alone: 3.7-25x weaker, grpo.py)
    kl_form='exact',
    caption_temperature=0.7,         # u4g, coldstart on real images: how the encoder captions (as at inference)
    # coldstart: differentiable sampling steps
    coldstart_steps=4,
    grad_checkpointing=False,        # the DiT recomputes each block in the backward (real models: docs/memory_plan.md)
    # evaluation on held-out images (the validation split), logging, checkpoints
    # eval_images=0: no held-out evaluation (the speedrun evaluates each stage with bench.py afterwards)
    eval_every=25, eval_images=100, eval_steps=20, eval_temperature=0.7,
    eval_batch=0,                    # held-out images captioned / reconstructed at once; 0 = all
    log_every=1, save_every=50,
    max_nonfinite=10,                # a step with a NaN/inf loss or gradient is skipped; this many in a row stop the run
    seed=1337, device='auto', dtype='float32',
)


# -----------------------------------------------------------------------------
# the reward: how similar each reconstruction is to its original

def load_reward(cfg, device):
    """The embedders the reward needs ({name: embedder}); the toy world's scene metrics need none."""
    return {m: load_embedder(m, cfg['reward_paths'].get(m), device) for m in cfg['reward'] if m not in SCENE_METRICS}


def weighted_mean(weights, values):
    """The reward as logged: the weighted mean of each metric's raw similarity (tensors or floats)."""
    return sum(weights[k] * v for k, v in values.items()) / sum(weights.values())


def reward(cfg, embedders, recon, originals, world_size, device):
    """The reward of every rollout of every rank (rank order) -> (rewards (N,), log dict).

    Each metric's similarity (embedders.similarities) is gathered from all ranks first. One metric is
    the reward itself; several are each z-scored over the whole batch, then mixed with their weights,
    so that none dominates by scale and the statistics do not depend on how the batch is split. The
    logged reward is the weighted mean of the raw similarities (a mix of z-scores averages 0).
    A NaN or inf similarity would make every advantage NaN: such rollouts stay out of the statistics
    and keep a NaN reward, grpo.group_advantages skips their groups, the log counts them."""
    w = cfg['reward']
    m = {k: all_gather_cat(v.to(device), world_size).float()
         for k, v in similarities(list(w), embedders, recon, originals).items()}
    ok = torch.stack([v.isfinite() for v in m.values()]).all(0)
    mixed = next(iter(m.values())).clone()
    if len(m) > 1:
        mixed[ok] = sum(w[k] * grpo.zscore(v[ok]) for k, v in m.items())
        mixed[~ok] = math.nan
    raw = weighted_mean(w, m)[ok]
    return mixed, dict(reward=raw.mean().item(), reward_std=raw.std().item(),
                       **{f'reward_{k}': v[ok].mean().item() for k, v in m.items() if len(m) > 1},
                       nonfinite_rewards=int((~ok).sum()))


# -----------------------------------------------------------------------------
# one step per stage: rollouts, reward, advantages, then the loss. GRPO's steps return their log
# statistics and `backward`, which scores the rollouts under the current weights and backpropagates the
# loss: main calls it num_iterations times, one optimiser update after each

def kept_rows(cfg, rewards, adv, rank, world_size):
    """This rank's rows that enter the loss (CPU indices) and their count over all ranks, from the rewards
    and advantages of all ranks: all rows, or with drop_zero_advantage those with a signal
    (grpo.has_signal: not a group of equal rewards, advantage not 0)."""
    keep = torch.ones(len(adv), dtype=torch.bool)
    if cfg['drop_zero_advantage']:
        keep = grpo.has_signal(rewards, adv, cfg['group_size']).cpu()
    return torch.arange(len(adv) // world_size)[keep.view(world_size, -1)[rank]], int(keep.sum())


def g4u_step(cfg, enc, dit, codec, pooled, embedders, images, gen, rank, world_size):
    """Generation for understanding: G captions per image, each drawn again by the frozen decoder and
    rewarded by how similar the drawing is to the image; token-level GRPO on the encoder's LoRA."""
    G = cfg['group_size']
    enc.eval()
    # 1. rollouts: G captions per image (rows image-major: i*G ... i*G+G-1 are image i's), sampled from the
    # policy at `temperature`, with their log-probs (the old log-probs of every update on this batch).
    # The suppressed ids are suppressed again in the loss
    suppress = enc.caption_suppress_tokens()
    with torch.no_grad():
        batch = enc.caption_inputs([im for im in to_pil(images) for _ in range(G)])
        out = enc.generate(**batch, max_new_tokens=cfg['max_new_tokens'], temperature=cfg['temperature'],
                           generator=gen, suppress_tokens=suppress)
    texts = caption_texts(enc, out)
    # 2. each caption drawn by the frozen decoder; one starting noise per image, shared by its G captions,
    # so that reward differences within a group come from the captions
    noise = torch.randn(len(images), *latent_shape(cfg, dit, codec), generator=gen, device=gen.device)
    recon = draw(enc, dit, codec, pooled, texts, cfg['negative_prompt'], cfg['size'] or None, cfg['sample_steps'],
                 cfg['guidance'], cfg['shift'], noise=noise.to(pooled.device).repeat_interleave(G, 0))
    # 3. reward and advantages: over the whole batch of all ranks, then this rank's rows
    rewards, log = reward(cfg, embedders, recon, np.repeat(np.asarray(images), G, axis=0), world_size,
                          pooled.device)
    adv, zero_std = grpo.group_advantages(rewards, G, cfg['adv_scale'])
    rows, n_kept = kept_rows(cfg, rewards, adv, rank, world_size)
    adv = adv.view(world_size, -1)[rank]
    # 4. the loss over every kept caption token of the batch (all ranks), micro_batch captions per backward
    mask = out.mask[rows]
    n_tokens = mask.sum().float()
    if world_size > 1:
        dist.all_reduce(n_tokens)
    patches = batch['image_grid_thw'].prod(-1)  # pixel_values rows belonging to each caption's image
    start = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()
    refs = {}  # the reference's log-probs do not change between updates

    def backward():
        if n_tokens.item() == 0:
            return None
        stats = dict(kl=0.0, clip_frac=0.0, ratio=0.0, entropy=0.0)
        for i in range(0, len(rows), cfg['micro_batch']):
            r, m = rows[i:i + cfg['micro_batch']], mask[i:i + cfg['micro_batch']]
            mb = {k: v[r] for k, v in batch.items() if k != 'pixel_values'}
            mb['pixel_values'] = torch.cat([batch['pixel_values'][start[k]:start[k + 1]] for k in r.tolist()])
            logp, ent = enc.token_logprobs(mb, out.tokens[r], m, cfg['temperature'], True, suppress)
            if cfg['beta'] > 0 and i not in refs:  # the reference policy: the same model with its LoRA disabled
                with torch.no_grad(), lora_disabled(enc):
                    refs[i] = enc.token_logprobs(mb, out.tokens[r], m, cfg['temperature'], suppress_tokens=suppress)
            loss, s = grpo.token_grpo_loss(logp, out.logprobs[r], adv[r], m, refs.get(i), cfg['eps_low'],
                                           cfg['eps_high'], cfg['beta'], n_tokens=n_tokens)
            loss.backward()
            w = m.sum().item() / max(mask.sum().item(), 1)
            for k in ('kl', 'clip_frac', 'ratio'):
                stats[k] += s[k] * w
            stats['entropy'] += (ent.sum() / mask.sum().clamp(min=1)).item()
        return stats

    if cfg['drop_zero_advantage']:
        log['kept'] = n_kept / len(rewards)
    return dict(log, zero_std=zero_std, caption_tokens=out.mask.sum(1).float().mean().item()), backward


def u4g_step(cfg, enc, dit, codec, pooled, embedders, images, gen, rank, world_size, step):
    """Understanding for generation: one caption per image from the frozen encoder, G images per caption
    from the decoder's SDE sampler, rewarded by similarity to the image; Flow-GRPO on the decoder's LoRA
    over the SDE steps."""
    G, T = cfg['group_size'], cfg['sample_steps']
    # 1. the captions (as at inference) and their embeddings, the negative prompt's last
    with torch.no_grad():
        texts, _ = caption(enc, to_pil(images), cfg['caption_temperature'], cfg['max_new_tokens'], generator=gen)
        ctx = enc.embed_prompt(texts + [cfg['negative_prompt']])
    n = len(texts)
    ctx_c, neg = ctx[:n].repeat_interleave(G, 0), ctx[n:]
    pooled_c = pooled.expand(n * G, -1)
    # 2. rollouts: G images per caption. The SDE window says which denoising steps are stochastic (and
    # trained), the same on every rank; never the last step, which would leave noise in the image. Each
    # transition keeps the log-prob of the policy that sampled it: the old log-prob of every update
    window = min(cfg['sde_window'] or T - 1, T - 1)
    if cfg['sde_start'] >= 0:
        start = min(cfg['sde_start'], T - 1 - window)
    else:
        start = int(np.random.default_rng([cfg['seed'], step, 7]).integers(0, T - window)) if window < T - 1 else 0
    noise = torch.randn(n * G, *latent_shape(cfg, dit, codec), generator=gen, device=gen.device).to(pooled.device)
    with torch.no_grad():
        x0, transitions = D.sample(dit, ctx_c, pooled_c, neg, pooled, T, cfg['guidance'], cfg['shift'], gen,
                                   noise=noise, sde_steps=set(range(start, start + window)),
                                   noise_level=cfg['noise_level'])
    recon = to_uint8(D.decode(codec, x0))
    # 3. reward and advantages: over the whole batch of all ranks, then this rank's rows
    rewards, log = reward(cfg, embedders, recon, np.repeat(np.asarray(images), G, axis=0), world_size,
                          pooled.device)
    adv, zero_std = grpo.group_advantages(rewards, G, cfg['adv_scale'])
    rows, n_total = kept_rows(cfg, rewards, adv, rank, world_size)
    adv = adv.view(world_size, -1)[rank]
    # 4. the loss: each stored transition of the kept rows re-scored under the current weights,
    # micro_batch rollouts at once; a mean over the kept rollouts of all ranks and the SDE steps
    sigmas = D.sampling_sigmas(T, cfg['shift']).tolist()
    refs = {}  # the reference's means do not change between updates

    def backward():
        if n_total == 0:
            return None
        stats = dict(kl=0.0, clip_frac=0.0, ratio=0.0)
        for t in transitions:
            for i in range(0, len(rows), cfg['micro_batch']):
                r = rows[i:i + cfg['micro_batch']]
                tt = dict(j=t['j'], x=t['x'][r], x_next=t['x_next'][r])
                args = (ctx_c[r], pooled_c[r], neg, pooled, T, cfg['guidance'], cfg['shift'], cfg['noise_level'])
                logp, mean, std = D.transition_logprob(dit, tt, *args)
                if cfg['beta'] > 0 and (t['j'], i) not in refs:  # the reference: the same model, LoRA disabled
                    with torch.no_grad(), lora_disabled(dit):
                        refs[t['j'], i] = D.transition_logprob(dit, tt, *args)[1]
                loss, s = grpo.flow_grpo_loss(logp, t['log_prob'][r], adv[r], cfg['flow_eps'], cfg['adv_clip'],
                                              mean, refs.get((t['j'], i)), std, cfg['beta'], cfg['kl_form'],
                                              sigmas[t['j']] - sigmas[t['j'] + 1])
                # each call averages over its micro-batch: weight it to a mean over all samples and SDE steps
                (loss * logp.shape[0] / n_total / len(transitions)).backward()  # summed over ranks later
                for k in stats:
                    stats[k] += s[k] * logp.shape[0] / len(rows) / len(transitions)
        return stats

    if cfg['drop_zero_advantage']:
        log['kept'] = n_total / len(rewards)
    return dict(log, zero_std=zero_std, sde_steps=f'{start}-{start + window - 1}'), backward


def coldstart_step(cfg, enc, dit, codec, pooled, images, captions, gen, world_size):
    """End-to-end semantic reconstruction (UAE's stage 1): the encoder reads the image and its caption,
    the caption tokens' projected hidden states condition the decoder, a few Euler steps with gradients
    turn noise into an image, loss = 1 - pixel similarity to the original (differentiable).
    captions None (real images come without): the encoder's own, sampled at caption_temperature."""
    if captions is None:
        captions, _ = caption(enc, to_pil(images), cfg['caption_temperature'], cfg['max_new_tokens'], generator=gen)
    batch = enc.caption_inputs(to_pil(images))
    tokens, mask = enc.caption_tokens(captions)
    ids = torch.cat([batch['input_ids'], tokens], 1)
    # the layer the decoder is conditioned on (Encoder.prompt_hidden): the last unless prompt_layer is set
    h, _ = enc.hidden_states(ids, torch.cat([batch['attention_mask'], mask], 1), batch['pixel_values'],
                             batch['image_grid_thw'], num_layers=enc.config.prompt_layer)
    ctx = enc.project(h[:, -tokens.shape[1]:])  # (B, T, joint_dim): the caption tokens' states
    noise = torch.randn(len(images), *latent_shape(cfg, dit, codec), generator=gen, device=gen.device)
    x = D.sample(dit, ctx, pooled.expand(len(images), -1), steps=cfg['coldstart_steps'], guidance=1.0,
                 shift=cfg['shift'], noise=noise.to(pooled.device))  # with gradients: no torch.no_grad here
    x = D.decode(codec, x) if codec is not None else x
    target = to_pixels(images, x.device)
    # the pixel metric (1 - mean |a - b| on [0, 1] images), unclamped so that every pixel has a gradient
    similarity = 1 - ((x - target).abs() / 2).mean(dim=(1, 2, 3))
    loss = (1 - similarity).mean()
    (loss / world_size).backward()  # gradients are summed over ranks
    return dict(loss=loss.item(), reward=similarity.mean().item(), caption_tokens=mask.sum(1).float().mean().item())


# -----------------------------------------------------------------------------
# evaluation: I2T2I on held-out images, scored exactly by the toy world or by the reward's embedders

@torch.no_grad()
def eval_captions(cfg, enc, images, gen):
    """Captions of held-out images at eval_temperature, eval_batch images at a time (0 = all), and their
    lengths in tokens (B,)."""
    bs, texts, lengths = cfg['eval_batch'] or len(images), [], []
    for i in range(0, len(images), bs):
        t, out = caption(enc, to_pil(images[i:i + bs]), cfg['eval_temperature'], cfg['max_new_tokens'], generator=gen)
        texts += t
        lengths.append(out.mask.sum(1).float().cpu())
    return texts, torch.cat(lengths)


@torch.no_grad()
def evaluate(cfg, enc, dit, codec, pooled, images, scenes=None, fixed_captions=None, embedders=None):
    """Caption (fixed seed) unless captions are given, then reconstruct (eval_steps, fixed noise).
    Toy world (scenes given): object F1 of the reconstructions, caption recall (objects, and each attribute
    alone), pixel similarity, and the decoder's object F1 from the complete ground-truth captions.
    Real images: each reward metric's mean similarity, and as `reward` their weighted mean (of the raw
    similarities: the z-scores that mix them in training average to 0 over any batch)."""
    gen = torch.Generator(pooled.device).manual_seed(cfg['seed'])
    if fixed_captions is None:
        texts, lengths = eval_captions(cfg, enc, images, gen)
    else:
        texts, lengths = fixed_captions, torch.tensor([len(enc.tokenizer.encode(t)) + 1. for t in fixed_captions])
    bs = cfg['eval_batch'] or len(images)
    redraw = lambda prompts: np.concatenate([draw(enc, dit, codec, pooled, prompts[i:i + bs], cfg['negative_prompt'],
                                                  cfg['size'] or None, cfg['eval_steps'], cfg['guidance'], cfg['shift'],
                                                  gen) for i in range(0, len(prompts), bs)])
    recon = redraw(texts)
    if scenes is None:
        w = cfg['reward']
        means = {k: v.float().mean().item()
                 for k, v in similarities(list(w), embedders, recon, np.asarray(images)).items()}
        return dict(reward=weighted_mean(w, means),
                    **{f'reward_{k}': v for k, v in means.items() if len(means) > 1},
                    caption_tokens=float(lengths.mean()), example=texts[0]), texts
    scores = [world.score(world.parse_image(r), s) for r, s in zip(recon, scenes)]
    # what the captions get right: objects (all four attributes) and each attribute alone, so that an
    # attribute the captioner never learned shows (docs/results.md: the size words)
    said = [world.score(world.parse_caption(t), s) for t, s in zip(texts, scenes)]
    pixel = 1 - np.abs(recon.astype(np.float32) - np.asarray(images, np.float32)).mean(axis=(1, 2, 3)) / 255
    # how well the decoder reads a caption, whatever the encoder says: reconstructions from the complete
    # ground-truth captions. The LLM that captions also conditions the decoder, so G4U's adapter moves
    # this too, and U4G is what can bring it back
    redrawn = redraw([world.caption(s) for s in scenes])
    decoder_f1 = [world.score(world.parse_image(r), s)['object_f1'] for r, s in zip(redrawn, scenes)]
    return dict(object_f1=float(np.mean([s['object_f1'] for s in scores])),
                decoder_f1=float(np.mean(decoder_f1)),
                attribute_f1=float(np.mean([world.attribute_score(s) for s in scores])),
                caption_recall=float(np.mean([c['object_recall'] for c in said])),
                **{f'caption_{a}_recall': float(np.mean([c[f'{a}_recall'] for c in said])) for a in world.ATTRS},
                caption_tokens=float(lengths.mean()), pixel=float(np.mean(pixel)), example=texts[0]), texts


# -----------------------------------------------------------------------------
# data: the toy world, or a folder of real images read a batch at a time


def image_size(cfg, dit, codec):
    """The decoder's images in pixels: cfg size, or its native size (as pipeline.draw)."""
    return cfg['size'] or dit.config.sample_size * (codec.factor if codec is not None else 1)


def latent_shape(cfg, dit, codec):
    """(C, h, w) that the DiT denoises for an image of image_size pixels."""
    S = image_size(cfg, dit, codec) // (codec.factor if codec is not None else 1)
    return dit.config.in_channels, S, S


def image_files(directory):
    """The image files directly in directory, sorted by name."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'{directory} is not a directory: data_dir must be the toy world (train/scenes.jsonl, '
                                'made by data/shapes/prepare.py) or a folder of images with train/ and val/ subfolders')
    names = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {directory}')
    return [os.path.join(directory, f) for f in names]


def square_image(path, size):
    """An image file as (size, size, 3) uint8: shortest edge resized to size (bicubic), centre crop. The
    decoder draws squares: the encoder sees this crop and the reward compares the reconstruction with it."""
    image = load_image(path)  # an unreadable file is a ValueError naming it
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size)))


def load_data(cfg, size):
    """(number of training images, batch(indices) -> (uint8 images (B, H, W, 3), captions or None),
    held-out images, their scenes or None). The toy world brings scenes and reference captions; a real
    folder has neither, and is read a batch at a time (it can be large), its first eval_images val images once."""
    n_val = cfg['eval_images']
    if os.path.exists(os.path.join(cfg['data_dir'], 'train', 'scenes.jsonl')):
        images, records = world.load_split(os.path.join(cfg['data_dir'], 'train'))
        val_images, val_records = world.load_split(os.path.join(cfg['data_dir'], 'val'))
        batch = lambda idx: (np.stack([images[i] for i in idx]), [records[i]['captions']['complete'] for i in idx])
        return len(records), batch, val_images[:n_val], [r['scene'] for r in val_records[:n_val]]
    files = image_files(os.path.join(cfg['data_dir'], 'train'))
    val_images = np.zeros((0, size, size, 3), np.uint8) if not n_val else np.stack(
        [square_image(f, size) for f in image_files(os.path.join(cfg['data_dir'], 'val'))[:n_val]])
    return len(files), lambda idx: (np.stack([square_image(files[i], size) for i in idx]), None), val_images, None


# -----------------------------------------------------------------------------
# the curves figure

def plot_curves(rows, path, keys=('reward', 'caption_tokens')):
    """The aha-moment figure, drawn with PIL: each logged key against the step, one panel each, with the
    step axis ticked. Keys that no row has (U4G logs no caption length) get no panel."""
    keys = [k for k in keys if any(k in r for r in rows)]
    W, H, left, bottom = 640, 220, 48, 36
    img = Image.new('RGB', (W, H * max(len(keys), 1)), 'white')
    pen = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        pts = [(r['step'], r[key]) for r in rows if key in r]
        top, right = i * H + 20, W - 12
        base = top + H - 20 - bottom  # the panel's bottom edge
        pen.rectangle([left, top, right, base], outline='gray')
        pen.text((left, top - 16), key, fill='black')
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        x1, y1 = max(x1, x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
        sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
        sy = lambda y: base - (y - y0) / (y1 - y0) * (base - top)
        for k in range(5):  # step ticks at 0, 1/4, ... of the range
            x = x0 + (x1 - x0) * k / 4
            pen.line([(sx(x), base), (sx(x), base + 4)], fill='gray')
            pen.text((sx(x) - 8, base + 6), f'{x:.0f}', fill='black')
        pen.text((right - 30, base + 20), 'step', fill='black')
        pen.text((2, sy(y1) - 5), f'{y1:.3g}', fill='black')
        pen.text((2, sy(y0) - 5), f'{y0:.3g}', fill='black')
        if len(pts) > 1:
            pen.line([(sx(x), sy(y)) for x, y in pts], fill='navy', width=2)
        else:
            pen.ellipse([sx(xs[0]) - 2, sy(ys[0]) - 2, sx(xs[0]) + 2, sy(ys[0]) + 2], fill='navy')
    img.save(path)


# -----------------------------------------------------------------------------
# what is trained, the checkpoint, main

def llm_targets(enc, cfg):
    """llm_lora_targets as a list of layer names, without the LLM layers below enc.config.prompt_layer
    (llm_lora_below_prompt_layer says why); as given when the decoder reads the last layer."""
    layer, targets = enc.config.prompt_layer, cfg['llm_lora_targets']
    if layer is None or cfg['llm_lora_below_prompt_layer']:
        return targets
    names = target_names(enc, targets)
    index = [re.search(r'\.language_model\.layers\.(\d+)\.', n) for n in names]
    kept = [n for n, i in zip(names, index) if i is None or int(i[1]) >= layer]
    if len(kept) < len(names):
        print(f'LLM LoRA: {len(kept)} of the {len(names)} target layers; not the {len(names) - len(kept)} in LLM layers '
              f'below {layer}, whose states the decoder reads (--llm_lora_below_prompt_layer=True adapts them too)')
    return kept


def trainable(model, cfg, targets):
    """The LoRA parameters to train on `model`: an adapter loaded with the model is trained further,
    otherwise a fresh one is added (r, alpha, init from cfg)."""
    if not lora_layers(model):
        apply_lora(model, targets, cfg['lora_r'], cfg['lora_alpha'], cfg['lora_init'])
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def named_trainables(enc, dit):
    return {f'{prefix}.{n}': p for prefix, m in (('enc', enc), ('dit', dit))
            for n, p in m.named_parameters() if p.requires_grad}


def check_config(cfg):
    """Every value checked before anything loads; llm_lora=None resolved, so the saved config says which
    adapter was used."""
    require_positive(cfg, 'log_every', 'eval_every', 'save_every', 'images_per_step', 'group_size', 'micro_batch',
                     'max_nonfinite', 'num_iterations')
    require_positive(cfg, 'steps', 'eval_images', minimum=0)  # steps 0: evaluate only
    if not cfg['steps'] and not cfg['eval_images']:
        raise ValueError('steps=0 evaluates only, and eval_images=0 evaluates nothing: nothing to do')
    stage = cfg['stage']
    if stage not in ('coldstart', 'g4u', 'u4g'):
        raise ValueError(f"--stage must be coldstart, g4u or u4g, got {stage!r}")
    if stage != 'coldstart' and cfg['group_size'] < 2:
        raise ValueError(f"--group_size={cfg['group_size']}: GRPO compares at least 2 rollouts per prompt")
    if stage == 'coldstart' and (cfg['num_iterations'] > 1 or cfg['drop_zero_advantage']):
        raise ValueError('--num_iterations and --drop_zero_advantage are GRPO options (g4u, u4g), not coldstart\'s')
    if cfg['kl_form'] not in ('exact', 'flow_grpo'):
        raise ValueError(f"--kl_form must be 'exact' or 'flow_grpo', got {cfg['kl_form']!r}")
    if cfg['llm_lora'] is None:
        toy = stage == 'u4g' and cfg['llm'] == f'{TOY}/llm'
        cfg['llm_lora'] = f'{TOY}/llm_lora' if toy else ''
    return cfg


def restore(named, opt, weights, meta, path):
    """A checkpoint's trainable weights and optimiser state into this run's, every tensor checked against
    what this run trains before anything is copied (its optimiser state is stored by parameter name: save)."""
    check_checkpoint(dict(trainable=named, optimizer=check_optimizer_files(
        weights['optimizer'], meta['optimizer'], [named], path)), weights, path)
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(weights['trainable'][n])
    names = list(named)
    osd = optimizer_from_files(weights['optimizer'], meta['optimizer'])
    osd['state'] = {names.index(n): s for n, s in osd['state'].items()}
    osd['param_groups'] = [dict(g, params=[names.index(n) for n in g['params']]) for g in osd['param_groups']]
    opt.load_state_dict(osd)


def save(cfg, out_dir, step, named, opt, enc, dit, rows, skipped):
    """out_dir/ckpt (what --resume reads: the trainable weights, the optimiser state, the log rows), the
    trained adapters in PEFT format and the curves."""
    names, stage = list(named), cfg['stage']
    osd = opt.state_dict()  # keyed by parameter index: stored by name so the file explains itself
    osd = dict(state={names[i]: s for i, s in osd['state'].items()},
               param_groups=[dict(g, params=[names[i] for i in g['params']]) for g in osd['param_groups']])
    tensors, rest = optimizer_to_files(osd)
    save_checkpoint(os.path.join(out_dir, 'ckpt'), dict(trainable={n: p.detach() for n, p in named.items()},
                                                        optimizer=tensors),
                    dict(config=cfg, step=step, optimizer=rest, rows=rows, skipped_steps=skipped,
                         rng='every draw is seeded by (seed, step, rank)'))
    if stage in ('g4u', 'coldstart'):
        save_peft(enc, os.path.join(out_dir, 'llm_lora'), cfg['llm'])
    if stage in ('u4g', 'coldstart'):
        save_peft(dit, os.path.join(out_dir, 'dit_lora'), cfg['dit'])
    if stage == 'coldstart':
        enc.save_pretrained(os.path.join(out_dir, 'llm'))  # its projector was trained too
    val = ('val_object_f1', 'val_decoder_f1', 'val_reward')  # the toy's scores or real images' reward: the rows
    plot_curves(rows, os.path.join(out_dir, 'curves.png'),  # hold one or the other, and only theirs are drawn
                ('reward', 'caption_tokens', *val) if stage != 'coldstart' else ('loss', *val))


def eval_line(step, result, toy):
    """One line for the console: the toy world's exact scores, or the real images' rewards."""
    if toy:
        attrs = ', '.join(f"{a} {result['caption_' + a + '_recall']:.2f}" for a in world.ATTRS)
        score = (f"object F1 {result['object_f1']:.3f} | attribute F1 {result['attribute_f1']:.3f} | caption recall "
                 f"{result['caption_recall']:.3f} ({attrs}) | decoder F1 (true captions) {result['decoder_f1']:.3f}")
    else:
        score = ' | '.join(f'{k} {v:.4f}' for k, v in result.items() if k.startswith('reward'))
    return (f"eval step {step}: {score} | caption tokens {result['caption_tokens']:.1f}"
            + (f" | pixel {result['pixel']:.4f}" if toy else '') + f" | {result['example']!r}")


def main():
    keep_freed_memory()
    cfg = check_config(configure(config))
    stage = cfg['stage']
    out_dir = cfg['out_dir'] or f'out/rl_{stage}'
    rank, world_size, device = setup_distributed(cfg['device'])
    master = rank == 0
    if cfg['images_per_step'] % world_size:
        raise ValueError(f"images_per_step {cfg['images_per_step']} must be a multiple of the {world_size} ranks")
    if master:  # a new run into an earlier run's folder, a resume without checkpoint, an unusable folder
        check_run_dir(out_dir, cfg['resume'])
    step, rows, skipped = 0, [], 0
    if cfg['resume']:  # read first: a missing or damaged file is found before anything else loads
        weights, meta, path = load_checkpoint(os.path.join(out_dir, 'ckpt'), ['trainable', 'optimizer'])
        if not isinstance(meta.get('rows'), list):
            raise ValueError(f"{os.path.join(path, 'meta.json')} has no rows (the run's log): not a train_rl.py checkpoint")
        step, rows, skipped = meta['step'], meta['rows'], meta.get('skipped_steps', 0)
        if step >= cfg['steps']:
            raise ValueError(f"{path} is at step {step} already: raise --steps (now {cfg['steps']}) to train on")
    torch.manual_seed(cfg['seed'])  # identical fresh LoRA weights on every rank
    enc, dit, codec, pooled = load_uae(cfg, device)
    enc.requires_grad_(False)
    dit.requires_grad_(False)
    dit.gradient_checkpointing = cfg['grad_checkpointing']
    if stage in ('g4u', 'coldstart'):
        trainable(enc, cfg, llm_targets(enc, cfg))
    if stage in ('u4g', 'coldstart'):
        trainable(dit, cfg, cfg['dit_lora_targets'])
    if stage == 'coldstart':
        # fp32 like the LoRA adapters: a bf16 weight rounds away updates of lr x 1 (1e-5) altogether
        enc.projector.float().requires_grad_(True)
    named = named_trainables(enc, dit)
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg['lr'], weight_decay=cfg['weight_decay'])
    n_train, train_batch, val_images, val_scenes = load_data(cfg, image_size(cfg, dit, codec))
    if n_train < cfg['images_per_step']:
        raise ValueError(f"{cfg['data_dir']}: {n_train} training images, fewer than images_per_step={cfg['images_per_step']}")
    toy = val_scenes is not None
    # the reward scores rollouts, and real held-out reconstructions (the toy's are scored exactly)
    embedders = load_reward(cfg, device) if stage != 'coldstart' or not toy else None

    if cfg['resume']:
        restore(named, opt, weights, meta, path)
        if master:
            print(f'resuming {path} at step {step}')
            truncate_log(os.path.join(out_dir, 'log.jsonl'), step)  # the rows after it are written again
    if master:
        print(f"{stage}: training {sum(p.numel() for p in params) / 1e6:.3f}M parameters "
              f"({len(params)} tensors), {world_size} rank(s), {cfg['images_per_step']} images x "
              f"{cfg['group_size'] if stage != 'coldstart' else 1} per step")

    # u4g is judged on fixed captions from the frozen encoder, so only the decoder can move the number
    fixed = None
    if stage == 'u4g' and master and cfg['eval_images']:
        with autocast(device, cfg['dtype']):
            fixed = eval_captions(cfg, enc, val_images, torch.Generator(device).manual_seed(cfg['seed']))[0]

    def run_eval(step):
        if not cfg['eval_images']:
            return
        with autocast(device, cfg['dtype']):
            result, _ = evaluate(cfg, enc, dit, codec, pooled, val_images, val_scenes, fixed, embedders)
        rows.append(dict(step=step, **{f'val_{k}': v for k, v in result.items()}))
        print(eval_line(step, result, toy), flush=True)
        with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(rows[-1]) + '\n')

    if master and step == 0:
        run_eval(0)
    per_rank = cfg['images_per_step'] // world_size
    t_start, step_start, streak = time.time(), step, 0
    while step < cfg['steps']:
        t0 = time.time()
        rng = np.random.default_rng([cfg['seed'], step])
        idx = rng.choice(n_train, cfg['images_per_step'], replace=False)[rank * per_rank:(rank + 1) * per_rank]
        images, captions = train_batch(idx)
        gen = torch.Generator(device).manual_seed(cfg['seed'] * 1_000_003 + step * 1000 + rank)
        with autocast(device, cfg['dtype']):
            if stage == 'g4u':
                stats, backward = g4u_step(cfg, enc, dit, codec, pooled, embedders, images, gen, rank, world_size)
            elif stage == 'u4g':
                stats, backward = u4g_step(cfg, enc, dit, codec, pooled, embedders, images, gen, rank, world_size,
                                           step)
            else:  # no rollouts to reuse: one update
                stats, backward = {}, lambda: coldstart_step(cfg, enc, dit, codec, pooled, images, captions, gen,
                                                             world_size)
        updates = 0
        for _ in range(cfg['num_iterations']):  # each a full optimiser update on the same rollouts
            with autocast(device, cfg['dtype']):
                loss_stats = backward()
            if loss_stats is None:  # drop_zero_advantage kept no sample on any rank: nothing to learn
                if master:
                    print(f'step {step + 1}: every advantage is 0, no update', flush=True)
                break
            all_reduce_grads(params, world_size)
            loss_stats['grad_norm'] = float(torch.nn.utils.clip_grad_norm_(params, cfg['grad_clip']))
            # the gradients are all-reduced: a NaN/inf loss or gradient skips the update on every rank alike
            streak = skip_nonfinite(loss_stats['grad_norm'] + loss_stats.get('loss', 0.0), streak,
                                    cfg['max_nonfinite'], 'loss or gradient')
            skipped += bool(streak)
            if not streak:
                opt.step()
                updates += 1
            elif master:
                print(f'step {step + 1}: non-finite loss or gradient, update skipped ({skipped} so far)', flush=True)
            opt.zero_grad(set_to_none=True)
            stats.update(loss_stats)  # the last update's
        if cfg['num_iterations'] > 1 or cfg['drop_zero_advantage']:
            stats['updates'] = updates
        step += 1
        stats = dict(step=step, step_time=time.time() - t0, **stats, skipped_steps=skipped)
        if master:
            rows.append(stats)
            with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(stats) + '\n')
            if step % cfg['log_every'] == 0:
                eta = (cfg['steps'] - step) * (time.time() - t_start) / (step - step_start)
                print(f'step {step}/{cfg["steps"]} | ' + ' | '.join(
                    f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in stats.items() if k != 'step')
                    + f' | ETA {eta / 60:.1f} min', flush=True)
            if step % cfg['eval_every'] == 0 or step == cfg['steps']:
                run_eval(step)
            if step % cfg['save_every'] == 0 or step == cfg['steps']:
                save(cfg, out_dir, step, named, opt, enc, dit, rows, skipped)
        if world_size > 1:
            dist.barrier()  # the others wait while rank 0 evaluates and saves
    if world_size > 1:
        n = check_ranks_in_sync(named)
        if master:
            print(f'ranks in sync: {n} parameters ({len(named)} tensors) identical on {world_size} ranks')
        teardown_distributed()


if __name__ == '__main__':
    run(main)
