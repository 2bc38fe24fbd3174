"""Unified-GRPO end to end on tiny random checkpoints (CPU): the rollouts of grpo.py are on-policy (stored
log-probs equal their re-evaluation, ratio 1 and KL 0 on the first step), train_rl.py under torchrun keeps
both ranks identical, resume is exact, coldstart lowers its loss, the saved PEFT adapters reproduce
the trained model; a folder of image files (real data) trains and is evaluated by the reward; the real-model
config files parse.

Rewards are the pixel metric here, not the toy scene score: random models draw nothing the parser
recognises, so every scene reward would be 0, every advantage 0, and no weight would ever move (a resume
or rank-sync test on unmoved weights could not fail).
"""
import copy
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo  # noqa: E402
import train_rl  # noqa: E402
from common import load_safetensors, save_safetensors  # noqa: E402
from data.shapes import prepare, world  # noqa: E402
from images import to_pil  # noqa: E402
from lora import apply_lora, lora_disabled, lora_layers, target_names  # noqa: E402
from model_decoder import LinearCodec, MMDiT, MMDiTConfig  # noqa: E402
from model_encoder import Encoder, EncoderConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from pipeline import load_uae  # noqa: E402
import model_decoder as D  # noqa: E402

TINY_RUN = dict(images_per_step=2, group_size=2, sample_steps=3, max_new_tokens=8, eval_images=2, eval_steps=2,
                reward={'pixel': 1.0})


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """Tiny random encoder / decoder / pooled vector and a tiny prepared toy dataset."""
    d = tmp_path_factory.mktemp('toy')
    torch.manual_seed(0)
    with open(os.path.join(ROOT, 'config', 'toy_encoder.json')) as f:
        ec = json.load(f)
    ec['text_config'].update(num_hidden_layers=2, intermediate_size=128)
    ec['vision_config'].update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                               fullatt_block_indexes=[1])
    ec['projector_hidden_size'] = 64
    Encoder(EncoderConfig.from_hf(ec), Tokenizer.from_pretrained(os.path.join(ROOT, 'data', 'shapes'))
            ).save_pretrained(str(d / 'llm'))
    with open(os.path.join(ROOT, 'config', 'toy_decoder.json')) as f:
        dc = dict(json.load(f), num_layers=2)
    MMDiT(MMDiTConfig.from_dict(dc)).save_pretrained(str(d / 'dit'))
    save_safetensors({'pooled': torch.randn(64)}, str(d / 'pooled.safetensors'))
    # tokenizer='' : never rewrite the shipped data/shapes/tokenizer.json
    prepare.main([f'--out={d / "data"}', '--n_train=256', '--n_val=32', '--n_test=8', '--tokenizer='])
    # the toy decoder's latent space, fitted to the tiny training split
    images, _ = world.load_split(str(d / 'data' / 'train'))
    pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    LinearCodec.fit(pixels, world.IMAGE // dc['sample_size'], dc['in_channels']).save(str(d / 'codec.safetensors'))
    paths = dict(llm=str(d / 'llm'), dit=str(d / 'dit'), pooled=str(d / 'pooled.safetensors'),
                 vae=str(d / 'codec.safetensors'), data_dir=str(d / 'data'))
    cfg = dict(train_rl.config, **paths, llm_lora='', dit_lora='')  # what sample.load_uae reads
    return SimpleNamespace(dir=d, paths=paths, cfg=cfg)


def cli(toy, stage, out_dir, **overrides):
    opts = {'stage': stage, 'out_dir': str(out_dir), **toy.paths, **TINY_RUN, **overrides}  # later keys win
    return [f'--{k}={v}' if isinstance(v, str) else f'--{k}={v!r}' for k, v in opts.items()]


def run_main(args):
    """train_rl.main() in this process (no interpreter start-up); configure() updates the module's config
    dict in place, so each run gets a pristine copy."""
    saved, argv = train_rl.config, sys.argv
    train_rl.config, sys.argv = copy.deepcopy(saved), ['train_rl.py', *args]
    try:
        train_rl.main()
    finally:
        train_rl.config, sys.argv = saved, argv


def trainable_weights(out_dir):
    return load_safetensors(os.path.join(out_dir, 'ckpt', 'trainable.safetensors'))


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def randomise_lora_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


# -----------------------------------------------------------------------------
# on-policy consistency


def test_sde_rollout_logprobs_equal_their_reevaluation(toy):
    enc, dit, _, pooled = load_uae(toy.cfg, 'cpu')
    with torch.no_grad():
        ctx = enc.embed_prompt(['a red circle in the center.', 'two blue squares on the left.', ''])
    G, steps, cfg, shift, level = 2, 4, 2.0, 1.0, 0.7
    ctx_c, neg, pooled_c = ctx[:2].repeat_interleave(G, 0), ctx[2:], pooled.expand(2 * G, -1)
    c = dit.config
    noise = torch.randn(2 * G, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(1))
    args = (ctx_c, pooled_c, neg, pooled, steps, cfg, shift, level)
    with torch.no_grad():
        rollout = lambda seed: D.sample(dit, ctx_c, pooled_c, neg, pooled, steps, cfg, shift,
                                        torch.Generator().manual_seed(seed), noise=noise, sde_steps={0, 1, 2},
                                        noise_level=level)
    for with_lora in (False, True):
        if with_lora:  # B != 0: the adapter really changes the velocity
            apply_lora(dit, train_rl.config['dit_lora_targets'], 4, 8)
            randomise_lora_B(dit)
        x0, transitions = rollout(0)
        assert [t['j'] for t in transitions] == [0, 1, 2]  # the last step is the ODE's
        assert torch.equal(x0, rollout(0)[0])  # the SDE noise comes from the generator: reproducible
        assert not torch.allclose(x0, rollout(1)[0])
        for t in transitions:
            logp, mean, std = D.transition_logprob(dit, t, *args)
            assert (logp - t['log_prob']).abs().max() < 1e-6
            assert not torch.allclose(t['x_next'], mean, atol=1e-3)  # a real random step, not the mean
            # a micro-batch of the rows, as u4g_step re-evaluates them
            sub = dict(j=t['j'], x=t['x'][1:3], x_next=t['x_next'][1:3])
            logp_mb, _, _ = D.transition_logprob(dit, sub, ctx_c[1:3], pooled_c[1:3], *args[2:])
            assert (logp_mb - t['log_prob'][1:3]).abs().max() < 1e-5
            _, stats = grpo.flow_grpo_loss(logp, t['log_prob'], torch.randn(2 * G), eps=1e-4)
            assert stats['ratio'] == pytest.approx(1, abs=1e-6) and stats['clip_frac'] == 0
        if with_lora:  # another policy scores the same transitions differently: the comparison above can fail
            with torch.no_grad(), lora_disabled(dit):
                ref, _, _ = D.transition_logprob(dit, transitions[1], *args)
            assert (ref - transitions[1]['log_prob']).abs().max() > 1e-3


def test_llm_lora_leaves_the_layers_below_prompt_layer_alone(toy):
    """The decoder reads the LLM states after prompt_layer layers: G4U's adapter is on the layers from there
    on (what the decoder reads of a caption stays put), unless llm_lora_below_prompt_layer; with no
    prompt_layer (UAE: the last layer) the targets are as given."""
    enc = load_uae(toy.cfg, 'cpu')[0]
    cfg = dict(toy.cfg, llm_lora_below_prompt_layer=False)
    every = target_names(enc, cfg['llm_lora_targets'])
    assert enc.config.prompt_layer is None and train_rl.llm_targets(enc, cfg) == cfg['llm_lora_targets']
    enc.config.prompt_layer = 1
    kept = train_rl.llm_targets(enc, cfg)
    assert kept == [n for n in every if '.layers.0.' not in n] and len(kept) < len(every)
    assert train_rl.llm_targets(enc, dict(cfg, llm_lora_below_prompt_layer=True)) == cfg['llm_lora_targets']


def test_first_g4u_step_is_on_policy(toy):
    enc, dit, _, pooled = load_uae(toy.cfg, 'cpu')
    enc.requires_grad_(False)
    torch.manual_seed(0)
    params = train_rl.trainable(enc, dict(toy.cfg, lora_r=8, lora_alpha=16), toy.cfg['llm_lora_targets'])  # B = 0
    images, _ = world.load_split(os.path.join(toy.paths['data_dir'], 'val'))
    images, G, temperature = images[:2], 2, 0.7
    suppress = enc.caption_suppress_tokens()
    with torch.no_grad():  # G captions per image, as g4u_step samples them
        batch = enc.caption_inputs([im for im in to_pil(images) for _ in range(G)])
        out = enc.generate(**batch, max_new_tokens=8, temperature=temperature,
                           generator=torch.Generator().manual_seed(0), suppress_tokens=suppress)
    assert out.mask.sum() > 4
    logp = enc.token_logprobs(batch, out.tokens, out.mask, temperature, suppress_tokens=suppress)
    assert (logp - out.logprobs).abs().max() < 1e-5
    # what it is compared with matters: without the suppressed tokens the distribution is another one
    assert (enc.token_logprobs(batch, out.tokens, out.mask, temperature) - out.logprobs).abs().max() > 1e-4
    with torch.no_grad(), lora_disabled(enc):
        ref = enc.token_logprobs(batch, out.tokens, out.mask, temperature, suppress_tokens=suppress)
    _, stats = grpo.token_grpo_loss(logp, out.logprobs, torch.randn(len(images) * G), out.mask, ref, beta=0.04)
    assert stats['ratio'] == pytest.approx(1, abs=1e-5) and stats['kl'] == 0 and stats['clip_frac'] == 0

    # the same through the loop's g4u_step, micro-batched (3 rows of 4: the pixel rows of each image are
    # sliced out of the batch) or not: ratio 1, KL 0, and the same accumulated gradient
    cfg = dict(toy.cfg, **TINY_RUN, temperature=temperature, beta=0.04)
    grads = []
    for micro_batch in (3, 64):
        log, backward = train_rl.g4u_step(dict(cfg, micro_batch=micro_batch), enc, dit,
                                          LinearCodec.load(toy.paths['vae']), pooled, train_rl.load_reward(cfg, 'cpu'),
                                          images, torch.Generator().manual_seed(0), 0, 1)
        stats = dict(log, **backward())
        assert stats['ratio'] == pytest.approx(1, abs=1e-5) and stats['kl'] == 0 and stats['clip_frac'] == 0
        assert stats['reward_std'] > 0
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        for p in params:
            p.grad = None
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-9)


