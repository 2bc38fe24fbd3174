"""
Unified-GRPO: the reinforcement learning that ties the encoder (captioner) and the decoder (generator)
together through one reward, how well the decoder reconstructs an image from the encoder's caption.

    G4U  (generation for understanding): sample G captions per image, decode each, reward each
         reconstruction; GRPO on the encoder's tokens (TRL/DeepSeek-style, clipped ratio + k3 KL).
    U4G  (understanding for generation): G images per caption from an SDE sampler that gives
         per-step log-probs; GRPO on the decoder's denoising steps (Flow-GRPO).

Read top to bottom: advantages, the two losses, then the rollouts that produce what they eat.
Formulas: SPEC §4. Where this departs from the paper, Flow-GRPO or TRL:
"""
import math

import torch

from model_decoder import guided_velocity, sampling_sigmas, sde_step

# -----------------------------------------------------------------------------
# advantages


def group_advantages(rewards, group_size, scale='std', std_floor=1e-4):
    """Normalise rewards within each group of `group_size` consecutive samples.

    rewards: (N,) with N a multiple of group_size, the G samples of one prompt side by side.
    scale: 'std' divides by (group std + std_floor) (GRPO); 'none' only subtracts the mean (Dr. GRPO).
    Returns (advantages (N,), fraction of groups whose rewards are all equal: they carry no signal).
    """
    if rewards.numel() % group_size:
        raise ValueError(f'{rewards.numel()} rewards do not split into groups of {group_size}')
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    zero_std = (std.squeeze(1) < 1e-8).float().mean().item()
    if scale == 'std':
        centred = centred / (std + std_floor)
    elif scale != 'none':
        raise ValueError(f"advantage scale must be 'std' or 'none', got {scale!r}")
    return centred.view(-1), zero_std


