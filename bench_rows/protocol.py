"""
The timing protocol every speed figure uses, and the small helpers rows share.

A row is a function row(b) -> dict of figures, or None where it does not apply to the model; its docstring
is its title. b is the bench: model, baseline (a cached model to compare against, or None), device, sync,
runs, batch, new_tokens, prompt (B, 1), prefill_x (B, block_size), val_data (a folder or ''), val_windows,
seed and the row-specific settings of bench.py's command line.
"""

import os
import statistics
import time
from itertools import islice

import numpy as np
import torch

from model import decode_tokens
from tokenizer import ensure_prepared


def stats(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), runs=xs)


def time_rounds(fns, runs, work, sync):
    """One untimed warm-up call of each function, then `runs` rounds that call each once in turn (A B C A B C),
    so that a noisy neighbour slows all alike. work is what one call does (e.g. tokens), or a list of each
    function's; sync waits for the device. Returns the warm-up outputs (for parity checks), the stats (median,
    min, max) of each function's work/s, and the stats of the per-round ratio of the first one's to each other's."""
    outs = [fn() for fn in fns]
    sync()
    rates = [[] for _ in fns]
    works = work if isinstance(work, (list, tuple)) else [work] * len(fns)
    for _ in range(runs):
        for fn, r, w in zip(fns, rates, works):
            t0 = time.perf_counter()
            fn()
            sync()
            r.append(w / (time.perf_counter() - t0))
    ratios = [stats([a / b for a, b in zip(rates[0], r)]) for r in rates[1:]]
    return outs, [stats(r) for r in rates], ratios


def time_pair(fn_a, fn_b, runs, work, sync):
    """time_rounds of two functions: the warm-up outputs and dict(a=, b=, ratio=) of the stats (A over B)."""
    (out_a, out_b), (a, b), (ratio,) = time_rounds((fn_a, fn_b), runs, work, sync)
    return out_a, out_b, dict(a=a, b=b, ratio=ratio)


def speed(t):
    """A sweep setting's speed figures from time_pair's stats: A's median work/s and the A/B ratio."""
    r = t['ratio']
    return dict(tok_s=t['a']['median'], ratio=r['median'], ratio_min=r['min'], ratio_max=r['max'])


def greedy(model, batch_size=1):
    """A greedy token stream of the model's cached decode: (generator over prompt -> tokens, its cache).
    Pull tokens with islice; the cache stays readable (KV bytes) and the stream can continue."""
    cache = model.new_cache(batch_size)

    def stream(prompt, n):
        return decode_tokens(lambda idx: model.next_logits(idx, cache), prompt, n,
                             lambda logits: logits.argmax(dim=-1, keepdim=True))
    return stream, cache


def timed(tokens, n, sync):
    """Pull n tokens from a token stream, timed two ways: wall-clock tok/s, and tok/s of this process's CPU
    time, which neighbours on a shared machine disturb far less (so it shows whether work per token grows)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in islice(tokens, n):
        pass
    sync()
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def train_step(model, x):
    """One forward and backward over x (B, T) with the aux losses, as the training loop does."""
    def step():
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            _, loss = model(x, x)
            (loss + sum(w * v for w, v in model.aux_losses().values())).backward()
    return step


def val_memmap(folder):
    ensure_prepared(folder, ('val.bin',))
    return np.memmap(os.path.join(folder, 'val.bin'), dtype=np.uint16, mode='r')


def rss_bytes():
    """Resident memory of the process now (Linux; None elsewhere)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return None