# -----------------------------------------------------------------------------
# several updates per batch of rollouts, samples of zero advantage dropped


def record(monkeypatch, obj, name, seen):
    """Keep what obj.name returns in seen[name] (the rollouts a step draws inside)."""
    f = getattr(obj, name)

    def wrapped(*args, **kwargs):
        seen[name] = f(*args, **kwargs)
        return seen[name]
    monkeypatch.setattr(obj, name, wrapped)


def test_second_g4u_update_reuses_the_rollouts(toy, monkeypatch):
    """num_iterations: the second backward on the same rollouts, after an update, compares the new
    log-probs with the ones recorded at sampling: its ratio is exp(new - old), off 1, and clipping binds.
    With drop_zero_advantage the middle image's group (equal rewards) leaves the loss: the micro-batches
    of 3 kept captions then gather the pixel rows of images 0 and 2."""
    enc, dit, codec, pooled = load_uae(toy.cfg, 'cpu')
    enc.requires_grad_(False)
    torch.manual_seed(0)
    params = train_rl.trainable(enc, dict(toy.cfg, lora_r=8, lora_alpha=16), toy.cfg['llm_lora_targets'])
    opt = torch.optim.Adam(params, lr=1e-2)
    images, _ = world.load_split(os.path.join(toy.paths['data_dir'], 'val'))
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.7])  # 3 images x G = 2
    monkeypatch.setattr(train_rl, 'reward', lambda *args: (rewards, dict(reward=0.5)))
    seen, eps, temperature = {}, 0.02, 1.0
    for name in ('caption_inputs', 'generate'):
        record(monkeypatch, enc, name, seen)
    cfg = dict(toy.cfg, **TINY_RUN, temperature=temperature, beta=0.04, micro_batch=3, eps_low=eps, eps_high=eps,
               drop_zero_advantage=True)
    log, backward = train_rl.g4u_step(cfg, enc, dit, codec, pooled, {}, images[:3], torch.Generator().manual_seed(0),
                                      0, 1)
    assert log['kept'] == pytest.approx(4 / 6)
    first = backward()
    assert first['ratio'] == pytest.approx(1, abs=1e-5) and first['clip_frac'] == 0
    opt.step()
    opt.zero_grad()
    second = backward()
    batch, out = seen['caption_inputs'], seen['generate']
    adv, _ = grpo.group_advantages(rewards, 2)
    with torch.no_grad():
        new = enc.token_logprobs(batch, out.tokens, out.mask, temperature,
                                 suppress_tokens=enc.caption_suppress_tokens())
    keep = torch.tensor([1., 1., 0., 0., 1., 1.])[:, None]  # the middle group dropped
    m, ratio, a = out.mask.float() * keep, torch.exp(new - out.logprobs), adv[:, None]
    clipped = ((ratio < 1 - eps) & (a < 0)) | ((ratio > 1 + eps) & (a > 0))
    assert second['ratio'] == pytest.approx(((ratio * m).sum() / m.sum()).item(), rel=1e-5)
    assert abs(second['ratio'] - 1) > 1e-3
    assert second['clip_frac'] == pytest.approx(((clipped * m).sum() / m.sum()).item(), abs=1e-6)
    assert second['clip_frac'] > 0


