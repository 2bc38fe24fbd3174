"""Nothing lost, nothing silently wrong: a kill at any instant of a checkpoint save leaves the newest
complete checkpoint resumable; resuming checks every tensor's name, shape and dtype; a new run refuses an
earlier run's folder; NaN/inf rewards, losses and weights are skipped or refused, never trained on or
saved; integer weights are refused; a user's mistake reads as one line, --help lists every key.

Kills are driven to the exact instant: a filesystem call of the save raises (in this process) or calls
os._exit (in a forked child) just before it would happen, not timed with sleeps."""
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint  # noqa: E402
import common  # noqa: E402
import grpo  # noqa: E402
import model_decoder as D  # noqa: E402
import pipeline  # noqa: E402
import sample  # noqa: E402
import train_rl  # noqa: E402
import train_sft  # noqa: E402
from common import configure, save_safetensors  # noqa: E402
from data.shapes import world  # noqa: E402
from lora import apply_lora, load_peft, save_peft  # noqa: E402
from model_encoder import Encoder, sample_logits  # noqa: E402
from test_sft import args, run_sft, toy  # noqa: E402,F401  (toy: the tiny world, architectures and LLM)

pytestmark = pytest.mark.usefixtures('one_thread')
LLM_LORA_TARGETS = train_rl.config['llm_lora_targets']


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


class Killed(BaseException):  # not an Exception: no `except Exception` on the way may catch it
    pass


# -----------------------------------------------------------------------------
# 2. a kill at any instant of a save


def weights_at(step):
    return dict(model={'w': torch.full((3,), float(step))}, optimizer={'w:step': torch.tensor(float(step))})


def meta_at(step):
    return dict(step=step, optimizer=dict(param_groups=[], scalars={}))


def kill_before(monkeypatch, k, saving, written):
    """Raise Killed just before the k-th filesystem change (a rename, deletion, mkdir or weights file);
    k = 0: never. Records in `written` the step whose meta.json lands (the moment a checkpoint is complete)."""
    count = [0]

    def wrap(fn):
        def change(*a, **kw):
            count[0] += 1
            if count[0] == k:
                raise Killed
            out = fn(*a, **kw)
            if fn is real_replace and str(a[1]).endswith('meta.json'):
                written.append(saving[0])
            return out
        return change
    real_replace = os.replace
    for name in ('replace', 'remove', 'unlink', 'rmdir', 'makedirs'):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(shutil, 'rmtree', wrap(shutil.rmtree))
    monkeypatch.setattr(common, 'save_file', wrap(common.save_file))
    return count


def test_a_kill_at_any_instant_of_a_save_loses_nothing(tmp_path, monkeypatch):
    """Kill the save of step 2 before each of its filesystem changes, then the next save (which first
    finishes the interrupted one) before each of its own: whatever happened, the newest checkpoint whose
    meta.json was written is found and loads with its own weights, and a clean save leaves only ckpt/."""
    monkeypatch.setattr(os, 'fsync', lambda fd: None)  # durability is not what is tested here: faster
    d = str(tmp_path / 'ckpt')

    def saves(k2, k3):
        shutil.rmtree(tmp_path)
        os.makedirs(tmp_path)
        checkpoint.save_checkpoint(d, weights_at(1), meta_at(1))
        saving, written, counts = [0], [1], []
        with monkeypatch.context() as m:
            for step, k in ((2, k2), (3, k3)):
                saving[0] = step
                counts.append(kill_before(m, k, saving, written))
                try:
                    checkpoint.save_checkpoint(d, weights_at(step), meta_at(step))
                except Killed:
                    pass
                m.undo()
                weights, meta, path = checkpoint.load_checkpoint(d, ['model', 'optimizer'])
                assert meta['step'] == written[-1], (k2, k3, path, written)
                assert torch.equal(weights['model']['w'], torch.full((3,), float(meta['step'])))
        checkpoint.save_checkpoint(d, weights_at(4), meta_at(4))
        assert sorted(os.listdir(tmp_path)) == ['ckpt'], (k2, k3)
        assert checkpoint.load_checkpoint(d, ['model', 'optimizer'])[1]['step'] == 4
        return [c[0] for c in counts]

    n2, n3 = saves(0, 0)  # the filesystem changes of a save over an existing checkpoint
    assert n2 == n3 >= 8
    for k2 in range(1, n2 + 1):
        n_next = saves(k2, 0)[1]  # the next save does more: it finishes the killed one first
        for k3 in range(1, n_next - n2 + 2):  # a kill while finishing it (the rest is a save as above)
            saves(k2, k3)


