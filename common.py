"""
Plumbing shared by every script: the config helper, strict safetensors I/O, atomic writes,
the one attention function both models call, and device / distributed setup.
"""
import ast
import contextlib
import ctypes
import datetime
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# config: every script starts with `config = dict(...)` and calls configure(config)

def _parse_value(key, text, default):
    """Parse a command-line value as a Python literal; a bare word is a string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ('true', 'false'):
        value = value.lower() == 'true'
    if isinstance(default, str) and not isinstance(value, str):  # a text key takes the text as written: 1,16 or 42
        value = text
    return _check_type(key, value, default)


def _check_type(key, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ValueError(f"config key '{key}' expects {type(default).__name__} "
                         f"(default {default!r}), got {type(value).__name__} {value!r}")
    return value


def read_config_file(path):
    """A config file is one Python dict literal (comments allowed); it is parsed, never executed."""
    try:
        with open(path) as f:
            value = ast.literal_eval(f.read())
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"config file {path} is not a plain dict literal: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"config file {path} must hold a dict, got {type(value).__name__}")
    return value


def configure(config, argv=None):
    """Update `config` in place from config files and --key=value / --key value overrides.

    Arguments are applied left to right: a bare path is a config file (see read_config_file),
    `--key=value` or `--key value` sets one key. Unknown keys and wrong types are errors.
    Returns config, for convenience.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    updates = []  # (key, raw value or parsed value, source)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith('--'):
            if '=' in arg:
                key, text = arg[2:].split('=', 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                key, text = arg[2:], argv[i + 1]
                i += 1
            else:
                raise ValueError(f"option {arg} needs a value: --key=value")
            updates.append((key.replace('-', '_'), text, 'command line'))
        else:
            for key, value in read_config_file(arg).items():
                updates.append((key, value, arg))
        i += 1
    for key, value, source in updates:
        if key not in config:
            known = ', '.join(sorted(config))
            raise ValueError(f"unknown config key '{key}' (from {source}); known keys: {known}")
        if source == 'command line':
            config[key] = _parse_value(key, value, config[key])
        else:
            config[key] = _check_type(key, value, config[key])
    return config


def require_positive(config, *keys):
    """Intervals and sizes (eval_every, batch_size, ...) must be >= 1: checked before anything loads, since
    an eval_every of 0 would otherwise divide by zero at the first step."""
    for key in keys:
        if config[key] < 1:
            raise ValueError(f"config key '{key}' must be >= 1, got {config[key]!r}")


# -----------------------------------------------------------------------------
# weights I/O: safetensors only, strict, atomic

def load_safetensors(path, device='cpu'):
    """Read one .safetensors file; a truncated or corrupt file is an error naming it."""
    try:
        with safe_open(path, framework='pt', device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read weights file {path}: {e}") from None


def load_safetensors_dir(directory, stem):
    """Read `stem.safetensors` or the shards listed in `stem.safetensors.index.json` in directory."""
    single = os.path.join(directory, f'{stem}.safetensors')
    index = single + '.index.json'
    if os.path.exists(single):
        return load_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)['weight_map']
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_safetensors(os.path.join(directory, shard)))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists keys that no shard holds: {missing[:5]}")
        return state
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {directory}")


def check_state_dict(expected, got, source):
    """Strict comparison of two {name: tensor-or-shape} dicts; raises naming every bad key."""
    shape = lambda t: tuple(t.shape) if hasattr(t, 'shape') else tuple(t)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f'{k}: expected {shape(expected[k])}, got {shape(got[k])}'
             for k in sorted(set(expected) & set(got)) if shape(expected[k]) != shape(got[k])]
    problems = []
    for name, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('wrong shapes', wrong)):
        if keys:
            more = f' (and {len(keys) - 10} more)' if len(keys) > 10 else ''
            problems.append(f"{name}: {', '.join(keys[:10])}{more}")
    if problems:
        raise ValueError(f"cannot load {source}: " + '; '.join(problems))


