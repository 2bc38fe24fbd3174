"""The GRPO algorithm pieces against hand computations."""
import math

import pytest
import torch

from grpo import flow_grpo_loss, group_advantages, token_grpo_loss


def test_group_advantages_by_hand():
    r = torch.tensor([1., 0., 0., 1., 0.5, 0.5, 0.5, 0.5])  # two groups of 4, the second all equal
    adv, zero_std = group_advantages(r, 4)
    # group 1: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-4)
    a = 0.5 / (0.5 + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert zero_std == 0.5
    adv, _ = group_advantages(r, 4, scale='none')
    assert torch.allclose(adv, torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match='groups of 3'):
        group_advantages(r, 3)
    # six equal float32 rewards whose std is a rounding residue (6e-8), not 0: still a group without signal
    _, zero_std = group_advantages(torch.tensor([0.7286418676376343] * 6), 6)
    assert zero_std == 1.0


def test_token_loss_by_hand():
    # two sequences, three token slots, the last slot of the second is padding
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -9.0]])
    old = torch.tensor([[-1.0, -2.5, -0.5], [-1.0, -0.2, -1.0]])
    ref = torch.tensor([[-1.2, -2.0, -0.4], [-1.5, -0.1, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    eps, beta = 0.2, 0.1
    total, n = 0.0, 0
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            r = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            s = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            d = (ref[i, t] - logp[i, t]).item()
            total += -s + beta * (math.exp(d) - d - 1)
            n += 1
    loss, stats = token_grpo_loss(logp, old, adv, mask, ref_logp=ref, eps_low=eps, eps_high=eps, beta=beta)
    assert loss.item() == pytest.approx(total / n, rel=1e-6)
    # seq 0 token 1: ratio e^0.5 > 1.2 with a > 0 -> clipped; seq 1 token 0: ratio e^-0.5 < 0.8, a < 0 -> clipped
    assert stats['clip_frac'] == pytest.approx(2 / 5)


def test_on_policy_first_step_ratio_one_kl_zero():
    logp = torch.randn(4, 7, requires_grad=True)
    adv = torch.randn(4)
    mask = torch.ones(4, 7)
    loss, stats = token_grpo_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach(), beta=0.05)
    assert stats['ratio'] == pytest.approx(1.0) and stats['kl'] == 0 and stats['clip_frac'] == 0
    loss.backward()
    # gradient of -ratio*A at ratio 1 is -A/(number of tokens) for every token
    assert torch.allclose(logp.grad, (-adv[:, None] / 28).expand(4, 7))


def test_flow_loss_by_hand():
    logp = torch.tensor([-1.0, -1.00005, -2.0])
    old = torch.tensor([-1.0, -1.0, -1.99])
    adv = torch.tensor([1.0, -7.0, 2.0])  # -7 is clipped to -5
    eps = 1e-4
    expected = 0.0
    for lp, lo, a in zip(logp.tolist(), old.tolist(), [1.0, -5.0, 2.0]):
        r = math.exp(lp - lo)
        expected += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
    loss, _ = flow_grpo_loss(logp, old, adv, eps=eps, adv_clip=5.0)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-6)
    mean = torch.randn(3, 2, 4, 4)
    ref = mean + 0.1
    loss_kl, stats = flow_grpo_loss(logp, old, adv, eps=eps, mean=mean, ref_mean=ref,
                                    std=torch.tensor([0.5, 0.5, 0.5]), beta=0.1)
    assert stats['kl'] == pytest.approx(0.01 / (2 * 0.25), rel=1e-5)
    assert loss_kl.item() == pytest.approx(expected / 3 + 0.1 * 0.02, rel=1e-5)


def test_scene_rewards_by_hand():
    """'scene' is exact object F1; 'scene_attributes' gives each attribute and the background partial credit."""
    import numpy as np
    from data.shapes import world
    from embedders import similarities
    objs = [dict(shape='circle', color='red', size='large', cell=(0, 0)),
            dict(shape='square', color='blue', size='small', cell=(2, 1))]
    orig = world.render(dict(background='black', objects=objs))
    one_missing = world.render(dict(background='black', objects=objs[:1]))
    recolored = world.render(dict(background='black', objects=[objs[0], dict(objs[1], color='green')]))
    m = similarities(['scene', 'scene_attributes'], {}, np.stack([orig, one_missing, recolored]), np.stack([orig] * 3))
    # one of two objects drawn: P 1, R 1/2 -> F1 2/3 for the object and for every attribute; background right
    assert torch.allclose(m['scene'], torch.tensor([1.0, 2 / 3, 0.5], dtype=torch.float64))
    # recoloured: shape, size, cell all 1, colour 1/2; the object F1 counts it as wrong (1 of 2)
    assert torch.allclose(m['scene_attributes'], torch.tensor([1.0, (4 * 2 / 3 + 1) / 5, (3 + 0.5 + 1) / 5], dtype=torch.float64))


def test_flow_kl_forms_by_hand():
    """kl_form='flow_grpo' is Flow-GRPO's code (scripts/train_sd3.py's kl_loss): the mean over C, H, W of
    |mu - mu_ref|^2 over 2 std_dev_t^2, std_dev_t = a sqrt(sigma / (1 - sigma)) without the step's
    sqrt(sigma - sigma'); 'exact' (the default) is the same divided by (sigma - sigma')."""
    import model_decoder as D
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=g)
    ref = mean + 0.1 * torch.randn(3, 2, 4, 4, generator=g)
    zero = torch.zeros(3)  # advantages 0: the loss is beta * KL alone
    sigma, sigma_next, a, beta = 0.7073, 0.6022, 0.7, 0.04
    std_dev_t = a * math.sqrt(sigma / (1 - sigma))
    dsigma = sigma - sigma_next
    flow = (((mean - ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2)).mean().item()
    step_std = torch.full((3,), std_dev_t * math.sqrt(dsigma))  # what transition_logprob returns
    kw = dict(mean=mean, ref_mean=ref, std=step_std, beta=beta, dsigma=dsigma)
    loss_flow, s_flow = flow_grpo_loss(zero, zero, zero, kl_form='flow_grpo', **kw)
    loss_exact, s_exact = flow_grpo_loss(zero, zero, zero, kl_form='exact', **kw)
    _, s_default = flow_grpo_loss(zero, zero, zero, **kw)
    assert s_flow['kl'] == pytest.approx(flow, rel=1e-5) and loss_flow.item() == pytest.approx(beta * flow, rel=1e-5)
    assert s_exact['kl'] == pytest.approx(flow / dsigma, rel=1e-5)
    assert s_default['kl'] == s_exact['kl']
    with pytest.raises(ValueError, match="kl_form must be 'exact' or 'flow_grpo'"):
        flow_grpo_loss(zero, zero, zero, kl_form='k3', **kw)
    # the factor between the two on the 10-step shift-3 schedule, over its 9 SDE steps (config/uae_u4g.py)
    s = D.sampling_sigmas(10, 3.0).tolist()
    factors = [1 / (s[j] - s[j + 1]) for j in range(9)]
    assert min(factors) == pytest.approx(3.72, abs=0.01) and max(factors) == pytest.approx(25.08, abs=0.01)


def test_has_signal_drops_groups_of_equal_rewards():
    """Eight equal float32 rewards leave r - mean(r) at +-1 ulp, an advantage of ~1e-3, not 0: the group
    has no signal all the same. A sample at its group's mean (advantage exactly 0) has none either."""
    from grpo import has_signal
    r = torch.tensor([0.9] * 8 + [0.0, 0.5, 1.0, 0.5, 0.25, 0.75, 0.375, 0.625])  # mean 0.5 exactly
    adv, _ = group_advantages(r, 8)
    assert adv[:8].abs().max() > 0  # the rounding the second test is for
    keep = has_signal(r, adv, 8)
    assert keep.tolist() == [False] * 8 + [True, False, True, False, True, True, True, True]