def test_a_real_kill_between_the_two_renames(tmp_path):
    """The issue's case in a real process killed (os._exit: no cleanup, no finally) between ckpt -> ckpt.old
    and ckpt.tmp -> ckpt: the run resumes from step 2, a new run refuses the folder, files are not 0600."""
    d = str(tmp_path / 'ckpt')
    pid = os.fork()  # a child with everything imported: no interpreter start-up
    if pid == 0:
        checkpoint.save_checkpoint(d, weights_at(1), meta_at(1))
        real = os.replace

        def replace(src, dst):
            if src == d + '.tmp':  # ckpt is ckpt.old by now, the complete new checkpoint still ckpt.tmp
                os._exit(9)
            real(src, dst)
        os.replace = replace
        checkpoint.save_checkpoint(d, weights_at(2), meta_at(2))
        os._exit(0)
    assert os.waitpid(pid, 0)[1] >> 8 == 9
    assert sorted(os.listdir(tmp_path)) == ['ckpt.old', 'ckpt.tmp']
    weights, meta, path = checkpoint.load_checkpoint(d, ['model', 'optimizer'])
    assert (meta['step'], path) == (2, d + '.tmp') and torch.equal(weights['model']['w'], torch.full((3,), 2.0))
    checkpoint.check_run_dir(str(tmp_path), resume=True)
    with pytest.raises(ValueError, match=r'holds an earlier run \(ckpt.tmp, ckpt.old\): continue it with --resume'):
        checkpoint.check_run_dir(str(tmp_path), resume=False)
    umask = os.umask(0)
    os.umask(umask)
    for f in ('model.safetensors', 'meta.json'):
        assert os.stat(os.path.join(d + '.tmp', f)).st_mode & 0o777 == 0o666 & ~umask, f


# -----------------------------------------------------------------------------
# SFT end to end: kill between the renames, strict resume, log rows, non-finite steps


@pytest.fixture(scope='module')
def decoder_run(toy, tmp_path_factory):
    """A 2-step decoder SFT run with a checkpoint at step 2 (EMA, pooled, codec): the strict-resume cases
    are edits of copies of it."""
    out = tmp_path_factory.mktemp('rel') / 'decoder'
    with torch.random.fork_rng():
        cfg = run_sft(args(toy, 'decoder', out, max_steps=2, save_every=2))
    return dict(out=out, cfg=copy.deepcopy(cfg))


