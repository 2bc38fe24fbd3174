"""train_sft.py on a tiny prepared world with tiny architectures: the loss goes down, a killed and
resumed run ends with exactly the weights of an uninterrupted one, checkpoints and exports round-trip,
a corrupt checkpoint is named, and 2-rank DDP / FSDP2 (gloo on CPU) give the losses of one process.

Single-process runs call train_sft.main() in this process (a fresh copy of its config each time);
the 2-rank runs go through torchrun."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model_decoder as D  # noqa: E402
import train_sft  # noqa: E402
from data.shapes import prepare, world  # noqa: E402
from images import to_pil, to_pixels, to_uint8  # noqa: E402
from model_encoder import Encoder, EncoderConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEFAULTS = copy.deepcopy(train_sft.config)  # main() updates the module's config in place


def tiny_archs(directory):
    """(encoder arch json, decoder arch json): config/toy_*.json with fewer, narrower layers."""
    with open(os.path.join(ROOT, 'config/toy_encoder.json')) as f:
        enc = json.load(f)
    enc['text_config'].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1)
    enc['text_config']['rope_parameters']['mrope_section'] = [4, 6, 6]  # sums to head_dim / 2 = 16
    enc['vision_config'].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                fullatt_block_indexes=[0])
    enc.update(projector_hidden_size=128, projector_out_size=64)  # whiten_projector needs >= (2, 1) x 64
    with open(os.path.join(ROOT, 'config/toy_decoder.json')) as f:
        dec = json.load(f)
    dec.update(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
               caption_projection_dim=32, pooled_projection_dim=16)
    paths = os.path.join(directory, 'encoder.json'), os.path.join(directory, 'decoder.json')
    for path, arch in zip(paths, (enc, dec)):
        with open(path, 'w') as f:
            json.dump(arch, f)
    return paths


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A tiny prepared world, tiny architectures and a tiny random encoder (the decoder's frozen LLM)."""
    d = tmp_path_factory.mktemp('sft')
    prepare.main([f'--out={d}/data', '--n_train=256', '--n_val=32', '--n_test=8', '--tokenizer='])
    enc_arch, dec_arch = tiny_archs(d)
    with open(enc_arch) as f:
        torch.manual_seed(0)
        enc = Encoder(EncoderConfig.from_hf(json.load(f)), Tokenizer.from_pretrained(os.path.join(ROOT, 'data/shapes')))
    enc.min_pixels = enc.max_pixels = world.IMAGE * world.IMAGE
    enc.save_pretrained(d / 'llm')
    return dict(dir=d, data=str(d / 'data'), enc_arch=enc_arch, dec_arch=dec_arch, llm=str(d / 'llm'))


def args(toy, model, out_dir, **kw):
    """Tiny-run overrides: evaluation only at the last step, on 2 images with a 2-step sampler."""
    a = dict(model=model, data_dir=toy['data'], out_dir=str(out_dir), max_steps=4, batch_size=4, warmup=1,
             log_every=1, eval_every=10_000, save_every=10_000, eval_images=2, sample_steps=2)
    if model == 'encoder':
        a.update(arch=toy['enc_arch'])
    else:
        a.update(arch=toy['dec_arch'], encoder=toy['llm'])
    a.update(kw)
    return a


def run_sft(overrides):
    """train_sft.main() with --key=value arguments and a fresh config; returns the resolved config."""
    old_argv, old_config = sys.argv, train_sft.config
    sys.argv = ['train_sft.py'] + [f'--{k}={v}' for k, v in overrides.items()]
    train_sft.config = copy.deepcopy(DEFAULTS)
    try:
        train_sft.main()
        return train_sft.config
    finally:
        sys.argv, train_sft.config = old_argv, old_config