def test_dropped_samples_leave_the_u4g_loss(toy, monkeypatch):
    """drop_zero_advantage: the gradient is that of the loss over the kept rollouts alone, averaged over
    them (a group of equal rewards is dropped, its KL too); keeping them gives another gradient."""
    enc, dit, codec, pooled = load_uae(toy.cfg, 'cpu')
    dit.requires_grad_(False)
    torch.manual_seed(0)
    params = train_rl.trainable(dit, dict(toy.cfg, lora_r=4, lora_alpha=8), toy.cfg['dit_lora_targets'])
    randomise_lora_B(dit)  # policy != reference: every sample has a KL term
    images, _ = world.load_split(os.path.join(toy.paths['data_dir'], 'val'))
    rewards = torch.tensor([0.2, 0.6, 0.5, 0.5])  # 2 captions x G = 2; the second group carries no signal
    monkeypatch.setattr(train_rl, 'reward', lambda *args: (rewards, dict(reward=0.45)))
    seen = {}
    record(monkeypatch, D, 'sample', seen)
    record(monkeypatch, enc, 'embed_prompt', seen)
    cfg = dict(toy.cfg, **TINY_RUN, beta=0.1, micro_batch=1, sde_window=0, kl_form='exact')
    grads = {}
    for drop in (True, False):
        log, backward = train_rl.u4g_step(dict(cfg, drop_zero_advantage=drop), enc, dit, codec, pooled, {},
                                          images[:2], torch.Generator().manual_seed(0), 0, 1, 0)
        backward()
        grads[drop] = torch.cat([p.grad.reshape(-1) for p in params])
        for p in params:
            p.grad = None
    assert log.get('kept') is None
    # by hand: the rows of the first group only, a mean over them and the SDE steps
    _, transitions = seen['sample']
    ctx, T, kept = seen['embed_prompt'], cfg['sample_steps'], slice(0, 2)
    adv, _ = grpo.group_advantages(rewards, 2)
    args = (ctx[:1].repeat_interleave(2, 0), pooled.expand(2, -1), ctx[2:], pooled, T, cfg['guidance'], cfg['shift'],
            cfg['noise_level'])
    loss = 0
    for t in transitions:
        tt = dict(j=t['j'], x=t['x'][kept], x_next=t['x_next'][kept])
        logp, mean, std = D.transition_logprob(dit, tt, *args)
        with torch.no_grad(), lora_disabled(dit):
            ref = D.transition_logprob(dit, tt, *args)[1]
        loss = loss + grpo.flow_grpo_loss(logp, t['log_prob'][kept], adv[kept], cfg['flow_eps'], cfg['adv_clip'],
                                          mean, ref, std, cfg['beta'])[0] / len(transitions)
    loss.backward()
    by_hand = torch.cat([p.grad.reshape(-1) for p in params])
    assert len(transitions) == 2 and by_hand.abs().max() > 0
    torch.testing.assert_close(grads[True], by_hand, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads[False], by_hand, rtol=1e-2, atol=0)


