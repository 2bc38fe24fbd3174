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
                  beta * KL(N(mu, s^2) || N(mu_ref, s^2)) = beta * |mu - mu_ref|^2 / (2 s^2), s = std_t * sqrt(-dt)
                  (kl_form 'exact'; 'flow_grpo' divides by 2 std_t^2, see below).

Where this departs from the paper, Flow-GRPO or TRL:
- The group std is the population std (np.std, as Flow-GRPO's PerPromptStatTracker in
  flow_grpo/stat_tracking.py); TRL's GRPOTrainer divides by the sample std (torch.std, unbiased). With
  G = 8 the two differ by sqrt(8/7), a constant scale of the advantages. Flow-GRPO's SD3.5 configs
  set global_std: the group's mean, but the population std of the whole batch's rewards.
- The token loss is TRL's "dapo" aggregation (the default there); TRL's "grpo" mean per sequence is
  not offered: it weighs a short caption's tokens more, and caption length is what G4U's aha moment is.
- The U4G KL, kl_form: 'exact' (default) is the exact Gaussian KL of one step, divided by the step's
  variance std_t^2 * (sigma - sigma'), the Flow-GRPO paper's formula. 'flow_grpo' is Flow-GRPO's code
  (yifan123/flow_grpo, scripts/train_sd3.py, the training loop's kl_loss, with std_dev_t as returned by
  flow_grpo/diffusers_patch/sd3_sde_with_logprob.py's sde_step_with_logprob): the mean over C, H, W of
  |mu - mu_ref|^2, divided by 2 * std_dev_t^2, std_dev_t = a * sqrt(sigma / (1 - sigma)) *before* the
  sqrt(sigma - sigma') factor. It is 'exact' times (sigma - sigma'): on the 10-step shift-3 schedule
  (1 / (sigma - sigma') = 25.1, 21.4, 18.0, 14.9, 12.0, 9.5, 7.3, 5.4, 3.7 over the 9 SDE steps) 3.7-25x
  weaker per step, 13x on average, so a beta taken from Flow-GRPO's configs means its strength only
  with kl_form='flow_grpo'.
- num_iterations (TRL's name, default 1) optimiser updates per batch of rollouts, each over the whole
  batch: the rollouts, their advantages and old log-probs (recorded by the sampling policy) are
  computed once, the new log-probs at every update, so from the second on the ratio leaves 1 and the
  clipping binds. Flow-GRPO's "two updates per batch" are PPO minibatches instead (gradient
  accumulation over half the rollouts, num_inner_epochs 1): each sample is seen once, the second
  half by an already updated policy. With 1, the ratio is 1 at the update and the clipping only bounds
  a step as in on-policy GRPO.
- drop_zero_advantage (default off): samples whose advantage is exactly 0 (a group whose rewards are
  all equal) leave the loss, as Flow-GRPO drops them; the loss is then averaged over the kept samples
  (U4G) or kept caption tokens (G4U) of all ranks. Off, they stay in: their policy term is 0 but they
  count in the average, so they dilute the policy term against the KL (their fraction is logged as
  zero_std).
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
    zero_std = (all_equal(r) & ~skip).float().mean().item()
    if scale == 'std':
        centred = centred / (std + std_floor)
    elif scale != 'none':
        raise ValueError(f"advantage scale must be 'std' or 'none', got {scale!r}")
    return centred.view(-1), zero_std


def all_equal(r):
    """(groups, 1) True for a group (row of r) whose rewards are all equal: tested by equality, since their
    float32 std is a rounding residue (~6e-8) and r - mean(r) is +-1 ulp, not 0."""
    return (r == r[:, :1]).all(dim=1, keepdim=True)


def has_signal(rewards, adv, group_size):
    """(N,) True for the samples that carry a policy signal: advantage not exactly 0 and a group whose
    rewards are not all equal. The second test is needed as r - mean(r) of G equal float32 rewards is
    +-1 ulp rather than 0 (so the advantage is ~1e-3, not 0). What drop_zero_advantage keeps."""
    r = rewards.float().view(-1, group_size)
    varied = (~all_equal(r)).expand_as(r).reshape(-1)
    return varied & (adv != 0)


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


def flow_grpo_loss(logp, old_logp, adv, eps=1e-4, adv_clip=5.0, mean=None, ref_mean=None, std=None, beta=0.0,
                   kl_form='exact', dsigma=None):
    """Clipped surrogate on the log-prob of one SDE transition, for a batch of N trajectories.

    logp, old_logp: (N,) log-density of the same x_{t+1} given x_t under the current and the
        sampling policy (averaged over C, H, W, see model_decoder.sde_step).
    mean, ref_mean: (N, C, H, W) means of that transition under the policy and the reference;
        KL between two Gaussians of equal std is |mu - mu_ref|^2 / (2 std^2).
    std: (N,) or scalar, the transition's std (std_t * sqrt(-dt)).
    kl_form: 'exact' divides by 2 std^2 (the KL itself); 'flow_grpo' by 2 std_t^2 = 2 std^2 / dsigma
        (Flow-GRPO's code, see the module docstring), dsigma = sigma - sigma' of this step.
    """
    a = adv.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)).mean()
    kl = torch.zeros((), device=logp.device)
    if beta > 0 and ref_mean is not None:
        s = torch.as_tensor(std, device=logp.device, dtype=torch.float32)
        s = s.view(-1, *[1] * (mean.dim() - 1)) if s.dim() else s
        if kl_form == 'exact':
            var = s ** 2
        elif kl_form == 'flow_grpo':
            var = s ** 2 / dsigma  # std_t^2: without the step's (sigma - sigma') factor
        else:
            raise ValueError(f"kl_form must be 'exact' or 'flow_grpo', got {kl_form!r}")
        kl = (((mean - ref_mean) ** 2) / (2 * var)).mean()
        loss = loss + beta * kl
    with torch.no_grad():
        stats = dict(kl=kl.item(), clip_frac=((ratio - 1).abs() > eps).float().mean().item(),
                     ratio=ratio.mean().item())
    return loss, stats
