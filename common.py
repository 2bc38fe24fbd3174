"""
Plumbing shared by every script: the config helper, strict safetensors I/O, atomic writes,
the one attention function both models call, and device / distributed setup.
"""
import ast
import contextlib
import ctypes
import datetime
import difflib
import importlib.util
import io
import json
import linecache
import math
import os
import re
import shutil
import sys
import tokenize

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
    if '--help' in argv or '-h' in argv:
        print(config_help(config, sys._getframe(1).f_globals.get('__file__')))
        sys.exit(0)
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
            near = difflib.get_close_matches(key, config, n=1)
            hint = f'did you mean --{near[0]}?' if near else '--help lists the keys'
            raise ValueError(f"unknown config key '{key}' (from {source}): {hint}")
        if source == 'command line':
            config[key] = _parse_value(key, value, config[key])
        else:
            config[key] = _check_type(key, value, config[key])
    return config


def require_positive(config, *keys, minimum=1):
    """Intervals and sizes (eval_every, batch_size, ...) must be >= 1: checked before anything loads, since
    an eval_every of 0 would otherwise divide by zero at the first step (minimum=0: counts such as warmup)."""
    for key in keys:
        if config[key] < minimum:
            raise ValueError(f"config key '{key}' must be >= {minimum}, got {config[key]!r}")


def require_fraction(config, *keys):
    """Probabilities and decay rates must lie in [0, 1]."""
    for key in keys:
        if not 0 <= config[key] <= 1:
            raise ValueError(f"config key '{key}' must be between 0 and 1, got {config[key]!r}")


def config_help(config, path):
    """What --help prints: each key, its default, and its comment in the script's `config = dict(...)`
    (the source at path is parsed, never run: a trailing comment, else the comment block just above)."""
    rows = {key: '' for key in config}
    try:
        with open(path) as f:
            source = f.read()
        comments = {}  # line -> (comment text, whether the line holds nothing else)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.string.lstrip('#').strip(), not tok.line[:tok.start[1]].strip())
        calls = [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
                 and [getattr(t, 'id', None) for t in node.targets] == ['config']
                 and isinstance(node.value, ast.Call) and getattr(node.value.func, 'id', None) == 'dict']
        call = max(calls, key=lambda c: len({k.arg for k in c.keywords} & set(config)))  # the dict of `config`
    except (OSError, TypeError, SyntaxError, ValueError):
        call = None  # no source to read: keys and defaults only
    for kw in call.keywords if call is not None else []:
        if kw.arg not in rows:
            continue
        trailing = [comments[n][0] for n in range(kw.lineno, kw.end_lineno + 1)
                    if n in comments and not comments[n][1]]
        block, n = [], kw.lineno - 1
        while n in comments and comments[n][1]:
            block.insert(0, comments[n][0])
            n -= 1
        first = trailing[0] if trailing else re.split(r'(?<=\.)\s', ' '.join(block))[0]  # a block's first sentence
        rows[kw.arg] = first if len(first) <= 100 else first[:97] + '...'
    width = max(len(k) for k in config) + 2
    lines = [f"usage: python {os.path.basename(path or 'script.py')} [config_file.py ...] [--key=value ...]",
             'keys, their defaults and what they set (a config file is a dict literal of some of them):']
    for key, text in rows.items():
        lines.append(f'  --{key:<{width}} {config[key]!r:<16} {text}'.rstrip())
    return '\n'.join(lines)


def run(main):
    """The entry points' `main()` wrapper: a user's mistake reads as one line, a bug keeps its traceback.

    A refusal is a ValueError, OSError or FloatingPointError raised by a `raise` statement of this
    repository (whose messages name the file, key or value), or an OSError naming a file (a missing path,
    a directory that cannot be written): it prints `<script>: error: <message>` and exits with code 1.
    Anything else is re-raised."""
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        if not (isinstance(e, OSError) and e.filename) and not _raised_by_us(e):
            raise
        sys.exit(f'{os.path.basename(sys.argv[0])}: error: {e}')