def test_sft_killed_between_the_renames_resumes_exactly(toy, tmp_path, monkeypatch):
    whole = args(toy, 'encoder', tmp_path / 'whole', max_steps=3, save_every=1)
    with torch.random.fork_rng():
        run_sft(whole)
    parts = dict(whole, out_dir=str(tmp_path / 'parts'))
    real_replace = os.replace

    def replace(src, dst):
        if src.endswith('ckpt.tmp'):
            with open(os.path.join(src, 'meta.json')) as f:
                if json.load(f)['step'] == 2:
                    raise Killed  # the step-2 save dies with ckpt.old (step 1) and a complete ckpt.tmp (step 2)
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(Killed), torch.random.fork_rng():
        run_sft(parts)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert {'ckpt.old', 'ckpt.tmp'} <= set(os.listdir(tmp_path / 'parts')) and 'ckpt' not in os.listdir(tmp_path / 'parts')
    with pytest.raises(ValueError, match='earlier run'):  # a new run would delete both
        run_sft(parts)
    with torch.random.fork_rng():
        run_sft(dict(parts, resume=True))
    for name in ('model', 'optimizer'):
        a, b = (load_file(tmp_path / f'{r}/ckpt/{name}.safetensors') for r in ('whole', 'parts'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(os.listdir(tmp_path / 'parts')) == sorted(os.listdir(tmp_path / 'whole'))  # no .tmp / .old left


def test_resume_truncates_the_log_to_the_checkpoint(toy, tmp_path, monkeypatch):
    """Killed during step 4 with its checkpoint at step 2: steps 3 and 4 are logged once after resuming."""
    kw = args(toy, 'encoder', tmp_path, max_steps=4, save_every=2)
    real = train_sft.batch_indices

    def die_at_step_4(step, *a):
        if step == 3:
            raise Killed
        return real(step, *a)
    monkeypatch.setattr(train_sft, 'batch_indices', die_at_step_4)
    with pytest.raises(Killed), torch.random.fork_rng():
        run_sft(kw)
    monkeypatch.setattr(train_sft, 'batch_indices', real)
    with torch.random.fork_rng():
        run_sft(dict(kw, resume=True))
    rows = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]


def corrupt(path, key, value):
    state = load_file(path)
    if value is None:
        del state[key]
    else:
        state[key] = value
    save_file(state, path)


def test_resume_checks_every_tensor(decoder_run, tmp_path):
    """Damage in every file of the checkpoint: one error names each file and key, before any copy."""
    out = tmp_path / 'run'
    shutil.copytree(decoder_run['out'], out)
    ckpt = out / 'ckpt'
    model = load_file(ckpt / 'model.safetensors')
    corrupt(ckpt / 'model.safetensors', 'dit.proj_out.bias', None)  # would keep its fresh initialisation
    corrupt(ckpt / 'model.safetensors', 'dit.proj_out.weight', model['dit.proj_out.weight'].half())  # upcast
    corrupt(ckpt / 'optimizer.safetensors', 'dit.proj_out.bias:exp_avg', None)  # would restart at zero
    corrupt(ckpt / 'optimizer.safetensors', 'exp_avg', torch.zeros(1))  # "not enough values to unpack"
    corrupt(ckpt / 'ema.safetensors', 'dit.proj_out.bias', torch.zeros(1))  # copy_ would broadcast it
    corrupt(ckpt / 'ema.safetensors', 'dit.proj_out.weight', None)  # a bare KeyError
    corrupt(ckpt / 'pooled.safetensors', 'pooled', torch.zeros(3))
    with pytest.raises(ValueError) as e:
        run_sft(dict(decoder_run['cfg'], out_dir=str(out), resume=True, max_steps=3))
    message = str(e.value)
    assert message.startswith(f'cannot resume from {ckpt}: ') and '\n' not in message, message
    for part in ('model.safetensors: missing keys: dit.proj_out.bias;',
                 'wrong dtypes: dit.proj_out.weight: expected float32, got float16',
                 'optimizer.safetensors: missing keys: dit.proj_out.bias:exp_avg; unexpected keys: exp_avg',
                 'ema.safetensors: missing keys: dit.proj_out.weight; wrong shapes: dit.proj_out.bias: expected (',
                 'pooled.safetensors: wrong shapes: pooled: expected (16,), got (3,)'):
        assert part in message, (part, message)


def test_resume_refuses_a_missing_file_or_a_cut_meta(decoder_run, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(decoder_run['out'], out)
    kw = dict(decoder_run['cfg'], out_dir=str(out), resume=True, max_steps=3)
    meta = out / 'ckpt' / 'meta.json'
    text = meta.read_text()
    meta.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=f'{meta} is not valid JSON'):
        run_sft(kw)
    meta.write_text(text)
    os.remove(out / 'ckpt' / 'ema.safetensors')
    with pytest.raises(ValueError, match=r'ckpt: missing ema.safetensors'):
        run_sft(kw)
    with pytest.raises(ValueError, match=r'unexpected ema.safetensors'):  # the other way round: EMA off now
        shutil.copy(decoder_run['out'] / 'ckpt' / 'ema.safetensors', out / 'ckpt')
        run_sft(dict(kw, ema=0.0))


def test_a_nan_loss_skips_the_update(toy, tmp_path, monkeypatch):
    """Step 2's loss is NaN: its update is skipped and counted, the weights stay finite, the run goes on;
    NaN at every step stops the run after max_nonfinite steps in a row."""
    real = train_sft.encoder_nll
    nan_at = {2}
    calls = [0]

    def nll(*a):
        calls[0] += 1
        loss = real(*a)
        return loss * math.nan if calls[0] in nan_at else loss
    monkeypatch.setattr(train_sft, 'encoder_nll', nll)
    kw = args(toy, 'encoder', tmp_path / 'one', max_steps=3, lm_weight=0.0)
    with torch.random.fork_rng():
        run_sft(kw)
    rows = [json.loads(line) for line in open(tmp_path / 'one' / 'log.jsonl')]
    assert [r['skipped_steps'] for r in rows if 'loss' in r] == [0, 1, 1]
    weights = load_file(tmp_path / 'one' / 'ckpt' / 'model.safetensors')
    assert all(bool(v.isfinite().all()) for v in weights.values())
    assert json.load(open(tmp_path / 'one' / 'ckpt' / 'meta.json'))['skipped_steps'] == 1
    nan_at.update(range(100))
    with pytest.raises(FloatingPointError, match='2 steps in a row with a non-finite loss or gradient'):
        run_sft(dict(kw, out_dir=str(tmp_path / 'all'), max_nonfinite=2))


# -----------------------------------------------------------------------------
# 3, 7: refused before anything loads


@pytest.fixture
def nothing_loads(monkeypatch):
    def load(*a, **k):
        raise AssertionError('a model or data set was loaded before the refusal')
    monkeypatch.setattr(train_sft.world, 'load_split', load)
    monkeypatch.setattr(train_rl, 'load_uae', load)
    monkeypatch.setattr(sample, 'load_uae', load)


@pytest.mark.parametrize('overrides, message', [
    (dict(max_steps=0), "'max_steps' must be >= 1, got 0"),
    (dict(max_steps=-5), "'max_steps' must be >= 1, got -5"),
    (dict(caption_dropout=2.0), "'caption_dropout' must be between 0 and 1, got 2.0"),
    (dict(warmup=-1), "'warmup' must be >= 0"),
    (dict(levels={'long': 1.0}), re.escape("--levels={'long': 1.0}")),
    (dict(resume=True), 'no checkpoint to resume'),
])
def test_sft_values_are_checked_before_loading(toy, tmp_path, nothing_loads, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_sft(dict(args(toy, 'decoder', tmp_path / 'x'), **overrides))


def test_a_new_run_refuses_an_earlier_runs_folder(toy, tmp_path, nothing_loads):
    (tmp_path / 'log.jsonl').write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=f'{tmp_path} holds an earlier run .log.jsonl.: continue it with '
                                         f'--resume=True, or start over by deleting {tmp_path} or choosing another'):
        run_sft(args(toy, 'decoder', tmp_path))
    (tmp_path / 'file').write_text('')
    with pytest.raises(ValueError, match='--out_dir=.*file/run: cannot create this directory'):
        run_sft(args(toy, 'decoder', tmp_path / 'file' / 'run'))


def run_script(module, argv):
    saved, old_argv = module.config, sys.argv
    module.config, sys.argv = copy.deepcopy(saved), [f'{module.__name__}.py', *argv]
    try:
        module.main()
    finally:
        module.config, sys.argv = saved, old_argv


def test_rl_and_sample_values_are_checked_before_loading(tmp_path, nothing_loads):
    with pytest.raises(ValueError, match="'steps' must be >= 0, got -3"):
        run_script(train_rl, ['--steps=-3', f'--out_dir={tmp_path / "rl"}'])
    with pytest.raises(ValueError, match='--group_size=1: GRPO compares at least 2'):
        run_script(train_rl, ['--group_size=1', f'--out_dir={tmp_path / "rl"}'])
    with pytest.raises(ValueError, match="'steps' must be >= 1, got -3"):
        run_script(sample, ['--steps=-3'])
    (tmp_path / 'file').write_text('')
    for out, message in ((tmp_path, f'--out={tmp_path}: give an image file name'),
                         (tmp_path / 'x.txt', 'x.txt: give an image file name'),
                         (tmp_path / 'file' / 'x.png', f'--out={tmp_path / "file"}: cannot create this directory')):
        with pytest.raises(ValueError, match=message):
            run_script(sample, ['--mode=t2i', '--prompt=a red circle.', f'--out={out}'])
    with pytest.raises(ValueError, match='cannot read image'):
        run_script(sample, ['--mode=i2t', f'--image={tmp_path / "missing.png"}'])


def test_warmup_zero_means_no_warmup(toy, tmp_path):
    with torch.random.fork_rng():
        run_sft(args(toy, 'encoder', tmp_path, max_steps=1, warmup=0, lr=1e-3, min_lr=1e-3))
    assert json.loads(open(tmp_path / 'log.jsonl').readline())['lr'] == 1e-3


# -----------------------------------------------------------------------------
# 4. non-finite numbers


def test_a_nan_reward_skips_its_group():
    rewards = torch.tensor([0.1, 0.5, math.nan, 0.2, 0.3, 0.9])
    adv, zero_std = grpo.group_advantages(rewards, 2)
    assert torch.equal(adv[2:4], torch.zeros(2)) and bool(adv.isfinite().all())
    torch.testing.assert_close(adv[[0, 1, 4, 5]], grpo.group_advantages(rewards[[0, 1, 4, 5]], 2)[0])
    assert zero_std == 0


def test_rollout_rewards_leave_out_and_count_nonfinite_ones(monkeypatch):
    a, b = torch.tensor([0.9, math.nan, 0.7, 0.2]), torch.tensor([0.5, 0.5, 0.1, 0.3])
    monkeypatch.setattr(train_rl, 'similarities', lambda names, embedders, recon, orig: {'a': a, 'b': b})
    mixed, log = train_rl.reward(dict(reward={'a': 1.0, 'b': 1.0}), {}, None, None, 1, 'cpu')
    assert log['nonfinite_rewards'] == 1 and math.isfinite(log['reward']) and math.isfinite(log['reward_a'])
    assert mixed[1].isnan() and bool(mixed[[0, 2, 3]].isfinite().all())
    assert log['reward'] == pytest.approx(float((a[[0, 2, 3]] + b[[0, 2, 3]]).mean() / 2))


def test_nonfinite_weights_are_never_written(tmp_path):
    with pytest.raises(ValueError, match=r'refusing to write .*x.safetensors: non-finite values \(NaN or inf\) in b'):
        save_safetensors({'a': torch.ones(2), 'b': torch.tensor([1.0, math.inf])}, str(tmp_path / 'x.safetensors'))
    checkpoint.save_checkpoint(str(tmp_path / 'ckpt'), weights_at(1), meta_at(1))
    bad = dict(weights_at(2), ema={'w': torch.tensor([math.nan])})
    with pytest.raises(ValueError, match='ema.safetensors: non-finite values'):
        checkpoint.save_checkpoint(str(tmp_path / 'ckpt'), bad, meta_at(2))
    assert sorted(os.listdir(tmp_path)) == ['ckpt'] and checkpoint.load_checkpoint(str(tmp_path / 'ckpt'), ['model', 'optimizer'])[1]['step'] == 1
    dit = D.MMDiT(D.MMDiTConfig.from_dict(dict(json.load(open(os.path.join(ROOT, 'config/toy_decoder.json'))), num_layers=1)))
    apply_lora(dit, ['to_q'], 2, 4)
    with torch.no_grad():
        dit.transformer_blocks[0].attn.to_q.lora_B.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match='lora_B'):
        save_peft(dit, str(tmp_path / 'lora'))