@pytest.mark.parametrize('stage', ['g4u', 'u4g'])
def test_nothing_kept_makes_no_update(toy, monkeypatch, stage):
    """Every advantage 0 with drop_zero_advantage: the step logs no update, no NaN, and the weights stay."""
    monkeypatch.setattr(train_rl, 'reward', lambda cfg, emb, recon, *rest: (torch.full((len(recon),), 0.5),
                                                                            dict(reward=0.5)))
    out = toy.dir / f'nothing_kept_{stage}'
    run_main(cli(toy, stage, out, steps=1, drop_zero_advantage=True, num_iterations=2, eval_every=100,
                 save_every=100))
    row = [r for r in read_log(out) if 'reward' in r][0]
    assert row['updates'] == 0 and row['kept'] == 0 and row['skipped_steps'] == 0 and 'grad_norm' not in row
    assert all(v.abs().max() == 0 for k, v in trainable_weights(out).items() if 'lora_B' in k)


@pytest.mark.parametrize('stage', ['g4u', 'u4g'])
def test_eval_images_0_evaluates_nothing(toy, stage):
    """eval_images=0 (the speedrun, which evaluates every stage with bench.py): the log has the training rows
    only, none at step 0; with steps=0 too there is nothing to do, and that is an error."""
    out = toy.dir / f'no_eval_{stage}'
    run_main(cli(toy, stage, out, steps=2, eval_images=0, eval_every=1, save_every=100))
    rows = read_log(out)
    assert [r['step'] for r in rows] == [1, 2] and not any(k.startswith('val_') for r in rows for k in r), rows
    with pytest.raises(ValueError, match='nothing to do'):
        run_main(cli(toy, stage, toy.dir / f'no_eval_{stage}_0', steps=0, eval_images=0))


