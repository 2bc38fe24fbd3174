"""The speedrun end to end at toy scale: every stage runs in order, the report card has its five rows, a
second run finds every stage done, and a run with other options refuses the folder."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--small=True', '--scale=0.001', '--n_train=400']


def speedrun(*args):
    return subprocess.run([sys.executable, 'speedrun.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('speedrun') / 'seed1')
    r = speedrun(*SMALL, f'--out_dir={out}')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_every_stage_runs_and_the_report_has_one_row_per_stage(run_dir):
    timing = json.load(open(os.path.join(run_dir, 'timing.json')))
    for stage in ('data', 'enc_sft', 'dec_sft', 'enc_size', 'enc_terse', 'sft', 'g4u1', 'u4g1', 'g4u2', 'u4g2'):
        assert stage in timing
    # 15 rows of evaluations, 11 run: Toy-GenEval after G4U and Understanding after U4G are the stage before's
    assert sum(k.startswith('eval_') for k in timing) == 11
    report = open(os.path.join(run_dir, 'report.md')).read()
    for label in ('| SFT |', '| +G4U |', '| +U4G |', '| +G4U (round 2) |', '| +U4G (round 2) |'):
        assert label in report
    assert '## Does round 2 help?' in report and 'ghosts' in report
    assert os.path.exists(os.path.join(run_dir, 'contact_sheet.png'))
    # the UAE after SFT reads the decoder's conditioning layer (the terse captioner's own config has none)
    sft = json.load(open(os.path.join(run_dir, 'sft', 'llm', 'config.json')))
    assert sft['prompt_layer'] == json.load(open(os.path.join(run_dir, 'dec_sft', 'llm', 'config.json')))['prompt_layer'] == 1
    # ... and the decoder's projector (fitted to whiten what it reads), not the captioner's random one
    from safetensors.torch import load_file
    sft, dec, terse = (load_file(os.path.join(run_dir, d, 'llm', 'model.safetensors')) for d in ('sft', 'dec_sft', 'enc_terse'))
    projector = [k for k in sft if k.startswith('projector.')]
    assert projector and all((sft[k] == dec[k]).all() for k in projector)
    assert not all((sft[k] == terse[k]).all() for k in projector)
    g4u1 = json.load(open(os.path.join(run_dir, 'g4u1', 'ckpt', 'meta.json')))['config']
    assert g4u1['llm'].endswith('sft/llm')
    # round 2 continued round 1's adapters: its configs name them
    g4u2 = json.load(open(os.path.join(run_dir, 'g4u2', 'ckpt', 'meta.json')))['config']
    assert g4u2['llm_lora'].endswith('g4u1/llm_lora') and g4u2['dit_lora'].endswith('u4g1/dit_lora')
    u4g2 = json.load(open(os.path.join(run_dir, 'u4g2', 'ckpt', 'meta.json')))['config']
    assert u4g2['llm_lora'].endswith('g4u2/llm_lora') and u4g2['dit_lora'].endswith('u4g1/dit_lora')


def test_an_evaluation_not_rerun_would_score_the_same_models(run_dir, tmp_path):
    """The speedrun reuses the stage before's evaluation where a stage left alone what a task runs
    (speedrun.evaluated_at). For each reuse: load the UAE after the stage, its own adapters moved far from
    where they are (at toy scale they barely train), and what the task runs equals the reused stage's:
    Toy-GenEval the decoder and the prompt states it reads, Understanding the encoder."""
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    sys.path.insert(0, REPO)
    import speedrun
    from bench import UAE
    from pipeline import load_uae
    cfg = json.load(open(os.path.join(run_dir, 'config.json')))
    gen = torch.Generator().manual_seed(0)

    def uae(name, far_from=None):  # the UAE after `name`; adapters not the same as far_from's moved by N(0, 0.1)
        paths = dict(UAE, llm=f'{run_dir}/sft/llm', dit=f'{run_dir}/dec_sft/dit', vae=f'{run_dir}/dec_sft/codec.safetensors',
                     pooled=f'{run_dir}/dec_sft/pooled.safetensors', llm_lora='', dit_lora='')
        for i, kind in enumerate(('llm_lora', 'dit_lora')):
            stage = speedrun.ADAPTERS[name][i]
            if stage and far_from and stage != speedrun.ADAPTERS[far_from][i]:
                path = str(tmp_path / name / kind)
                shutil.copytree(f'{run_dir}/{stage}/{kind}', path)
                f = os.path.join(path, 'adapter_model.safetensors')
                save_file({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in load_file(f).items()}, f)
                paths[kind] = path
            elif stage:
                paths[kind] = f'{run_dir}/{stage}/{kind}'
        return load_uae(paths, torch.device('cpu'))
    prompts = ['a red circle.', 'a large blue square in the top left.']
    reused = [(n, t) for t in ('geneval', 'understanding') for n in speedrun.ROUNDS if speedrun.evaluated_at(n, t, cfg) != n]
    assert sorted(reused) == [('g4u1', 'geneval'), ('g4u2', 'geneval'), ('u4g1', 'understanding'), ('u4g2', 'understanding')]
    for name, task in reused:
        at = speedrun.evaluated_at(name, task, cfg)
        (enc, dit, _, _), (enc_at, dit_at, _, _) = uae(name, far_from=at), uae(at)
        with torch.no_grad():
            if task == 'geneval':
                assert torch.equal(enc.embed_prompt(prompts), enc_at.embed_prompt(prompts)), name
                same = dit.state_dict(), dit_at.state_dict()
            else:
                same = enc.state_dict(), enc_at.state_dict()
            assert same[0].keys() == same[1].keys() and all(torch.equal(v, same[1][k]) for k, v in same[0].items()), (name, task)


def test_geneval_is_rerun_after_g4u_when_its_adapter_reaches_what_the_decoder_reads():
    sys.path.insert(0, REPO)
    import speedrun
    cfg = dict(speedrun.config)
    assert [speedrun.evaluated_at(n, 'geneval', cfg) for n in speedrun.ROUNDS] == ['sft', 'sft', 'u4g1', 'u4g1', 'u4g2']
    cfg['g4u_args'] += ' --llm_lora_below_prompt_layer=True'
    assert [speedrun.evaluated_at(n, 'geneval', cfg) for n in speedrun.ROUNDS] == list(speedrun.ROUNDS)


def test_a_second_run_skips_what_is_done_and_other_options_are_refused(run_dir):
    r = speedrun(*SMALL, f'--out_dir={run_dir}')
    assert r.returncode == 0 and '0 of ' in r.stdout and 'start' not in r.stdout, r.stdout + r.stderr
    r = speedrun(*SMALL, '--seed=2', f'--out_dir={run_dir}')
    assert r.returncode == 1 and 'another configuration' in r.stderr


def test_summary_over_two_runs_reports_the_spread(run_dir, tmp_path):
    path = str(tmp_path / 'report.md')
    r = speedrun(f'--summary={run_dir},{run_dir}', f'--out_dir={path}')
    assert r.returncode == 0, r.stderr
    text = open(path).read()
    first_row = text.split('| SFT |')[1].split('\n')[0]
    assert first_row.count('(') >= 5 and '-' in first_row  # every cell: the mean (min-max)


def test_ship_copies_the_last_models_and_points_the_adapters_at_them(run_dir, tmp_path):
    sys.path.insert(0, REPO)
    import speedrun
    dest = str(tmp_path / 'toy')
    speedrun.ship(run_dir, dest)
    for name in speedrun.SHIPPED:
        assert os.path.exists(os.path.join(dest, name)), name
    base = json.load(open(os.path.join(dest, 'llm_lora', 'adapter_config.json')))['base_model_name_or_path']
    assert base == f'{dest}/llm'
    report = open(os.path.join(dest, 'report.md')).read()
    for link in ('rl_g4u1_curves.png', 'rl_g4u2_curves.png', 'contact_sheet.png'):
        assert f']({link})' in report
    with pytest.raises(ValueError, match='not a finished speedrun'):
        speedrun.ship(str(tmp_path), dest)
