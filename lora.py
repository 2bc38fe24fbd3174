"""
Hand-written LoRA, shared by the encoder and the decoder.

A LoRALinear *is* an nn.Linear (same `weight`/`bias` names, so base checkpoints load unchanged) plus
two small matrices: y = x W^T + b + (alpha / r) * (x A^T) B^T, with A (r, in) random and B (out, r) zero,
so a fresh adapter changes nothing. Disabling the adapters gives back the base model without a copy:
that is the RL reference policy. Adapters are saved and loaded in PEFT's format
(adapter_config.json + adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight`), so
UAE's and Flow-GRPO's adapters load here and ours load into diffusers + peft.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import check_state_dict, load_safetensors, save_json, save_safetensors


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank update. Built from an existing layer, sharing its parameters."""

    def __init__(self, base, r, alpha, init='gaussian', use_rslora=False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # fp32 even on a bf16/fp16 base: the adapter is what trains, and AdamW's small updates to a half-precision
        # weight are lost to rounding (its optimizer state would be half precision too)
        kw = dict(bias=False, device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_A = nn.Linear(self.in_features, r, **kw)   # A: (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # B: (out, r)
        self.lora_enabled = True
        self.merged = False
        self.reset_lora(init)

    @torch.no_grad()
    def reset_lora(self, init):
        # the two initialisations PEFT offers: 'gaussian' (std 1/r, UAE's choice) and 'kaiming' (its default)
        if init == 'gaussian':
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        elif init == 'kaiming':
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"unknown LoRA init {init!r}: use 'gaussian' or 'kaiming'")
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled and not self.merged:
            y = y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling).to(y.dtype)
        return y

    def delta_weight(self):
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f'{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}'


def matches(name, targets):
    """PEFT's rule: a list matches a module whose name equals an entry or ends with '.' + entry;
    a string is a regular expression that must match the whole name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith('.' + t) for t in targets)


def _pattern_value(name, pattern, default):
    # PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the name wins
    for key, value in (pattern or {}).items():
        if re.match(rf'(.*\.)?({key})$', name):
            return value
    return default


def target_names(model, targets):
    """Names of the nn.Linear layers of `model` that `targets` matches, in module order."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and matches(n, targets)]


def apply_lora(model, targets, r, alpha, init='gaussian', use_rslora=False,
               rank_pattern=None, alpha_pattern=None):
    """Replace every nn.Linear of `model` whose name matches `targets` by a LoRALinear.

    Returns the names of the wrapped layers; matching nothing is an error (a typo in a target list
    must not train zero parameters silently).
    """
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of {type(model).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name)
        rank = _pattern_value(name, rank_pattern, r)
        layer = LoRALinear(getattr(parent, child), rank, _pattern_value(name, alpha_pattern, alpha),
                           init, use_rslora)
        setattr(parent, child, layer)
    return names


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def base_state_dict(model):
    """The model's state dict without the adapter matrices: the keys of the original checkpoint."""
    return {k: v for k, v in model.state_dict().items() if '.lora_A.' not in k and '.lora_B.' not in k}


def set_lora_enabled(model, enabled):
    for m in lora_layers(model).values():
        if m.merged and not enabled:
            raise RuntimeError('cannot disable a merged LoRA: unmerge it first')
        m.lora_enabled = enabled


@contextlib.contextmanager
def lora_disabled(model):
    """`with lora_disabled(model):` runs the base model (the RL reference policy)."""
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        set_lora_enabled(model, True)


def merge_lora(model):
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model).values():
        m.unmerge()


# -----------------------------------------------------------------------------
# PEFT format

PEFT_PREFIX = 'base_model.model.'


def peft_to_ours(key):
    """Map a PEFT key to our name: strip the wrapper prefix, '.base_layer' and the adapter name."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    key = key.replace('.base_layer.', '.')
    return re.sub(r'\.(lora_[AB])\.[^.]+\.weight$', r'.\1.weight', key)


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if '.lora_A.' in k or '.lora_B.' in k}


def save_peft(model, directory, base_model_name_or_path=None):
    """Write adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained does."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError('the model has no LoRA layers to save')
    ranks = {m.r for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    first = next(iter(layers.values()))
    config = {
        'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': base_model_name_or_path,
        'r': first.r, 'lora_alpha': first.alpha, 'target_modules': sorted(layers),
        'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False, 'init_lora_weights': True,
        'use_rslora': first.scaling != first.alpha / first.r, 'modules_to_save': None,
        # exact per-layer values when layers differ (names are full module names)
        'rank_pattern': {re.escape(n): m.r for n, m in layers.items()} if len(ranks) > 1 else {},
        'alpha_pattern': {re.escape(n): m.alpha for n, m in layers.items()} if len(alphas) > 1 else {},
    }
    os.makedirs(directory, exist_ok=True)
    save_safetensors({PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()},
                     os.path.join(directory, 'adapter_model.safetensors'))
    save_json(config, os.path.join(directory, 'adapter_config.json'))


def read_peft_config(directory):
    path = os.path.join(directory, 'adapter_config.json')
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError:
        raise FileNotFoundError(f'no adapter_config.json in {directory}') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON: {e}') from None
    if config.get('peft_type', 'LORA') != 'LORA':
        raise ValueError(f"{path}: peft_type {config['peft_type']!r} is not LORA")
    for unsupported in ('use_dora', 'modules_to_save'):
        if config.get(unsupported):
            raise ValueError(f'{path}: {unsupported} is not supported')
    if config.get('bias', 'none') != 'none':
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    return config


def load_peft(model, directory):
    """Wrap `model` as the adapter's config says (if not already wrapped) and load its weights strictly."""
    config = read_peft_config(directory)
    if not lora_layers(model):
        apply_lora(model, config['target_modules'], config['r'], config['lora_alpha'],
                   use_rslora=config.get('use_rslora', False),
                   rank_pattern=config.get('rank_pattern'), alpha_pattern=config.get('alpha_pattern'))
    path = os.path.join(directory, 'adapter_model.safetensors')
    if not os.path.exists(path):
        raise FileNotFoundError(f'no adapter_model.safetensors in {directory} (only safetensors is read)')
    state = {peft_to_ours(k): v for k, v in load_safetensors(path).items()}
    load_lora_state_dict(model, state, path)
    return config


def load_lora_state_dict(model, state, source):
    """Load adapter matrices strictly: every LoRA layer must be covered, every key must be a LoRA layer."""
    check_state_dict(lora_state_dict(model), state, source)
    with torch.no_grad():
        for k, v in state.items():
            model.get_parameter(k).copy_(v)