def logged_losses(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the scripts' default paths (tokenizer, configs) are relative to the repo


@pytest.fixture(scope='module')
def trained(toy, monkeypatch_module):
    """One short run per model, with the live module it trained (caught as it is exported) and that
    module's initial weights (caught as it is wrapped for training)."""
    runs = {}
    real_export, real_wrap, real_loss = train_sft.export, train_sft.wrap, train_sft.decoder_loss
    # the decoder at shift 12 (the default is 3) and no low-noise rows: a few steps can lower the loss at high
    # noise, while at low noise it is mostly the part no model removes (the noise, seen through a nearly clean latent)
    for model, steps, batch, lr, extra in (('encoder', 8, 4, 1e-2, {}),
                                           ('decoder', 24, 8, 3e-3, dict(train_shift=12.0, low_sigma_share=0.0))):
        caught = {}

        def spy_wrap(raw, *rest):
            caught['init'] = copy.deepcopy(raw.state_dict())
            return real_wrap(raw, *rest)

        def spy_export(cfg, kind, state, raw, *rest):
            caught['raw'] = raw
            return real_export(cfg, kind, state, raw, *rest)
        def spy_loss(*a, **k):
            caught['weight'], caught['codec'] = a[-1], a[3]  # decoder_loss's last argument: the channel weights
            return real_loss(*a, **k)
        monkeypatch_module.setattr(train_sft, 'wrap', spy_wrap)
        monkeypatch_module.setattr(train_sft, 'export', spy_export)
        monkeypatch_module.setattr(train_sft, 'decoder_loss', spy_loss)
        out = toy['dir'] / f'trained_{model}'
        with torch.random.fork_rng():
            cfg = run_sft(args(toy, model, out, max_steps=steps, batch_size=batch, lr=lr, min_lr=lr, **extra))
        runs[model] = dict(out=str(out), cfg=copy.deepcopy(cfg), raw=caught['raw'], init=caught['init'],
                           steps=steps, batch=batch, lr=lr, loss_weight=caught.get('weight'), codec=caught.get('codec'))
    monkeypatch_module.undo()
    return runs


@pytest.fixture(scope='module')
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@torch.no_grad()
def heldout_loss(toy, run, model, weights):
    """The training loss on 16 validation scenes with fixed draws, for `weights` loaded into the run's module."""
    raw = copy.deepcopy(run['raw']).eval()
    raw.load_state_dict(weights)
    images, records = world.load_split(os.path.join(toy['data'], 'val'))
    images, captions = images[:16], [r['captions']['complete'] for r in records[:16]]
    if model == 'encoder':
        n_tokens = raw.enc.caption_tokens(captions)[1].sum()
        return (train_sft.encoder_nll(raw, raw.enc, images, captions) / n_tokens).item()
    enc = Encoder.from_pretrained(toy['llm'])
    pooled = load_file(os.path.join(run['out'], 'pooled.safetensors'))['pooled'].view(1, -1)
    codec = D.LinearCodec.load(os.path.join(run['out'], 'codec.safetensors'))
    c, g = raw.dit.config, torch.Generator().manual_seed(0)
    sigma = D.shift_sigmas(torch.linspace(0.05, 0.95, 16), run['cfg']['train_shift'])  # as trained
    noise = torch.randn(16, c.in_channels, c.sample_size, c.sample_size, generator=g)
    return train_sft.decoder_loss(raw, enc, pooled, codec, images, captions, sigma, noise).item()

# -----------------------------------------------------------------------------
# 1. learning


@pytest.mark.parametrize('model', ['encoder', 'decoder'])
def test_a_few_steps_lower_the_loss(trained, toy, model):
    run = trained[model]
    losses = logged_losses(run['out'])
    n = run['steps']
    assert sorted(losses) == list(range(1, n + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (n - 2, n - 1, n)])
    assert last < first, (model, losses)  # the logged training loss (each step its own batch and noise)
    before = heldout_loss(toy, run, model, run['init'])
    after = heldout_loss(toy, run, model, run['raw'].state_dict())
    # measured: encoder 6.22 -> 3.75 (logged 5.59 -> 3.43); the decoder on its training noise levels
    assert after < 0.95 * before, (model, before, after)


def test_decoder_loss_weighs_latent_channels_by_codec_scale(trained):
    """latent_weight_power (default 1): the decoder's loss weighs channel c by scale_c / mean(scale)."""
    run = trained['decoder']
    assert run['cfg']['latent_weight_power'] == 1.0
    scale = run['codec'].scale.float()
    assert torch.allclose(run['loss_weight'].cpu(), scale / scale.mean())


def test_low_sigma_share_trains_the_samplers_last_noise_levels():
    """low_sigma_share: that share of the batch (its first rows) at noise levels uniform on [0, low_sigma_max],
    the rest SD3's shifted logit-normal draws as without it; 0 is exactly SD3's draws (the default: 0.125)."""
    cfg = dict(train_sft.config, train_shift=3.0, low_sigma_max=0.3)
    draw = lambda share: train_sft.train_sigmas(dict(cfg, low_sigma_share=share), 1000, torch.Generator().manual_seed(0))
    sd3 = D.sample_sigmas_train(1000, 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(draw(0.0), sd3)
    mixed = draw(0.25)
    assert torch.equal(mixed[250:], sd3[250:])
    low = mixed[:250]
    assert low.min() >= 0 and low.max() < 0.3 and abs(low.mean().item() - 0.15) < 0.02  # uniform on [0, 0.3]
    assert (sd3 < 0.3).float().mean() < 0.05  # what the share adds: SD3's draws rarely go there


def test_decoder_projector_trains_at_projector_lr(trained):
    """Decoder SFT trains UAE's projector at projector_lr x lr; the default 0 keeps it at its initialisation
    (a projector trained at the full rate washed shape out of the toy decoder's context: see train_sft)."""
    run = trained['decoder']
    assert run['cfg']['projector_lr'] == 0.0
    now = run['raw'].state_dict()
    moved = {k for k in now if not torch.equal(now[k], run['init'][k])}
    assert any(k.startswith('dit.') for k in moved)
    assert not any(k.startswith('projector.') for k in moved), sorted(moved)


def test_decoder_projector_whitens_what_it_reads(trained, toy):
    """From scratch, the frozen projector is fitted to whiten the LLM states it reads (projector_init='whiten'):
    over the tokens of the captions it was fitted to (the first training scenes' complete captions) the
    projected states have mean 0 and covariance eigenvalues l / (l + 0.01 mean(l)) of the states' own."""
    run = trained['decoder']
    assert run['cfg']['projector_init'] == 'whiten'
    enc = Encoder.from_pretrained(toy['llm'])
    enc.projector.load_state_dict({k[len('projector.'):]: v for k, v in run['init'].items() if k.startswith('projector.')})
    _, records = world.load_split(os.path.join(toy['data'], 'train'))
    captions = [r['captions']['complete'] for r in records]
    with torch.no_grad():
        h = train_sft.token_states(enc, captions)  # (tokens, 64)
        z = enc.project(h)  # (tokens, 64)
    raw = torch.linalg.eigvalsh(torch.cov(h.T.double()))
    assert raw.max() / raw.median() > 10  # what there was to whiten
    got = torch.linalg.eigvalsh(torch.cov(z.T.double()))
    assert torch.allclose(got, raw / (raw + 0.01 * raw.mean()), rtol=1e-3, atol=1e-4), (got, raw)
    assert z.mean(0).abs().max() < 1e-3


def test_decoder_from_scratch_starts_with_distinct_cells(trained):
    """A decoder trained from scratch gets the sin-cos table at base_size pos_base (48: the toy's cells 16
    units apart, not diffusers' 1) and its patch embedding at patch_init (0.25) x PyTorch's init; the table
    is a buffer of the checkpoint, so loading the exported decoder gives it back, not the config's."""
    run, init = trained['decoder'], trained['decoder']['init']
    table, w = init['dit.pos_embed.pos_embed'], init['dit.pos_embed.proj.weight']
    dim, grid = table.shape[-1], round(table.shape[1] ** 0.5)
    assert torch.equal(table[0], D.sincos_pos_embed(dim, grid, 48))
    assert (run['cfg']['pos_base'], run['cfg']['patch_init']) == (48, 0.25)
    want = 0.25 / (3 * w[0].numel()) ** 0.5  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)), std bound/sqrt(3)
    assert abs(w.std().item() / want - 1) < 0.15, (w.std().item(), want)
    loaded = D.MMDiT.from_pretrained(os.path.join(run['out'], 'dit'))
    assert torch.equal(loaded.pos_embed.pos_embed[0], table[0])
    assert not torch.equal(table[0], D.sincos_pos_embed(dim, grid, loaded.config.sample_size // loaded.config.patch_size))


# -----------------------------------------------------------------------------
# 2. resume


class Killed(Exception):
    pass


@pytest.mark.parametrize('model', ['encoder', 'decoder'])
def test_killed_and_resumed_run_ends_with_the_same_weights(toy, tmp_path, monkeypatch, model):
    N = 4
    whole = args(toy, model, tmp_path / 'whole', max_steps=N, save_every=N // 2, caption_dropout=0.5)
    with torch.random.fork_rng():
        run_sft(whole)

    real_save = train_sft.save_checkpoint

    def save_then_die(directory, weights, meta):  # the process dies right after the step-N/2 checkpoint
        real_save(directory, weights, meta)
        if meta['step'] == N // 2:
            raise Killed
    monkeypatch.setattr(train_sft, 'save_checkpoint', save_then_die)
    parts = dict(whole, out_dir=str(tmp_path / 'parts'))
    with pytest.raises(Killed), torch.random.fork_rng():
        run_sft(parts)
    assert json.load(open(tmp_path / 'parts/ckpt/meta.json'))['step'] == N // 2
    monkeypatch.setattr(train_sft, 'save_checkpoint', real_save)
    real_fit = train_sft.D.LinearCodec.fit

    def flipped_fit(*a, **k):  # an SVD's signs may differ on another machine or thread count
        codec = real_fit(*a, **k)
        codec.basis.neg_()
        return codec
    monkeypatch.setattr(train_sft.D.LinearCodec, 'fit', flipped_fit)  # the checkpoint's codec must win
    with torch.random.fork_rng():
        run_sft(dict(parts, resume=True))

    names = ['model', 'optimizer'] + (['ema', 'pooled', 'codec'] if model == 'decoder' else [])
    for name in names:
        a = load_file(tmp_path / f'whole/ckpt/{name}.safetensors')
        b = load_file(tmp_path / f'parts/ckpt/{name}.safetensors')
        assert a.keys() == b.keys(), name
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f'{name}: {unequal[:5]}'
    meta_a, meta_b = (json.load(open(tmp_path / f'{r}/ckpt/meta.json')) for r in ('whole', 'parts'))
    assert meta_a['step'] == meta_b['step'] == N and meta_a['optimizer'] == meta_b['optimizer']
    assert logged_losses(tmp_path / 'whole') == logged_losses(tmp_path / 'parts')  # steps 3, 4 logged after resuming

# -----------------------------------------------------------------------------
# 3. checkpoints and exports


@pytest.mark.parametrize('model', ['encoder', 'decoder'])
def test_checkpoint_directory(trained, model):
    run = trained[model]
    ckpt = os.path.join(run['out'], 'ckpt')
    expected = {'meta.json', 'model.safetensors', 'optimizer.safetensors'}
    if model == 'decoder':
        expected |= {'ema.safetensors', 'pooled.safetensors', 'codec.safetensors'}
    assert set(os.listdir(ckpt)) == expected
    meta = json.load(open(os.path.join(ckpt, 'meta.json')))
    assert meta['step'] == run['steps'] and meta['data_position'] == run['steps'] * run['batch']
    assert meta['config'] == json.loads(json.dumps(run['cfg']))  # the resolved config, every key
    assert set(meta['config']) == set(DEFAULTS) and meta['config']['lr'] == run['lr']
    trainable = {n for n, p in run['raw'].named_parameters() if p.requires_grad}
    model_sd = load_file(os.path.join(ckpt, 'model.safetensors'))
    assert trainable <= set(model_sd)
    opt = load_file(os.path.join(ckpt, 'optimizer.safetensors'))
    assert {k.rsplit(':', 1)[0] for k in opt} == trainable
    assert {k.rsplit(':', 1)[1] for k in opt} == {'exp_avg', 'exp_avg_sq', 'step'}
    if model == 'decoder':
        assert set(load_file(os.path.join(ckpt, 'ema.safetensors'))) == trainable


def test_encoder_export_round_trip(trained, toy):
    run = trained['encoder']
    live = run['raw'].enc.eval()
    loaded = Encoder.from_pretrained(os.path.join(run['out'], 'llm')).eval()
    assert (loaded.min_pixels, loaded.max_pixels) == (live.min_pixels, live.max_pixels) == (48 * 48, 48 * 48)
    images, records = world.load_split(os.path.join(toy['data'], 'val'))
    pil = to_pil(images[:3])
    caps = [r['captions']['complete'] for r in records[:3]]
    with torch.no_grad():
        outs = [enc.token_logprobs(enc.caption_inputs(pil), *enc.caption_tokens(caps)) for enc in (live, loaded)]
    assert torch.equal(*outs)
    ckpt = load_file(os.path.join(run['out'], 'ckpt/model.safetensors'))
    assert all(torch.equal(v, ckpt['enc.' + k]) for k, v in loaded.state_dict().items())


def test_decoder_export_round_trip(trained, toy):
    """dit/ + llm/ (projector) + pooled.safetensors hold the EMA weights: loaded, they compute what the
    trained module computes with its EMA weights swapped in; the LLM is the frozen encoder, unchanged;
    codec.safetensors holds the latent codec."""
    run = trained['decoder']
    raw = copy.deepcopy(run['raw']).eval()
    ema = load_file(os.path.join(run['out'], 'ckpt/ema.safetensors'))
    dit = D.MMDiT.from_pretrained(os.path.join(run['out'], 'dit')).eval()
    llm = Encoder.from_pretrained(os.path.join(run['out'], 'llm')).eval()
    pooled = load_file(os.path.join(run['out'], 'pooled.safetensors'))['pooled']
    assert torch.equal(pooled, load_file(os.path.join(run['out'], 'ckpt/pooled.safetensors'))['pooled'])
    live = dict(raw.named_parameters())
    assert not torch.equal(dit.state_dict()['proj_out.weight'], live['dit.proj_out.weight'])  # EMA, not live
    missing, unexpected = raw.load_state_dict(ema, strict=False)
    assert missing == ['dit.pos_embed.pos_embed'] and unexpected == []  # EMA covers the trainable weights

    frozen = Encoder.from_pretrained(toy['llm'])
    new_sd, old_sd = llm.state_dict(), frozen.state_dict()
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in old_sd if not k.startswith('projector.'))
    g = torch.Generator().manual_seed(0)
    c = dit.config
    x, t = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g), torch.tensor([300.0, 800.0])
    with torch.no_grad():
        hidden = llm.prompt_hidden(['a red circle in the top left.', ''])
        want = raw(x, t, hidden, pooled.expand(2, -1))
        got = dit(x, t, llm.projector(hidden), pooled.expand(2, -1))
    assert torch.equal(want, got)
    # the latent codec ships with them and encodes the world's images (nearly) losslessly
    codec = D.LinearCodec.load(os.path.join(run['out'], 'codec.safetensors'))
    images, _ = world.load_split(os.path.join(toy['data'], 'val'))
    back = to_uint8(D.decode(codec, D.encode(codec, to_pixels(images[:8]))))
    assert np.abs(back.astype(int) - images[:8]).max() <= 2
    assert os.path.exists(os.path.join(run['out'], f"samples_{run['steps']:06d}.png"))


def test_unknown_model_is_an_error(toy, tmp_path):
    with pytest.raises(ValueError, match="--model must be 'encoder' or 'decoder', got 'vae'"):
        run_sft(dict(args(toy, 'encoder', tmp_path), model='vae'))


def test_zero_interval_is_an_error(toy, tmp_path):
    with pytest.raises(ValueError, match="'eval_every' must be >= 1, got 0"):  # not a ZeroDivisionError at step 1
        run_sft(dict(args(toy, 'encoder', tmp_path), eval_every=0))


def test_fewer_scenes_than_a_batch_is_an_error(toy, tmp_path):
    with pytest.raises(ValueError, match=r'256 training scenes, fewer than batch_size=512'):
        run_sft(dict(args(toy, 'encoder', tmp_path), batch_size=512))


def test_corrupt_or_missing_checkpoint_on_resume(trained, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(trained['decoder']['out'], out)
    path = out / 'ckpt/optimizer.safetensors'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # truncated, as by a full disk
    kw = dict(trained['decoder']['cfg'], out_dir=str(out), resume=True, max_steps=30)
    with pytest.raises(ValueError, match='optimizer.safetensors'):
        run_sft(kw)
    shutil.rmtree(out / 'ckpt')
    with pytest.raises(FileNotFoundError, match='ckpt'):
        run_sft(kw)

# -----------------------------------------------------------------------------
# 4. two ranks (torchrun, gloo on CPU): DDP and FSDP2 give the losses of one process


RANK2 = {'decoder_ddp': ('decoder', False), 'decoder_fsdp': ('decoder', True), 'encoder_fsdp': ('encoder', True)}


@pytest.fixture(scope='module')
def two_ranks(toy):
    """The 2-rank runs launched together (the machine is shared), then the 1-process references."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = {}
    for name, (model, fsdp) in RANK2.items():
        kw = args(toy, model, toy['dir'] / f'rank2_{name}', max_steps=3, fsdp=fsdp)
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               'train_sft.py'] + [f'--{k}={v}' for k, v in kw.items()]
        procs[name] = (kw['out_dir'], subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT, text=True))
    single = {}
    for model in ('decoder', 'encoder'):
        single[model] = str(toy['dir'] / f'rank1_{model}')
        with torch.random.fork_rng():
            run_sft(args(toy, model, single[model], max_steps=3))
    results = {}
    for name, (out, proc) in procs.items():
        text, _ = proc.communicate(timeout=600)
        results[name] = (out, proc.returncode, text)
    return single, results


@pytest.mark.parametrize('name', list(RANK2))
def test_two_ranks_match_one_process(two_ranks, name):
    model = RANK2[name][0]
    single, results = two_ranks
    single = single[model]
    out, code, text = results[name]
    assert code == 0, text[-3000:]
    assert 'global batch 4 = 2 x 1 x 2' in text
    one, two = logged_losses(single), logged_losses(out)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    with open(os.path.join(out, 'log.jsonl')) as f:  # the evaluation ran on the 2-rank (sharded) model too
        val = [row for row in map(json.loads, f) if 'val_object_f1' in row or 'val_object_recall' in row]
    assert val
    if model == 'decoder':  # with the ghosts and halos it leaves (world.empty_cell_residual, world.halo_residual)
        assert all(0 < row['val_ghosts'] < 1 and 0 < row['val_halos'] < 1 for row in val), val
    rel = max(abs(one[s] - two[s]) / one[s] for s in one)
    assert rel < 1e-5, (one, two)  # measured: <= 1e-7 (summation order only)
    for f in ('model', 'optimizer') + (('ema',) if model == 'decoder' else ()):
        a, b = (load_file(os.path.join(d, f'ckpt/{f}.safetensors')) for d in (single, out))
        assert a.keys() == b.keys(), f  # plain parameter names: no DDP 'module.' or FSDP wrapping
        for k in a:  # Adam's first steps amplify rounding in near-zero gradients (lr 1e-3); measured <= 1.1e-5
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-5, msg=lambda m: f'{f} {k}: {m}')
    if model == 'decoder':
        dit = D.MMDiT.from_pretrained(os.path.join(out, 'dit'))  # exported by rank 0 after an all-rank gather
        ema = load_file(os.path.join(out, 'ckpt/ema.safetensors'))
        assert all(torch.equal(v, ema['dit.' + k]) for k, v in dit.state_dict().items() if 'dit.' + k in ema)


@pytest.mark.parametrize('model', ['encoder', 'decoder'])
def test_grad_accum_matches_one_micro_batch(toy, tmp_path, model):
    losses = []
    for accum in (1, 2):
        with torch.random.fork_rng():
            run_sft(args(toy, model, tmp_path / f'accum{accum}', max_steps=3, grad_accum=accum))
        losses.append(logged_losses(tmp_path / f'accum{accum}'))
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3]
    assert max(abs(losses[0][s] - losses[1][s]) / losses[0][s] for s in losses[0]) < 1e-6, losses