def test_sampling_refuses_nan():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, math.nan, 1.0]])
    for greedy in (False, True):
        with pytest.raises(ValueError, match='NaN or inf logits'):
            sample_logits(logits, greedy=greedy, generator=torch.Generator().manual_seed(0))
    tokens, _ = sample_logits(logits[:1].clone(), greedy=True)
    assert tokens.tolist() == [2]


@pytest.fixture(scope='module')
def models(toy, tmp_path_factory):
    """The tiny LLM and a tiny DiT matching it, on disk."""
    d = tmp_path_factory.mktemp('models')
    with open(toy['dec_arch']) as f:
        torch.manual_seed(0)
        dit = D.MMDiT(D.MMDiTConfig.from_dict(json.load(f)))
    dit.initialize_weights()
    dit.save_pretrained(str(d / 'dit'))
    return dict(llm=toy['llm'], dit=str(d / 'dit'), dir=d, pooled=torch.randn(1, dit.config.pooled_projection_dim))


def test_a_nan_in_the_decoder_is_an_error_not_a_black_image(models):
    enc = Encoder.from_pretrained(models['llm'])
    dit = D.MMDiT.from_pretrained(models['dit'])
    with torch.no_grad():
        dit.proj_out.bias[0] = math.nan
    with pytest.raises(ValueError, match='the decoder produced NaN or inf'):
        pipeline.draw(enc, dit, None, models['pooled'], ['a red circle.'], steps=2)