def test_num_iterations_updates_on_the_same_rollouts(toy):
    """Two updates per step: the second sees a ratio off 1 (logged for the last update), and the
    weights move further than with one update on the same rollouts."""
    runs = {}
    for k in (1, 2):
        runs[k] = toy.dir / f'iterations_{k}'
        run_main(cli(toy, 'u4g', runs[k], steps=1, num_iterations=k, eval_every=100, save_every=100))
    one, two = ([r for r in read_log(runs[k]) if 'reward' in r][0] for k in (1, 2))
    assert 'updates' not in one and one['ratio'] == pytest.approx(1, abs=1e-6)
    assert two['updates'] == 2 and abs(two['ratio'] - 1) > 1e-6 and two['clip_frac'] > 0
    assert one['reward'] == two['reward']  # the same rollouts
    a, b = trainable_weights(runs[1]), trainable_weights(runs[2])
    assert any(not torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# the loop: torchrun, resume, coldstart, saved adapters


def test_torchrun_two_ranks_stay_in_sync(toy):
    """2 steps of each stage under torchrun on 2 ranks (launched together: the machine is shared); u4g
    with two updates per batch and the kept samples counted over the ranks."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    runs = {}
    for stage in ('coldstart', 'g4u', 'u4g'):
        out = toy.dir / f'ddp_{stage}'
        extra = dict(num_iterations=2, drop_zero_advantage=True) if stage == 'u4g' else {}
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_rl.py',
               *cli(toy, stage, out, steps=2, **extra)]
        runs[stage] = (out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True))
    for stage, (out, proc) in runs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f'{stage}:\n{log[-4000:]}'
        m = re.search(r'ranks in sync: (\d+) parameters', log)
        assert m, f'{stage}: no sync line in\n{log[-2000:]}'
        weights = trainable_weights(out)
        assert int(m.group(1)) == sum(v.numel() for v in weights.values())
        assert any('lora_B' in k and v.abs().max() > 0 for k, v in weights.items()), f'{stage}: nothing trained'
        assert [r['step'] for r in read_log(out) if 'reward' in r] == [1, 2]


SYNC_CHECK = """
import sys
import torch, torch.distributed as dist
from common import all_reduce_grads, check_ranks_in_sync
rank = int(sys.argv[2])
dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=rank, world_size=2)
weights = {'a.lora_A.weight': torch.ones(2, 3), 'a.lora_B.weight': torch.arange(4.).view(4, 1)}
print('in sync', check_ranks_in_sync(weights))
# gradients of mixed dtypes (bf16 and fp32 parameters) are summed and handed back in each parameter's dtype
params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(2))]
params[0].grad, params[1].grad = torch.full((3,), 1. + rank, dtype=torch.bfloat16), None
all_reduce_grads(params, 2)
print('grads', [(str(p.grad.dtype), p.grad.tolist()) for p in params])
weights['a.lora_B.weight'][2] += 2 ** -20 * rank  # one element of one rank drifts by a few ulps
try:
    check_ranks_in_sync(weights)
except RuntimeError as e:
    print(e)
