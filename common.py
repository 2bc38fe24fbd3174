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
import os
import re
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


def fsync_path(path):
    """Flush a file, or a directory's renames (a file's own fsync does not cover its name), to disk."""
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
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path))
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
    """A JSON file holding an object (every config, index and meta file here does); a missing, cut or
    malformed file is an error naming it."""
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path} not found') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid JSON (cut short?): {e}') from None
    if not isinstance(value, dict):
        raise ValueError(f'{path} must hold a JSON object, got {type(value).__name__}')
    return value


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


def teardown_distributed():
    """Leave torch.distributed together: a rank tearing gloo down while another still talks to it can
    abort the process at exit ('terminate called without an active exception', seen in CI)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_gather_cat(x, world_size):
    """Concatenate a tensor from every rank (rank order), so group statistics see whole groups."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_grads(params, world_size):
    """Sum the LoRA gradients of all ranks (each rank's loss is already normalised by the global count)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):  # torch.cat promoted mixed dtypes
        p.grad = g.view_as(p).to(p.dtype)


def check_ranks_in_sync(named):
    """Raise if the trainable weights differ between ranks, else return their number. Without
    DistributedDataParallel nothing else would notice replicas drifting apart (a missed all-reduce, a
    rank-dependent draw). Element-wise max and min over the ranks agree exactly where all ranks do:
    two all-reduces of one flat copy, instead of gathering every rank's copy on one GPU."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in named.values()])
    hi, lo = flat.clone(), flat.clone()
    torch.distributed.all_reduce(hi, torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, torch.distributed.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        sizes = [p.numel() for p in named.values()]
        bad = [n for n, h, l in zip(named, hi.split(sizes), lo.split(sizes)) if not torch.equal(h, l)]
        raise RuntimeError(f'ranks diverged: {len(bad)} of {len(named)} trainable tensors differ '
                           f'(max |difference| {(hi - lo).max().item():.3g}), e.g. {bad[:3]}')
    return flat.numel()
