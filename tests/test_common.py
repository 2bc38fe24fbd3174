"""The config helper and the atomic writes every script relies on."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from common import atomic_write, configure, load_safetensors, require_positive, save_safetensors


def defaults():
    return dict(stage='g4u', steps=10, lr=3e-4, compile=False, out_dir='out', device=None)


def test_overrides_are_parsed_and_typed():
    c = configure(defaults(), ['--steps=20', '--lr', '1e-3', '--compile=True', '--stage', 'u4g'])
    assert c == dict(stage='u4g', steps=20, lr=1e-3, compile=True, out_dir='out', device=None)
    assert configure(defaults(), ['--lr=1'])['lr'] == 1.0 and isinstance(configure(defaults(), ['--lr=1'])['lr'], float)
    assert configure(defaults(), ['--compile=false'])['compile'] is False
    # a text key keeps what was typed, even where it reads as a number or a tuple
    assert configure(defaults(), ['--out_dir=1,16'])['out_dir'] == '1,16'
    assert configure(defaults(), ['--out_dir=42'])['out_dir'] == '42'


def test_unknown_key_and_wrong_type_are_errors():
    with pytest.raises(ValueError, match="unknown config key 'stpes'"):
        configure(defaults(), ['--stpes=3'])
    with pytest.raises(ValueError, match="'steps' expects int"):
        configure(defaults(), ['--steps=ten'])
    with pytest.raises(ValueError, match='needs a value'):
        configure(defaults(), ['--steps'])


def test_config_file_is_parsed_not_executed(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text("# a comment\n{'steps': 7, 'out_dir': 'runs/x'}\n")
    c = configure(defaults(), [str(good), '--steps=8'])  # later arguments win
    assert c['steps'] == 8 and c['out_dir'] == 'runs/x'
    evil = tmp_path / 'evil.py'
    evil.write_text("__import__('os').remove('x')")
    with pytest.raises(ValueError, match='not a plain dict literal'):
        configure(defaults(), [str(evil)])
    with pytest.raises(ValueError, match='cannot read config file'):
        configure(defaults(), [str(tmp_path / 'missing.py')])


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'w.safetensors'
    save_safetensors({'a': torch.ones(3)}, str(path))

    def crash(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise RuntimeError('killed mid-write')
    with pytest.raises(RuntimeError):
        atomic_write(str(path), crash)
    assert torch.equal(load_safetensors(str(path))['a'], torch.ones(3))
    assert os.listdir(tmp_path) == ['w.safetensors']  # no temp file left behind


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / 'x.safetensors'
    save_safetensors({'a': torch.randn(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match='x.safetensors'):
        load_safetensors(str(path))


def test_intervals_must_be_positive():
    require_positive(dict(eval_every=1, save_every=50), 'eval_every', 'save_every')
    with pytest.raises(ValueError, match="'save_every' must be >= 1, got 0"):
        require_positive(dict(eval_every=1, save_every=0), 'eval_every', 'save_every')


FAULTS_OF_A_REUSED_BLOCK = """
import ctypes, resource, sys
import common
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == 'keep':
    assert common.keep_freed_memory()
faults = []
for _ in range(2):  # a 16 MB block written, freed, and again
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(16 << 20)
    libc.memset(p, 1, 16 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(faults[1])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='a glibc malloc setting')
def test_keep_freed_memory_reuses_a_freed_block():
    """By default glibc maps the first large block afresh and unmaps it when freed, and the second one
    grows the heap: its 4 KB pages fault in again. After keep_freed_memory() the freed block is reused."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    def second_block_faults(mode):  # a fresh process: the allocator's state is per process
        run = subprocess.run([sys.executable, '-c', FAULTS_OF_A_REUSED_BLOCK, mode], cwd=root, capture_output=True,
                             text=True, check=True)
        return int(run.stdout)
    assert second_block_faults('default') > 2000  # 16 MB = 4096 pages
    assert second_block_faults('keep') < 100