def zscore(x, eps=1e-6):
    """Standardise a batch of rewards before mixing several metrics (so no metric dominates by scale)."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


# -----------------------------------------------------------------------------
# encoder loss (G4U): token-level clipped surrogate + k3 KL, over all active tokens of the batch


def token_grpo_loss(logp, old_logp, adv, mask, ref_logp=None, eps_low=0.2, eps_high=0.2, beta=0.0, n_tokens=None):
    """GRPO loss on sampled caption tokens.

    logp, old_logp, ref_logp: (N, T) log-probs of the sampled tokens under the policy being trained,
        the policy that sampled them, and the reference (LoRA disabled). mask: (N, T) 1 on caption tokens.
    adv: (N,) one advantage per sequence, shared by its tokens.
    The loss is summed over every active token of the batch and divided by their count: a
    per-sequence mean would weigh a short caption's tokens more, biasing length, and caption length is
    exactly what G4U's "aha moment" is about. n_tokens overrides the count: the number of active
    tokens of the whole batch when this call sees only a micro-batch or one rank's share.
    Returns (loss, stats dict); stats are averages over this call's tokens.
    """
    mask = mask.float()
    n_local = mask.sum().clamp(min=1)
    n_tokens = n_local if n_tokens is None else n_tokens
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(policy || ref): unbiased, always >= 0
        per_token = per_token + beta * kl
    loss = (per_token * mask).sum() / n_tokens
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
        stats = dict(kl=((kl * mask).sum() / n_local).item(),
                     clip_frac=((clipped.float() * mask).sum() / n_local).item(),
                     ratio=((ratio * mask).sum() / n_local).item())
    return loss, stats


# -----------------------------------------------------------------------------
# decoder loss (U4G): Flow-GRPO on one denoising step


def flow_grpo_loss(logp, old_logp, adv, eps=1e-4, adv_clip=5.0, mean=None, ref_mean=None, std=None, beta=0.0):
    """Clipped surrogate on the log-prob of one SDE transition, for a batch of N trajectories.

    logp, old_logp: (N,) log-density of the same x_{t+1} given x_t under the current and the
        sampling policy (averaged over C, H, W, see model_decoder.sde_step).
    mean, ref_mean: (N, C, H, W) means of that transition under the policy and the reference;
        KL between two Gaussians of equal std is |mu - mu_ref|^2 / (2 std^2).
    std: (N,) or scalar, the transition's std (std_t * sqrt(-dt)).
    """
    a = adv.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)).mean()
    kl = torch.zeros((), device=logp.device)
    if beta > 0 and ref_mean is not None:
        s = torch.as_tensor(std, device=logp.device, dtype=torch.float32)
        s = s.view(-1, *[1] * (mean.dim() - 1)) if s.dim() else s
        kl = (((mean - ref_mean) ** 2) / (2 * s ** 2)).mean()
        loss = loss + beta * kl
    with torch.no_grad():
        stats = dict(kl=kl.item(), clip_frac=((ratio - 1).abs() > eps).float().mean().item(),
                     ratio=ratio.mean().item())
    return loss, stats


# -----------------------------------------------------------------------------
# reward: similarity between each original and its reconstruction


SCENE_METRICS = {  # the toy world's parse-based rewards: world.score(...) -> float
    'scene': lambda s: s['object_f1'],
    'scene_attributes': lambda s: (s['shape_f1'] + s['color_f1'] + s['size_f1'] + s['cell_f1'] + s['background']) / 5,
}


class Reward:
    """A weighted mix of similarity metrics, e.g. {'scene': 1.0} or {'clip': 1.0, 'dinov2': 1.0}.

    'scene' is the toy world's exact score: object F1 of the objects parsed from the reconstruction
    against those parsed from the original (exact on originals, so this is F1 against the truth).
    'scene_attributes' gives partial credit: the mean of the shape, colour, size and cell F1s and the
    background match. An object counts for 'scene' only when all four attributes are right, so with
    a decoder that gets one or two wrong every caption of a group scores 0 and GRPO learns nothing.
    Every other name is an embedder of embedders.py (the ones bench.py uses): cosine of features, or
    for 'pixel' 1 - mean |a - b|. With several metrics each is z-scored over the batch first, so that
    none dominates by scale (SPEC §4).
    """

    def __init__(self, weights, paths=None, device='cpu', dtype='float32'):
        from embedders import load_embedder
        self.weights = dict(weights)
        self.embedders = {name: load_embedder(name, (paths or {}).get(name), device, dtype)
                          for name in self.weights if name not in SCENE_METRICS}

    def metrics(self, recon, originals):
        """recon, originals: uint8 (N, H, W, 3) -> {metric: (N,) float tensor}."""
        out, scores = {}, None
        for name in self.weights:
            if name in SCENE_METRICS:
                if scores is None:  # parsed once, whichever scene metrics are weighted
                    from data.shapes import world
                    scores = [world.score(world.parse_image(r), world.parse_image(o)) for r, o in zip(recon, originals)]
                out[name] = torch.tensor([SCENE_METRICS[name](s) for s in scores])
            else:
                e = self.embedders[name]
                out[name] = e.similarity(e.embed(list(originals)), e.embed(list(recon))).float().cpu()
        return out

    def __call__(self, recon, originals):
        m = self.metrics(recon, originals)
        if len(m) == 1:
            return next(iter(m.values())), m
        return sum(self.weights[k] * zscore(v) for k, v in m.items()), m


# -----------------------------------------------------------------------------
# rollouts


@torch.no_grad()
def sample_captions(enc, images, group_size, temperature=1.0, max_new_tokens=64, generator=None):
    """G captions per image. images: list of PIL images. Returns (prompt batch, Generation) with rows
    image-major: rows i*G ... i*G+G-1 are the G captions of image i."""
    batch = enc.caption_inputs([im for im in images for _ in range(group_size)])
    out = enc.generate(**batch, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator,
                       suppress_tokens=enc.vision_tokens())
    return batch, out


@torch.no_grad()
def sde_rollout(dit, ctx, pooled, neg_ctx, neg_pooled, noise, steps, cfg, shift, noise_level, sde_steps,
                generator=None):
    """Sample images with the Flow-GRPO SDE on the steps listed in `sde_steps` and the ODE elsewhere.

    noise: (N, C, H, W) starting draw (sigma = 1); generator draws the SDE steps' noise (seeded, the
    rollout is reproducible: exact resume needs it). Returns (x0, transitions) where transitions is a list
    of dicts for the SDE steps: step index j, x (state before), x_next (sampled), log_prob (N,) of the
    sampling policy. Only SDE steps are stochastic, so only they are trained (SPEC §4, MixGRPO-style
    windows when sde_steps is a window).
    """
    sigmas = sampling_sigmas(steps, shift).tolist()
    x, transitions = noise.float(), []
    for j in range(steps):
        v = guided_velocity(dit, x, sigmas[j], ctx, pooled, neg_ctx, neg_pooled, cfg)
        if j in sde_steps:
            x_next, log_prob, _, _ = sde_step(x, v, sigmas[j], sigmas[j + 1], noise_level, generator)
            transitions.append(dict(j=j, x=x, x_next=x_next, log_prob=log_prob))
            x = x_next
        else:
            x = x + (sigmas[j + 1] - sigmas[j]) * v
    return x, transitions


def transition_logprob(dit, t, ctx, pooled, neg_ctx, neg_pooled, steps, cfg, shift, noise_level):
    """Log-prob (N,), mean and step std of a stored transition under the current weights."""
    sigmas = sampling_sigmas(steps, shift).tolist()
    j = t['j']
    v = guided_velocity(dit, t['x'], sigmas[j], ctx, pooled, neg_ctx, neg_pooled, cfg)
    _, log_prob, mean, std_t = sde_step(t['x'], v, sigmas[j], sigmas[j + 1], noise_level, x_next=t['x_next'])
    step_std = std_t.view(-1) * math.sqrt(sigmas[j] - sigmas[j + 1])
    return log_prob, mean, step_std