def _raised_by_us(e):
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    ours = path.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep) and 'site-packages' not in path
    return ours and linecache.getline(path, tb.tb_lineno).strip().startswith('raise ')


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
        weight_map = read_json(index).get('weight_map')
        if not isinstance(weight_map, dict):
            raise ValueError(f'{index} has no weight_map: not a safetensors index')
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_safetensors(os.path.join(directory, shard)))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists keys that no shard holds: {missing[:5]}")
        return state
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {directory}")


def check_state_dict(expected, got, source, exact_dtype=False):
    """Strict comparison of two {name: tensor-or-shape} dicts; raises naming every bad key.

    What goes into a floating-point tensor must be floating point: load_state_dict would cast an integer
    file into garbage weights without a word. exact_dtype (resuming a run): the dtypes must be equal, as
    an fp16 tensor upcast to fp32 is no longer the state that was saved."""
    problems = state_dict_problems(expected, got, exact_dtype)
    if problems:
        raise ValueError(f"cannot load {source}: {problems}")


def state_dict_problems(expected, got, exact_dtype=False):
    """What check_state_dict finds wrong, as one line ('' if nothing)."""
    shape = lambda t: tuple(t.shape) if hasattr(t, 'shape') else tuple(t)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    both = sorted(set(expected) & set(got))
    wrong = [f'{k}: expected {shape(expected[k])}, got {shape(got[k])}'
             for k in both if shape(expected[k]) != shape(got[k])]
    dtypes = []
    for k in both:
        want, have = getattr(expected[k], 'dtype', None), getattr(got[k], 'dtype', None)
        if want is None or have is None or want == have:
            continue
        if exact_dtype:
            dtypes.append(f'{k}: expected {want}, got {have}'.replace('torch.', ''))
        elif want.is_floating_point and not have.is_floating_point:
            dtypes.append(f'{k}: {have} is not a floating-point dtype'.replace('torch.', ''))
    problems = []
    for name, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('wrong shapes', wrong),
                       ('wrong dtypes', dtypes)):
        if keys:
            more = f' (and {len(keys) - 10} more)' if len(keys) > 10 else ''
            problems.append(f"{name}: {', '.join(keys[:10])}{more}")
    return '; '.join(problems)


def load_state_dict_strict(module, state, source):
    """module.load_state_dict with an error that names every missing, unexpected or mis-shaped key."""
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True)


_UMASK = os.umask(0o22)
os.umask(_UMASK)  # read once: the mode a plain open() would give a new file is 0o666 & ~umask