# -----------------------------------------------------------------------------
# 5. integer weights are refused by every loader


def as_int(src, dst, key_part):
    """Copy a safetensors file with the first tensor whose name contains key_part turned into int32."""
    state = load_file(src)
    key = next(k for k in state if key_part in k)
    state[key] = state[key].round().int()
    save_file(state, dst)
    return key


def test_integer_weights_are_refused(models, tmp_path):
    llm = tmp_path / 'llm'
    shutil.copytree(models['llm'], llm)
    key = as_int(llm / 'model.safetensors', llm / 'model.safetensors', 'language_model.norm.weight')
    with pytest.raises(ValueError, match=f'wrong dtypes: {key}: int32 is not a floating-point dtype'):
        Encoder.from_pretrained(str(llm))
    dit = tmp_path / 'dit'
    shutil.copytree(models['dit'], dit)
    path = dit / 'diffusion_pytorch_model.safetensors'
    key = as_int(path, path, 'proj_out.weight')
    with pytest.raises(ValueError, match=f'{key}: int32 is not a floating-point dtype'):
        D.MMDiT.from_pretrained(str(dit))
    model = D.MMDiT.from_pretrained(models['dit'])
    apply_lora(model, ['to_q'], 2, 4)
    save_peft(model, str(tmp_path / 'dit_lora'))
    path = tmp_path / 'dit_lora' / 'adapter_model.safetensors'
    as_int(path, path, 'lora_A')
    with pytest.raises(ValueError, match='lora_A.weight: int32 is not a floating-point dtype'):
        load_peft(D.MMDiT.from_pretrained(models['dit']), str(tmp_path / 'dit_lora'))
    enc = Encoder.from_pretrained(models['llm'])
    apply_lora(enc, LLM_LORA_TARGETS, 2, 4)
    os.makedirs(tmp_path / 'llm_lora')
    path = tmp_path / 'llm_lora' / 'model.safetensors'
    save_safetensors(enc.state_dict(), str(path))
    as_int(path, path, 'lora_B')
    with pytest.raises(ValueError, match='lora_B.weight: int32 is not a floating-point dtype'):
        Encoder.from_pretrained(models['llm']).load_llm_lora(str(tmp_path / 'llm_lora'))