dist.destroy_process_group()
"""


def test_rank_sync_check_catches_drift(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, '-c', SYNC_CHECK, str(tmp_path / 'store'), str(rank)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        assert 'in sync 10' in log
        assert "grads [('torch.bfloat16', [3.0, 3.0, 3.0]), ('torch.float32', [0.0, 0.0])]" in log, log
        assert "ranks diverged: 1 of 2 trainable tensors differ" in log and "['a.lora_B.weight']" in log, log


@pytest.mark.parametrize('stage', ['g4u', 'u4g'])
def test_resume_is_exact(toy, stage):
    full, part = toy.dir / f'full_{stage}', toy.dir / f'part_{stage}'
    run_main(cli(toy, stage, full, steps=4, save_every=2))
    run_main(cli(toy, stage, part, steps=2, save_every=2))
    middle = trainable_weights(part)
    run_main(cli(toy, stage, part, steps=4, save_every=2, resume=True))
    a, b = trainable_weights(full), trainable_weights(part)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert any(not torch.equal(a[k], middle[k]) for k in a)  # steps 3-4 moved the weights
    opt_a, opt_b = (load_safetensors(os.path.join(d, 'ckpt', 'optimizer.safetensors')) for d in (full, part))
    assert sorted(opt_a) == sorted(opt_b) and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    steps = lambda d: [(r['step'], r['reward']) for r in read_log(d) if 'reward' in r]
    assert steps(full) == steps(part)


@pytest.mark.parametrize('start, window, expected', [(0, 1, '0-0'), (1, 1, '1-1'), (5, 1, '1-1'), (1, 2, '0-1'), (-1, 0, '0-1')])
def test_u4g_sde_window(toy, start, window, expected):
    """sde_start fixes the trained window (clipped so that the last of the 3 steps stays deterministic);
    -1 draws it, and window 0 covers every step but the last."""
    out = toy.dir / f'window_{start}_{window}'
    run_main(cli(toy, 'u4g', out, steps=1, sde_start=start, sde_window=window, eval_every=100, save_every=100))
    assert [r['sde_steps'] for r in read_log(out) if 'sde_steps' in r] == [expected]


@pytest.fixture(scope='module')
def coldstart_run(toy):
    out = toy.dir / 'coldstart'
    run_main(cli(toy, 'coldstart', out, steps=16, lr=1e-3, eval_every=100, save_every=100))
    return out


def test_coldstart_lowers_its_loss(toy, coldstart_run):
    """Each step draws other images and noise, so the loss of step 16 against step 1 says little (with these
    seeds it falls even untrained). Compared instead with the same 16 steps at lr = 0, which see the very
    same images and noise (every draw is seeded by the step): training must lower the loss on them."""
    baseline = toy.dir / 'coldstart_lr0'
    run_main(cli(toy, 'coldstart', baseline, steps=16, lr=0.0, eval_every=100, save_every=100))
    trained, untrained = ([r['loss'] for r in read_log(d) if 'loss' in r] for d in (coldstart_run, baseline))
    assert len(trained) == len(untrained) == 16
    assert trained[0] == untrained[0]  # the same first batch through the same initial weights
    last, last_untrained = trained[-8:], untrained[-8:]
    assert all(a < b for a, b in zip(last, last_untrained)), (trained, untrained)
    # measured: about 1 % lower over the last 8 steps (tiny random models, lr 1e-3, 16 steps)
    assert sum(last) < 0.995 * sum(last_untrained), (trained, untrained)


def test_coldstart_trains_the_projector_in_fp32_in_a_bf16_model(toy):
    """With dtype=bfloat16 the frozen weights are bf16, but the projector trains in fp32 like the adapters:
    a bf16 weight of magnitude ~0.05 has an ulp of ~2e-4 and rounds an update of lr 1e-5 away entirely."""
    out = toy.dir / 'coldstart_bf16'
    run_main(cli(toy, 'coldstart', out, steps=1, lr=1e-5, dtype='bfloat16', eval_every=100, save_every=100))
    before = load_safetensors(os.path.join(toy.paths['llm'], 'model.safetensors'))
    after = load_safetensors(str(out / 'llm' / 'model.safetensors'))
    for k in ('projector.0.weight', 'projector.2.weight'):
        assert after[k].dtype == torch.float32, k
        moved = (after[k] - before[k].to(torch.bfloat16).float()).abs()
        assert 0 < moved.max() < 1e-4, (k, moved.max())  # moved, by about lr per step
    assert after['model.language_model.embed_tokens.weight'].dtype == torch.bfloat16  # frozen weights as loaded


def test_evaluate_reports_what_captions_get_right(toy):
    """The toy evaluation scores the captions attribute by attribute: true complete captions score 1 on
    every attribute; the same with every size swapped score 0 on size and on whole objects, 1 elsewhere."""
    enc, dit, vae, pooled = load_uae(toy.cfg, 'cpu')
    images, records = world.load_split(os.path.join(toy.paths['data_dir'], 'val'))
    scenes = [r['scene'] for r in records[:4]]
    swapped = copy.deepcopy(scenes)
    for s in swapped:
        for o in s['objects']:
            o['size'] = 'large' if o['size'] == 'small' else 'small'
    cfg = dict(toy.cfg, eval_steps=2)
    for captions, size, whole in (([world.caption(s) for s in scenes], 1.0, 1.0),
                                  ([world.caption(s) for s in swapped], 0.0, 0.0)):
        result, _ = train_rl.evaluate(cfg, enc, dit, vae, pooled, images[:4], scenes, captions)
        assert (result['caption_recall'], result['caption_size_recall']) == (whole, size), result
        assert result['caption_color_recall'] == result['caption_shape_recall'] == result['caption_cell_recall'] == 1.0


def test_saved_adapters_reproduce_the_trained_model(toy, coldstart_run):
    """out_dir/llm (trained projector) + llm_lora + dit_lora, loaded as sample.py does (lora.load_peft into
    fresh models), hold the trained weights and give back the run's final evaluation exactly."""
    with open(os.path.join(coldstart_run, 'ckpt', 'meta.json')) as f:
        cfg = json.load(f)['config']
    cfg.update(llm=str(coldstart_run / 'llm'), llm_lora=str(coldstart_run / 'llm_lora'),
               dit_lora=str(coldstart_run / 'dit_lora'))
    enc, dit, vae, pooled = load_uae(cfg, 'cpu')
    trained = trainable_weights(coldstart_run)
    loaded = {f'{prefix}.{n}': p for prefix, m in (('enc', enc), ('dit', dit)) for n, p in m.named_parameters()}
    assert any('projector' in k for k in trained) and any(k.startswith('dit.') for k in trained)
    for k, v in trained.items():
        assert torch.equal(loaded[k], v), k
    images, records = world.load_split(os.path.join(toy.paths['data_dir'], 'val'))
    n = cfg['eval_images']
    result, _ = train_rl.evaluate(cfg, enc, dit, vae, pooled, images[:n], [r['scene'] for r in records[:n]])
    first, final = (r for r in read_log(coldstart_run) if 'val_pixel' in r)
    assert final['step'] == 16 and final['val_pixel'] != first['val_pixel']  # training changed the evaluation
    for k, v in result.items():
        assert final[f'val_{k}'] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), k
    # and the adapters matter: without them the decoder draws something else
    x, t = torch.randn(1, dit.config.in_channels, dit.config.sample_size, dit.config.sample_size), torch.tensor([500.0])
    c = torch.randn(1, 5, dit.config.joint_attention_dim)
    with torch.no_grad():
        with_lora = dit(x, t, c, pooled)
        with lora_disabled(dit):
            assert (dit(x, t, c, pooled) - with_lora).abs().max() > 1e-4


