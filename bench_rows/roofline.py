"""
The decode roofline. At batch 1 a generated token multiplies one vector by every weight matrix it uses (a
GEMV each), so once the weights outgrow the caches, decode can go no faster than this machine reads them:
tokens/s <= (weight-read speed) / (weight bytes per token). The read speed is measured here with the same
GEMV kernel over the model's own matrices and nothing else; the model's cost model (decode_cost) gives its
bytes per token.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from bench_rows.protocol import time_rounds


def weight_matrices(model):
    """Every nn.Linear weight of the model (the matrices decode multiplies by), detached."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]


def gemv_sweeps(weights, sweeps):
    """A function that runs GEMVs y = W x over every matrix in turn, `sweeps` times (so a set larger than the
    caches streams from memory, as decode reads it), and the bytes of weights it reads."""
    vectors = [torch.randn(1, w.size(1), dtype=w.dtype, device=w.device) for w in weights]  # (1, in)

    def run():
        for _ in range(sweeps):
            for w, x in zip(weights, vectors):
                F.linear(x, w)
    return run, sweeps * sum(w.nbytes for w in weights)


def decode_sized_sweep(model, tokens, per_token):
    """gemv_sweeps over the model's matrices reading as many bytes as decoding `tokens` tokens of per_token bytes
    does, so that both are timed over the same traffic."""
    weights = weight_matrices(model)
    return gemv_sweeps(weights, max(1, round(tokens * per_token / sum(w.nbytes for w in weights))))


def threaded(fn, threads):
    def run():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fn()
        finally:
            torch.set_num_threads(previous)
    return run


def roofline(b):
    """decode roofline: GEMV weight-read speed over the model's own matrices (1 thread and all), the weight
    bytes a generated token reads, and the share of the roofline that batch-1 greedy decode reaches"""
    m, n, threads = b.model, b.new_tokens, torch.get_num_threads()
    per_token = m.decode_cost((n + 1) / 2).weight_bytes  # mean positions attended, as compute() counts them
    sweep, read = decode_sized_sweep(m, n, per_token)  # timed in turn with the decode: a neighbour slows both alike
    counts = sorted({1, threads, os.cpu_count() or 1})
    _, (decode, *speeds), _ = time_rounds([lambda: m.generate(b.prompt[:1], n, temperature=0),
                                           *(threaded(sweep, t) for t in counts)], b.runs, [n] + [read] * len(counts),
                                          b.sync)
    speed = dict(zip(counts, speeds))[threads]['median']
    return dict(weight_bytes_per_token=per_token, **{f'read_GB_s_{t}_threads': s['median'] / 1e9
                                                     for t, s in zip(counts, speeds)},
                decode_threads=threads, decode_tok_s=decode['median'], roofline_tok_s=speed / per_token,
                roofline_fraction=decode['median'] * per_token / speed)

