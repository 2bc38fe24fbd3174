"""
Training checkpoints: a directory written whole or not at all, read back strictly, and the run folder
around it (its log, and a new run's refusal to overwrite an earlier one). train_sft.py and train_rl.py
save and resume with these.

save_checkpoint writes every file into ckpt.tmp, meta.json last (so a directory holding meta.json is
complete), then renames ckpt -> ckpt.old, ckpt.tmp -> ckpt and deletes ckpt.old. Whatever instant a
kill hits, one complete checkpoint is left: the newest is ckpt.tmp if it is complete, else ckpt, else
ckpt.old (between the two renames). find_checkpoint returns it; the next save finishes the swap first.
"""
import json
import math
import os
import shutil

import torch

from common import (atomic_write, fsync_path, load_safetensors, read_json, save_json, save_safetensors,
                    state_dict_problems)


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
    fsync_path(os.path.dirname(directory))


def save_checkpoint(directory, weights, meta):
    """Write directory/<name>.safetensors for each {name: state_dict} of `weights` and meta.json, crash-safe
    (see above). Non-finite weights are refused (save_safetensors checks them) and leave nothing behind."""
    finish_swap(directory)
    tmp, old = directory + '.tmp', directory + '.old'
    os.makedirs(tmp)
    try:
        for name, state in weights.items():
            save_safetensors(state, os.path.join(tmp, f'{name}.safetensors'))
    except ValueError:
        _remove(tmp)  # incomplete (no meta.json yet): the previous checkpoint is still the newest
        raise
    save_json(meta, os.path.join(tmp, 'meta.json'))  # last: from here on tmp is the newest checkpoint
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_path(os.path.dirname(directory))
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
