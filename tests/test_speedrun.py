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
    assert sum(k.startswith('eval_') for k in timing) == 15
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