def load_state_dict_strict(module, state, source):
    """module.load_state_dict with an error that names every missing, unexpected or mis-shaped key."""
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True)


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: a crash never leaves a half-written file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(state, path, metadata=None):
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    seen = set()
    for k, v in state.items():  # tied weights (embedding = lm_head) are written as two tensors
        if v.data_ptr() in seen:
            state[k] = v.clone()
        seen.add(v.data_ptr())
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def save_json(obj, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


# -----------------------------------------------------------------------------
# attention: the one function every attention layer of both models calls

def attention(q, k, v, causal=False, mask=None):
    """Scaled dot-product attention.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H a multiple of Hkv (grouped-query attention).
    mask: optional bool tensor broadcastable to (B, H, Nq, Nk), True = may attend.
    causal: query i attends to keys j <= i (Nq == Nk).
    Returns (B, H, Nq, D).

    The backend comes from the environment variable NANOUAE_ATTENTION:
      auto (default): the Triton flash-attention kernels of kernels/attention.py for CUDA fp16/bf16
        tensors without a mask and head dim <= 128; torch's SDPA for everything else;
      sdpa: always SDPA;
      triton: always the Triton kernels (masks too); on the CPU only under TRITON_INTERPRET=1.
    """
    backend = os.environ.get('NANOUAE_ATTENTION', 'auto')
    if backend not in ('auto', 'sdpa', 'triton'):
        raise ValueError(f"NANOUAE_ATTENTION must be auto, sdpa or triton, got {backend!r}")
    if backend == 'auto':
        fits = (q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16)
                and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 128
                and not (causal and q.shape[2] != k.shape[2]))
        backend = 'triton' if fits else 'sdpa'
    if backend == 'triton':
        from kernels.attention import flash_attention  # imported here: importing common never needs triton
        return flash_attention(q, k, v, causal=causal, mask=mask)
    if k.shape[1] != q.shape[1]:
        # SDPA's enable_gqa is not implemented by every backend; expanding views is cheap
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if (q.device.type == 'cpu' and q.dtype in (torch.bfloat16, torch.float16) and mask is None and not causal
            and q.shape[2] >= 64 and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # PyTorch's CPU flash kernel is as fast in bf16 as in fp32 forward, but its backward is 1.2-1.9x slower
        # (333-112 tokens): long unmasked attention that is trained (the decoder's) runs in fp32 on the CPU,
        # faster, and no less exact. Not a decoding step: its casts would copy the whole KV cache for a few
        # query rows. (CPU autocast would cast the fp32 copies straight back to bf16, hence disabled.)
        with torch.autocast('cpu', enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


# -----------------------------------------------------------------------------
# device, precision and distributed setup

def keep_freed_memory():
    """Make glibc's malloc keep freed memory for the next tensors instead of handing it back to the kernel.

    By default glibc maps large blocks afresh and trims the heap whenever enough of its top is free, so the
    activations of a large batch page-fault again on every pass. On the 2-core VM this was written on, the
    toy evaluation of 300 images (`train_rl.py --stage=u4g --steps=0 --eval_images=300`) took 67-74 s,
    14-19 s of it in the kernel, and 54-57 s (3-4 s) with this call, same numbers out. PyTorch's CPU tuning
    guide gets the same from jemalloc or tcmalloc via LD_PRELOAD; this needs no extra library. The entry
    points call it first thing. Returns False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    # blocks up to 32 MB (glibc's largest setting) come from the heap; up to 1 GB of free heap is kept
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def pick_device(name='auto'):
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    return torch.device('cpu')


def autocast(device, dtype):
    """bf16/fp16 autocast on `device` when dtype says so; a no-op for 'float32'."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def setup_distributed(device='auto'):
    """Initialise torch.distributed when launched by torchrun (nccl on GPU, gloo on CPU).

    Returns (rank, world_size, device). Without torchrun: (0, 1, picked device).
    """
    if 'RANK' not in os.environ:
        return 0, 1, pick_device(device)
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    dev = pick_device(device)
    if dev.type == 'cuda':
        dev = torch.device('cuda', local_rank)
        torch.cuda.set_device(dev)
    # the other ranks wait at the next collective while rank 0 evaluates or writes a checkpoint alone:
    # NCCL's default timeout (10 minutes) would kill a long evaluation of a real model
    torch.distributed.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', timeout=datetime.timedelta(hours=2))
    return rank, world, dev


# -----------------------------------------------------------------------------
# training checkpoints: a directory written whole or not at all

def optimizer_to_files(osd):
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint.state_dict
    gives one) -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for name, state in osd['state'].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f'{name}:{k}'] = v
            else:
                scalars[f'{name}:{k}'] = v
    return tensors, dict(param_groups=osd['param_groups'], scalars=scalars)


def optimizer_from_files(tensors, rest):
    state = {}
    for key, v in list(tensors.items()) + list(rest['scalars'].items()):
        name, k = key.rsplit(':', 1)
        state.setdefault(name, {})[k] = v
    return dict(state=state, param_groups=rest['param_groups'])


def save_checkpoint(directory, weights, meta):
    """Write directory/<name>.safetensors for each {name: state_dict} of `weights` and meta.json,
    into a temporary directory first, then swap it in: a crash leaves the previous checkpoint intact."""
    tmp, old = directory + '.tmp', directory + '.old'
    for d in (tmp, old):
        if os.path.exists(d):
            shutil.rmtree(d)
    os.makedirs(tmp)
    for name, state in weights.items():
        save_safetensors(state, os.path.join(tmp, f'{name}.safetensors'))
    save_json(meta, os.path.join(tmp, 'meta.json'))
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    if os.path.exists(old):
        shutil.rmtree(old)


def load_checkpoint(directory):
    """(weights {name: state_dict}, meta) of a directory written by save_checkpoint."""
    path = os.path.join(directory, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'no checkpoint to resume in {directory} (meta.json missing)')
    with open(path) as f:
        meta = json.load(f)
    weights = {os.path.basename(f)[:-len('.safetensors')]: load_safetensors(os.path.join(directory, f))
               for f in sorted(os.listdir(directory)) if f.endswith('.safetensors')}
    return weights, meta


def teardown_distributed():
    """Leave torch.distributed together: a rank tearing gloo down while another still talks to it can
    abort the process at exit ('terminate called without an active exception', seen in CI)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