# -----------------------------------------------------------------------------
# RL resume is strict too


@pytest.fixture(scope='module')
def rl_run(toy, models, tmp_path_factory):
    """1 step of G4U on the tiny models, checkpointed."""
    d = tmp_path_factory.mktemp('rl')
    save_safetensors({'pooled': models['pooled'].view(-1)}, str(d / 'pooled.safetensors'))
    images, _ = world.load_split(os.path.join(toy['data'], 'train'))
    pixels = torch.from_numpy(images[:64].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    dit = D.MMDiT.from_pretrained(models['dit'])
    D.LinearCodec.fit(pixels, world.IMAGE // dit.config.sample_size, dit.config.in_channels).save(str(d / 'codec.safetensors'))
    argv = [f'--llm={models["llm"]}', f'--dit={models["dit"]}', f'--pooled={d / "pooled.safetensors"}',
            f'--vae={d / "codec.safetensors"}', f'--data_dir={toy["data"]}', "--reward={'pixel': 1.0}",
            '--images_per_step=2', '--group_size=2', '--sample_steps=2', '--max_new_tokens=4', '--eval_images=1',
            '--eval_steps=1', '--lora_r=2', '--lora_alpha=4', '--steps=1', f'--out_dir={d / "run"}']
    run_script(train_rl, argv)
    return dict(argv=argv, out=d / 'run')


def test_rl_resume_checks_every_tensor(rl_run, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(rl_run['out'], out)
    trainable, optimizer = (out / 'ckpt' / f'{f}.safetensors' for f in ('trainable', 'optimizer'))
    lora_b = next(k for k in sorted(load_file(trainable)) if 'lora_B' in k)
    moment = next(k for k in sorted(load_file(optimizer)) if k.endswith(':exp_avg_sq'))
    corrupt(trainable, lora_b, torch.zeros(1, 2))  # copy_ would broadcast it into every row
    corrupt(optimizer, moment, None)
    with pytest.raises(ValueError, match=rf'trainable.safetensors: wrong shapes: {re.escape(lora_b)}: expected .* \| '
                                         rf'optimizer.safetensors: missing keys: {re.escape(moment)}'):
        run_script(train_rl, rl_run['argv'] + [f'--out_dir={out}', '--steps=2', '--resume=True'])


# -----------------------------------------------------------------------------
# 6. errors read as one line; --help


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"unknown config key 'stpes' \(from command line\): did you mean --steps\?$"):
        configure(dict(steps=1, lr=0.1), ['--stpes=3'])


@pytest.mark.parametrize('module, key, comment', [
    (train_sft, 'caption_dropout', 'decoder: empty caption this often, for classifier-free guidance'),
    (train_rl, 'beta', 'KL to the reference (the same model with its LoRA disabled)'),
    (sample, 'llm_lora', "UAE `llm_lora` shards or a PEFT adapter directory (ours)"),
])
def test_help_lists_every_key_with_its_default_and_comment(module, key, comment, capsys):
    for flag in ('--help', '-h'):
        with pytest.raises(SystemExit) as e:
            run_script(module, ['--steps=oops', flag])  # --help wins over everything else
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(f'--{k} ' in out for k in module.config), out
        line = next(line for line in out.splitlines() if line.startswith(f'  --{key} '))
        assert repr(module.config[key]) in line and line.endswith(comment), line


def test_bench_task_needs_a_value_and_help_works(capsys):
    import bench
    with pytest.raises(ValueError, match='--task needs a value'):
        bench.main(['--task'])
    with pytest.raises(SystemExit) as e:
        bench.main(['--task=reward', '--help'])
    assert e.value.code == 0 and '--metrics' in capsys.readouterr().out


def refuse():
    raise ValueError('--x=3: not allowed')


def test_a_refusal_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    with pytest.raises(SystemExit, match=r'error: --x=3: not allowed$'):
        common.run(refuse)
    with pytest.raises(SystemExit, match='No such file or directory'):
        common.run(lambda: open(tmp_path / 'missing'))
    with pytest.raises(json.JSONDecodeError):  # raised inside a library: a bug's traceback
        common.run(lambda: json.loads('{'))
    with pytest.raises(KeyError):
        common.run(lambda: {}['k'])
    proc = subprocess.run([sys.executable, 'train_sft.py', '--max_steps=0'], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr.splitlines() == ["train_sft.py: error: config key 'max_steps' must be >= 1, got 0"]
