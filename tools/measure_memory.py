"""
Two encoder phases measured alone at Qwen2.5-VL-3B's width, in this process (docs/memory_plan.md):

    python tools/measure_memory.py logprobs [DTYPE B T PROMPT]   # Encoder.token_logprobs + backward
    python tools/measure_memory.py load LLM_DIR [DTYPE LLM_LORA_DIR]   # Encoder.from_pretrained (+ LoRA)

The rehearsal (rehearsal.py) measures whole phases in subprocesses; this reads one call's peak resident memory.
"""
import ctypes
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import run  # noqa: E402
from rehearsal import FULL, GB, LLM_TARGETS, memory, reset_peak  # noqa: E402


def measure(what, *args):
    """python tools/measure_memory.py logprobs [DTYPE B T PROMPT]: the peak resident memory that
    Encoder.token_logprobs with the entropy and its backward add at Qwen2.5-VL-3B's width (vocabulary
    151,936, hidden 2048; 2 LLM layers, LoRA r 32 trained as in G4U, text prompts, Qwen's 274 suppressed
    ids). python tools/measure_memory.py load LLM_DIR [DTYPE LLM_LORA_DIR]: the peak of
    Encoder.from_pretrained (and load_llm_lora), each followed by a read of every weight (a weight
    memory-mapped from its file is resident only once read). One JSON line."""
    from lora import apply_lora
    from model_encoder import Encoder, EncoderConfig
    torch.set_num_threads(1)
    # every block of 1 MB or more mapped afresh and handed back when freed: the resident size then follows
    # the live tensors (glibc's default keeps freed blocks of up to 32 MB, and its heap grows by them)
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    if what == 'load':
        directory, dtype, lora = (list(args) + ['', 'bfloat16', ''][len(args):])[:3]
        reset_peak()
        start = memory()[0]
        # one value per 4 KB page of every weight: a memory-mapped page is resident once read
        touch = lambda: [float(t.view(-1)[::4096 // t.element_size()].sum()) for t in enc.state_dict().values()]
        enc = Encoder.from_pretrained(directory, getattr(torch, dtype))
        touch()
        loaded = memory()
        reset_peak()
        if lora:
            enc.load_llm_lora(lora)
            touch()
        unique = {t.data_ptr(): t for t in enc.state_dict().values()}  # the tied lm_head counted once
        weights = sum(t.numel() * t.element_size() for t in unique.values()) / GB
        out = dict(what=what, dtype=dtype, start_gb=start / GB, load_peak_gb=loaded[1] / GB,
                   loaded_gb=loaded[0] / GB, model_weights_gb=weights)
        if lora:
            out.update(lora_peak_gb=memory()[1] / GB, lora_loaded_gb=memory()[0] / GB)
    elif what == 'logprobs':
        dtype, B, T, L = (list(args) + ['float32', 2, 128, 103][len(args):])[:4]
        B, T, L = int(B), int(T), int(L)
        torch.manual_seed(0)
        torch.set_default_dtype(getattr(torch, dtype))  # made in the dtype: no fp32 copy at bf16
        try:
            enc = Encoder(EncoderConfig(**dict(FULL['llm'], vision_depth=1, fullatt_block_indexes=[0]))).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        enc.requires_grad_(False)
        apply_lora(enc, LLM_TARGETS, 32, 64)
        V = enc.config.vocab_size
        batch = dict(input_ids=torch.randint(0, 151643, (B, L)), attention_mask=torch.ones(B, L, dtype=torch.bool))
        tokens, mask = torch.randint(0, 151643, (B, T)), torch.ones(B, T, dtype=torch.bool)
        suppress = list(range(151665, V)) + [151652, 151653, 151655]
        reset_peak()
        start, t0 = memory()[0], time.time()
        logp, ent = enc.token_logprobs(batch, tokens, mask, 0.7, True, suppress)
        forward = memory()
        logp.sum().backward()
        peak = max(forward[1], memory()[1])
        out = dict(what=what, dtype=dtype, B=B, T=T, prompt=L, start_gb=start / GB, added_gb=(peak - start) / GB,
                   forward_added_gb=(forward[1] - start) / GB, kept_for_backward_gb=(forward[0] - start) / GB,
                   bytes_per_vocab_entry_per_token=(peak - start) / (B * T * V), seconds=time.time() - t0)
    else:
        raise ValueError(f'{what}: logprobs or load')
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == '__main__':
    run(lambda: measure(*sys.argv[1:]))
