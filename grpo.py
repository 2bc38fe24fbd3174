"""
Unified-GRPO's math: group advantages and the two clipped-surrogate losses. The loop that produces
what they eat (rollouts, rewards, updates) is train_rl.py; the samplers are the models' own
(model_encoder.Encoder.generate, model_decoder.sample with sde_steps).

    G4U  (generation for understanding): G captions per image, each decoded by the frozen decoder and
         rewarded by reconstruction similarity; GRPO on the encoder's caption tokens.
    U4G  (understanding for generation): G images per caption from an SDE sampler that records each
         step's log-prob; GRPO on the decoder's denoising steps (Flow-GRPO).

The formulas (sources: GRPO, Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300; TRL's GRPOTrainer;
Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, and its code; UAE, arXiv 2509.09666):

    advantage     A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4), the std over the group's G
                  rewards; Dr. GRPO's variant only subtracts the mean. Several reward metrics are each
                  z-scored over the batch before they are mixed, so that none dominates by scale.
    token loss    per caption token: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3,
                  rho = exp(logp - logp_old), k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's
                  unbiased, non-negative KL estimator; reference = the same model with its LoRA off);
                  summed over every active token of the batch and divided by their count.
    SDE step      sigma -> sigma' (dt = sigma' - sigma < 0), noise level a:
                  std_t = a * sqrt(sigma / (1 - sigma)),
                  mu = x * (1 + std_t^2 * dt / (2 sigma)) + v * (1 + std_t^2 * (1 - sigma) / (2 sigma)) * dt,
                  x' = mu + std_t * sqrt(-dt) * eps; log-prob = the Gaussian log-density of x', averaged
                  over C, H, W (model_decoder.sde_step).
    step loss     max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)), eps ~ 1e-4, A clipped to +-5, plus
                  beta * KL(N(mu, s^2) || N(mu_ref, s^2)) = beta * |mu - mu_ref|^2 / (2 s^2), s = std_t * sqrt(-dt).

Where this departs from the paper, Flow-GRPO or TRL:
- The group std is the population std (as Flow-GRPO's np.std); TRL divides by the sample std. With
  G = 8 the two differ by sqrt(8/7), a constant scale of the advantages.
- The token loss is TRL's "dapo" aggregation (the default there); TRL's "grpo" mean per sequence is
  not offered: it weighs a short caption's tokens more, and caption length is what G4U's aha moment is.
- The U4G KL is the exact Gaussian KL of one step, divided by the step's variance std_t^2 * (sigma - sigma')
  (the Flow-GRPO paper's formula). Flow-GRPO's code divides by std_t^2 alone, 3.7-25x weaker per
  step on a 10-step shift-3 schedule, so a beta taken from its configs is not the same strength here.
- One optimiser update per batch of rollouts (Flow-GRPO makes two, TRL's num_iterations > 1): the
  ratio is then 1 at the update, and the clipping only bounds a step as in on-policy GRPO.
- Samples of zero advantage are kept in the loss (Flow-GRPO drops them); their fraction is logged
  as zero_std.
- U4G trains a window of SDE steps with Euler (ODE) steps elsewhere (MixGRPO / Flow-GRPO-Fast), not
  all steps; the last step is never stochastic, so the image holds no leftover noise.
- UAE published no RL hyperparameters: the real-model configs (config/uae_*.py) say where each value
  comes from.
"""

import torch

# -----------------------------------------------------------------------------
# advantages


def group_advantages(rewards, group_size, scale='std', std_floor=1e-4):
    """Normalise rewards within each group of `group_size` consecutive samples.

    rewards: (N,) with N a multiple of group_size, the G samples of one prompt side by side.
    scale: 'std' divides by (group std + std_floor) (GRPO); 'none' only subtracts the mean (Dr. GRPO).
    A group with a NaN or inf reward is skipped: its advantages are 0 (train_rl logs how many rewards were).
    Returns (advantages (N,), fraction of groups whose rewards are all equal: they carry no signal).
    """
    if rewards.numel() % group_size:
        raise ValueError(f'{rewards.numel()} rewards do not split into groups of {group_size}')
    r = rewards.float().view(-1, group_size)
    skip = ~r.isfinite().all(dim=1, keepdim=True)
    r = r.masked_fill(skip, 0.0)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    zero_std = ((std < 1e-8) & ~skip).float().mean().item()
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