# -----------------------------------------------------------------------------
# real data: a folder of images (train/ and val/), scored by the reward's embedders; the config files


@pytest.fixture(scope='module')
def image_folder(toy):
    """Toy images written as files, as a real folder would hold them: PNGs, one JPEG, one wider than tall
    (its centre is the toy image, its sides a colour that must be cropped away)."""
    from PIL import Image
    d = toy.dir / 'folder'
    images, _ = world.load_split(os.path.join(toy.paths['data_dir'], 'train'))
    for split, rows in (('train', images[:5]), ('val', images[5:8])):
        os.makedirs(d / split)
        for i, im in enumerate(rows):
            Image.fromarray(np.asarray(im)).save(d / split / f'{i}.png')
    Image.fromarray(np.asarray(images[8])).save(d / 'train' / 'x.jpg', quality=95)
    wide = np.full((world.IMAGE, 2 * world.IMAGE, 3), 255, np.uint8)
    wide[:, world.IMAGE // 2:world.IMAGE // 2 + world.IMAGE] = images[9]
    Image.fromarray(wide).save(d / 'train' / 'wide.webp', lossless=True)
    (d / 'train' / 'notes.txt').write_text('not an image: skipped')
    return SimpleNamespace(dir=d, images=images)


def test_image_folder_is_read_and_cropped(toy, image_folder):
    d = image_folder.dir
    names = [os.path.basename(f) for f in train_rl.image_files(str(d / 'train'))]
    assert names == ['0.png', '1.png', '2.png', '3.png', '4.png', 'wide.webp', 'x.jpg']
    assert np.array_equal(train_rl.square_image(str(d / 'val' / '1.png'), world.IMAGE), image_folder.images[6])
    assert np.array_equal(train_rl.square_image(str(d / 'train' / 'wide.webp'), world.IMAGE), image_folder.images[9])
    assert train_rl.square_image(str(d / 'train' / 'wide.webp'), 32).shape == (32, 32, 3)  # shortest edge 32
    n, batch, val_images, scenes = train_rl.load_data(dict(train_rl.config, data_dir=str(d), eval_images=2), 48)
    images, captions = batch([1, 5])
    assert (n, scenes, captions) == (7, None, None) and images.shape == (2, 48, 48, 3)
    assert np.array_equal(val_images, np.stack(image_folder.images[5:7]))


@pytest.mark.parametrize('stage', ['g4u', 'u4g', 'coldstart'])  # coldstart: the encoder captions them itself
def test_real_image_folder_trains_and_evaluates_by_reward(toy, image_folder, stage):
    out = toy.dir / f'folder_{stage}'
    # u4g: held-out images captioned and reconstructed one at a time
    run_main(cli(toy, stage, out, steps=2, eval_every=2, data_dir=str(image_folder.dir),
                 eval_batch=1 if stage == 'u4g' else 0))
    log = read_log(out)
    assert [r['step'] for r in log if 'reward' in r] == [1, 2]
    evals = [r for r in log if 'val_reward' in r]
    assert [r['step'] for r in evals] == [0, 2] and not any('val_object_f1' in r for r in log)
    assert all(0 < r['val_reward'] <= 1 and r['val_caption_tokens'] >= 1 for r in evals)
    assert os.path.exists(out / 'curves.png')
    if stage == 'g4u':  # the first evaluation is the untrained models': recomputed here from the files
        cfg = dict(toy.cfg, **TINY_RUN, data_dir=str(image_folder.dir))
        enc, dit, vae, pooled = load_uae(cfg, 'cpu')
        _, _, val_images, _ = train_rl.load_data(cfg, world.IMAGE)
        result, _ = train_rl.evaluate(cfg, enc, dit, vae, pooled, val_images,
                                      embedders=train_rl.load_reward(cfg, 'cpu'))
        assert result['reward'] == pytest.approx(evals[0]['val_reward'], abs=1e-6)
        assert result['caption_tokens'] == evals[0]['val_caption_tokens']


def rewards_of(monkeypatch, metrics, weights):
    """train_rl.reward on given similarities (embedders.similarities stubbed out)."""
    monkeypatch.setattr(train_rl, 'similarities', lambda names, embedders, recon, orig: {k: metrics[k] for k in names})
    return train_rl.reward(dict(reward=weights), {}, None, None, 1, 'cpu')


def test_mixed_rewards_are_zscored_and_logged_raw(monkeypatch):
    """Several metrics: advantages come from the weighted z-scores (grpo.py), the log shows the weighted mean of
    the raw similarities (the z-scores of any batch average 0)."""
    a, b = torch.tensor([0.9, 0.8, 0.7, 0.2]), torch.tensor([0.5, 0.5, 0.1, 0.3])
    mixed, log = rewards_of(monkeypatch, {'a': a, 'b': b}, {'a': 1.0, 'b': 3.0})
    z = lambda x: (x - x.mean()) / x.std(unbiased=False)
    torch.testing.assert_close(mixed, z(a) + 3 * z(b), rtol=1e-5, atol=1e-5)
    assert log['reward'] == pytest.approx(float((a.mean() + 3 * b.mean()) / 4))
    assert log['reward_a'] == pytest.approx(0.65) and log['reward_b'] == pytest.approx(0.35)
    mixed, log = rewards_of(monkeypatch, {'a': a}, {'a': 2.0})
    assert torch.equal(mixed, a) and log['reward'] == pytest.approx(0.65) and 'reward_a' not in log


def test_zero_interval_is_an_error(toy, tmp_path):
    with pytest.raises(ValueError, match="'eval_every' must be >= 1, got 0"):  # not a ZeroDivisionError at step 1
        run_main(cli(toy, 'g4u', tmp_path / 'out', eval_every=0))


def test_unreadable_image_is_named(toy, image_folder, tmp_path):
    import shutil
    d = tmp_path / 'images'
    shutil.copytree(image_folder.dir, d)
    (d / 'train' / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    with pytest.raises(ValueError, match=re.escape(str(d / 'train' / 'bad.png'))):
        train_rl.square_image(str(d / 'train' / 'bad.png'), 48)
    # the training images are read a batch at a time: with all 8 drawn in the first step, the bad one is among them
    with pytest.raises(ValueError, match=re.escape(str(d / 'train' / 'bad.png'))):
        run_main(cli(toy, 'coldstart', tmp_path / 'out', steps=1, data_dir=str(d), images_per_step=8))
    os.makedirs(d / 'empty' / 'train')
    with pytest.raises(ValueError, match='no images'):
        train_rl.image_files(str(d / 'empty' / 'train'))


@pytest.mark.parametrize('name', sorted(f for f in os.listdir(os.path.join(ROOT, 'config'))
                                        if f.startswith('uae') and f.endswith('.py')))
def test_config_files_parse(name):
    """Each real-model config file holds only keys its scripts know, with the right types (configure checks
    both); the paths are placeholders, nothing is loaded."""
    import bench
    import sample
    from common import configure, read_config_file
    path = os.path.join(ROOT, 'config', name)
    values = read_config_file(path)
    assert all(v.startswith('/path/to/') for k, v in values.items() if k in ('llm', 'dit', 'vae', 'pooled'))
    if name == 'uae.py':  # sample.py and bench.py
        configure(copy.deepcopy(sample.config), [path])
        configure(copy.deepcopy(bench.UAE), [path])
    else:
        cfg = configure(copy.deepcopy(train_rl.config), [path])
        assert name == f"uae_{cfg['stage']}.py"
        assert cfg['dtype'] == 'bfloat16' and cfg['grad_checkpointing'] == (cfg['stage'] != 'g4u')  # g4u: no DiT backward
        assert set(cfg['reward']) <= set(cfg['reward_paths']) | {'pixel', 'scene'}