def fsync_dir(path):
    """Make the renames in a directory durable (a file's own fsync does not cover its name)."""
    fd = os.open(path or '.', os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path: a crash never leaves a half-written file, and once
    this returns the file is on disk (fsync), with the mode a plain open() gives (safetensors' is 0600)."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_finite(state, source):
    """Refuse to write NaN or inf weights: a non-finite checkpoint would replace the last good one."""
    bad = [k for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        more = f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''
        raise ValueError(f"refusing to write {source}: non-finite values (NaN or inf) in {', '.join(bad[:5])}{more}")


def save_safetensors(state, path, metadata=None):
    check_finite(state, path)
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


def read_json(path):
    """A JSON file's content; a cut or malformed file is an error naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path} is not valid JSON (cut short?): {e}') from None


# -----------------------------------------------------------------------------
# attention: the one function every attention layer of both models calls

def attention_kernels():
    """kernels/attention.py (the Triton flash attention) as a module, loaded on first use.

    Loaded by file path under a private name, not imported as `kernels.attention`: `kernels` is also
    Hugging Face's kernel-hub package, which transformers imports, and a `kernels` package of ours at the
    repository root would shadow it. Loaded lazily because importing triton is not free; kept in
    sys.modules, so it is loaded once and tests can monkeypatch its flash_attention."""
    name = 'nanouae_attention_kernels'
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels', 'attention.py')
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it, as import does
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


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
        return attention_kernels().flash_attention(q, k, v, causal=causal, mask=mask)
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
#
# save_checkpoint writes every file into ckpt.tmp, meta.json last (so a directory holding meta.json is
# complete), then renames ckpt -> ckpt.old, ckpt.tmp -> ckpt and deletes ckpt.old. Whatever instant a
# kill hits, one complete checkpoint is left: the newest is ckpt.tmp if it is complete, else ckpt, else
# ckpt.old (between the two renames). find_checkpoint returns it; the next save finishes the swap first.

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


def check_optimizer_files(tensors, rest, groups, path):
    """The optimizer part of a checkpoint against this run's AdamW, before anything is loaded.

    groups: the run's parameter groups, each {name: parameter}. Each parameter has either no state (it
    never had a gradient) or exactly exp_avg and exp_avg_sq (its shape and dtype) and step (a float32
    scalar); the groups must hold the same names. Returns the expected tensors for check_state_dict."""
    saved = [set(g.get('params', [])) if isinstance(g, dict) else set() for g in rest.get('param_groups', [])]
    if saved != [set(g) for g in groups]:
        raise ValueError(f"cannot resume from {path}: its optimizer has parameter groups of "
                         f"{[len(g) for g in saved]} parameters, this run {[len(g) for g in groups]} "
                         "(another model, train_only or stage?)")
    params = {n: p for g in groups for n, p in g.items()}
    stray = [k for k in rest.get('scalars', {}) if k.rpartition(':')[0] not in params]
    if stray:
        raise ValueError(f'cannot resume from {path}: meta.json has optimizer values of unknown parameters: '
                         f'{stray[:5]}')
    with_state = {k.rpartition(':')[0] for k in tensors}
    step = torch.zeros((), dtype=torch.float32)
    return {f'{n}:{k}': (step if k == 'step' else p) for n, p in params.items() if n in with_state
            for k in ('exp_avg', 'exp_avg_sq', 'step')}


def check_checkpoint(expected, weights, path):
    """Every tensor of a checkpoint against what the run holds, before anything is copied: expected and
    weights are {file name: state dict}; names, shapes and dtypes must all agree (exact_dtype). One error
    lists every bad key of every file."""
    problems = [f'{name}.safetensors: {p}' for name in expected
                if (p := state_dict_problems(expected[name], weights[name], exact_dtype=True))]
    if problems:
        raise ValueError(f"cannot resume from {path}: {' | '.join(problems)}")


def _complete(directory):
    return os.path.isfile(os.path.join(directory, 'meta.json'))


def _remove(directory):
    if os.path.exists(directory):
        if _complete(directory):  # first: a kill halfway through leaves an incomplete directory
            os.remove(os.path.join(directory, 'meta.json'))
        shutil.rmtree(directory)


def find_checkpoint(directory):
    """The newest complete checkpoint written by save_checkpoint(directory, ...), or None."""
    for d in (directory + '.tmp', directory, directory + '.old'):
        if _complete(d):
            return d
    return None


def finish_swap(directory):
    """Bring a save killed midway to its end: afterwards only `directory` holds a checkpoint. Each step
    is a rename or deletes a copy that is not the newest, so a kill here too loses nothing."""
    tmp, old = directory + '.tmp', directory + '.old'
    if _complete(tmp):
        if os.path.exists(directory):
            _remove(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
    _remove(tmp)
    if not os.path.exists(directory) and _complete(old):
        os.replace(old, directory)
    if _complete(directory):
        _remove(old)
    fsync_dir(os.path.dirname(directory))


def save_checkpoint(directory, weights, meta):
    """Write directory/<name>.safetensors for each {name: state_dict} of `weights` and meta.json, crash-safe
    (see above). Non-finite weights are refused before anything is written."""
    for name, state in weights.items():
        check_finite(state, os.path.join(directory, f'{name}.safetensors'))
    finish_swap(directory)
    tmp, old = directory + '.tmp', directory + '.old'
    os.makedirs(tmp)
    for name, state in weights.items():
        save_safetensors(state, os.path.join(tmp, f'{name}.safetensors'))
    save_json(meta, os.path.join(tmp, 'meta.json'))  # last: from here on tmp is the newest checkpoint
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(os.path.dirname(directory))
    _remove(old)


def load_checkpoint(directory, files):
    """(weights {name: state_dict}, meta, path) of the newest complete checkpoint at directory (see
    find_checkpoint). files: the names of the .safetensors files the run expects, no more, no fewer."""
    path = find_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(f'no checkpoint to resume in {directory} (nor in {directory}.tmp or .old)')
    meta = read_json(os.path.join(path, 'meta.json'))
    opt = meta.get('optimizer') if isinstance(meta, dict) else None
    if not (isinstance(opt, dict) and isinstance(opt.get('param_groups'), list) and isinstance(opt.get('scalars'), dict)
            and isinstance(meta.get('step'), int) and meta['step'] >= 0):
        raise ValueError(f"{os.path.join(path, 'meta.json')} is not a checkpoint's meta.json: it needs a step "
                         "and the optimizer's param_groups and scalars")
    found = sorted(f[:-len('.safetensors')] for f in os.listdir(path) if f.endswith('.safetensors'))
    missing, extra = sorted(set(files) - set(found)), sorted(set(found) - set(files))
    if missing or extra:
        raise ValueError(f'cannot resume from {path}: ' + '; '.join(
            f'{what} {", ".join(f + ".safetensors" for f in names)}'
            for what, names in (('missing', missing), ('unexpected', extra)) if names))
    weights = {f: load_safetensors(os.path.join(path, f'{f}.safetensors')) for f in files}
    return weights, meta, path


def check_run_dir(out_dir, resume, checkpoint='ckpt', log='log.jsonl'):
    """Before anything loads: a new run refuses a folder that holds an earlier one (it would overwrite its
    checkpoint with an earlier step and append to its log), a resumed run needs a checkpoint there, and
    out_dir must be a directory this process can write."""
    ckpt = os.path.join(out_dir, checkpoint)
    if resume and find_checkpoint(ckpt) is None:
        raise FileNotFoundError(f'no checkpoint to resume in {ckpt}: drop --resume to start a new run')
    earlier = [f for f in (checkpoint, checkpoint + '.tmp', checkpoint + '.old', log)
               if os.path.exists(os.path.join(out_dir, f))]
    if earlier and not resume:
        raise ValueError(f"{out_dir} holds an earlier run ({', '.join(earlier)}): continue it with --resume=True, "
                         f"or start over by deleting {out_dir} or choosing another --out_dir")
    make_dir(out_dir)


def make_dir(path, key='out_dir'):
    """Create an output directory now, so that an unusable path is found before any model loads."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f'--{key}={path}: cannot create this directory ({e.strerror})') from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f'--{key}={path}: this directory is not writable')


def truncate_log(path, step):
    """On resume: keep the rows of a JSON-lines log up to the checkpoint's step. The rows the killed run
    wrote after its last checkpoint are written again by the resumed one (and a row cut short by the
    kill is dropped)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get('step', 0) <= step:
                keep.append(line if line.endswith('\n') else line + '\n')
    def write(tmp):
        with open(tmp, 'w') as f:
            f.writelines(keep)
    atomic_write(path, write)


def skip_nonfinite(value, streak, limit, what):
    """A training step whose loss or gradient norm `value` is NaN or inf is skipped (no update): returns
    the new count of consecutive such steps, raising once `limit` are reached in a row (the run stops,
    its last checkpoint intact, rather than skip forever)."""
    if math.isfinite(value):
        return 0
    if streak + 1 >= limit:
        raise FloatingPointError(f'{streak + 1} steps in a row with a non-finite {what} ({value}): stopping '
                                 '(the last checkpoint is intact; lower lr, or check the data and dtype)')
    return streak + 1


def teardown_distributed():
    """Leave torch.distributed together: a rank tearing gloo down while another still talks to it can
    abort the process at exit ('terminate called without an active exception', seen in CI)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
