"""Top-k sparse MLPs and mixture-of-experts MLPs (efficient_modules.TopKMLP, MoEMLP) against the baseline, and
TEAL's training-free sparsity (efficient_modules.TEALMLP) on a dense checkpoint against the same checkpoint."""

import copy
import os

import numpy as np
import torch

from bench_rows.protocol import time_pair, val_memmap
from common import fail
from efficient_modules import (CALIBRATION_WINDOWS, MoEMLP, TopKMLP, calibration_windows, dense_mlp_holders,
                               set_teal_gather, set_topk_gather, teal_measured_sparsity, teal_sparsify)
from evaluate import evaluate_loss, fixed_windows
from model import MLP
from model_efficient import EfficientGPTConfig
from tokenizer import ensure_prepared


def ffn_slots(model):
    return [getattr(block, 'block', block).mlp for block in model.transformer.h]


def applies(model):
    return any(isinstance(x, (TopKMLP, MoEMLP)) for x in ffn_slots(model))


def ffn_paths(model, other):
    """The inference paths to measure: a top-k model's gathered and masked ones, else one named `other`."""
    return {'gathered': True, 'masked': False} if any(isinstance(x, TopKMLP) for x in ffn_slots(model)) else {other: True}


def sparse_decode(b):
    """top-k / MoE: cached decode vs the cached baseline, batch 1 and batched (top-k: gathered and masked)"""
    if not applies(b.model) or b.baseline is None:
        return None
    paths, fig, tokens = ffn_paths(b.model, 'moe'), {}, {}
    for prompt in (b.prompt[:1], b.prompt):
        B = prompt.size(0)
        for name, gather in paths.items():
            set_topk_gather(b.model, gather)
            gen = lambda m: lambda: m.generate(prompt, b.new_tokens, temperature=0)  # noqa: E731
            tokens[name], _, t = time_pair(gen(b.model), gen(b.baseline), b.runs, B * b.new_tokens, b.sync)
            fig.update({f'b{B}_{name}_tok_s': t['a'], f'b{B}_baseline_tok_s': t['b'],
                        f'b{B}_{name}_vs_baseline': t['ratio']})
        if 'masked' in tokens:  # the two top-k paths compute the same function: the same greedy tokens
            fig[f'b{B}_gathered_equals_masked_tokens'] = torch.equal(tokens['gathered'], tokens['masked'])
    set_topk_gather(b.model, True)
    return fig


def sparse_compute(b):
    """top-k / MoE: FLOPs and weight bytes executed per generated token, and expert load (batch-1 greedy decode)"""
    m = b.model
    if not applies(m):
        return None
    ctx = (b.new_tokens + 1) / 2  # mean positions attended, as in the compute row
    base = (b.baseline or m).decode_cost(ctx)
    fig = dict(mean_ctx=ctx, baseline_flops_per_token=base.flops, baseline_weight_bytes_per_token=base.weight_bytes)
    for name, gather in ffn_paths(m, 'executed').items():
        set_topk_gather(m, gather)
        cost = m.decode_cost(ctx)
        fig.update({f'{name}_flops_per_token': cost.flops, f'{name}_weight_bytes_per_token': cost.weight_bytes})
    set_topk_gather(m, True)
    moes = [x for x in ffn_slots(m) if isinstance(x, MoEMLP)]
    if moes:
        for x in moes:
            x.reset_expert_load()
        m.generate(b.prompt[:1], b.new_tokens, temperature=0)
        fig['decode_expert_load_per_layer'] = [[round(f, 3) for f in x.expert_load()] for x in moes]
    return fig


def sparse_quality(b):
    """top-k / MoE: validation loss vs the baseline over the same fixed windows (and expert load on them)"""
    if not b.val_data or b.baseline is None or not applies(b.model):
        return None
    data = val_memmap(b.val_data)
    T, windows = b.model.config.block_size, b.val_windows or None
    moes = [x for x in ffn_slots(b.model) if isinstance(x, MoEMLP)]
    for x in moes:
        x.reset_expert_load()
    loss = evaluate_loss(b.model, data, T, b.batch, windows, b.device)
    base = evaluate_loss(b.baseline, data, T, b.batch, windows, b.device)
    fig = dict(windows=len(fixed_windows(data, T, windows)), val_loss=loss, baseline_val_loss=base,
               quality_delta=(loss - base) / base)
    if moes:
        fig['val_expert_load_per_layer'] = [[round(f, 3) for f in x.expert_load()] for x in moes]
    return fig


def mlp_micro(b):
    """per-MLP microbenchmark, one token: gathered top-k vs dense MLP (same weights) at 128, 384, 768 dims"""
    if not any(isinstance(x, TopKMLP) for x in ffn_slots(b.model)):
        return None
    fig, calls = dict(sparsity_ratio=b.model.config.sparsity_ratio, calls_per_run=100), 100
    g = torch.Generator().manual_seed(b.seed)
    for C in (128, 384, 768):
        config = EfficientGPTConfig(n_embd=C, n_head=1, bias=b.model.config.bias,
                                    sparsity_ratio=b.model.config.sparsity_ratio)
        dense = MLP(config).to(b.device).eval()
        sparse = TopKMLP(config).to(b.device).eval()
        sparse.load_state_dict(dense.state_dict())
        x = torch.randn(1, 1, C, generator=g).to(b.device)
        loop = lambda mlp: lambda: [mlp(x) for _ in range(calls)]  # noqa: E731
        _, _, t = time_pair(loop(sparse), loop(dense), b.runs, calls, b.sync)
        fig.update({f'd{C}_gathered_calls_s': t['a'], f'd{C}_dense_calls_s': t['b'],
                    f'd{C}_gathered_vs_dense': t['ratio'], f'd{C}_gathered_flops': sparse.cost().flops,
                    f'd{C}_dense_flops': dense.cost().flops})
    return fig


def teal_levels(text):
    """bench.py's --teal_sparsity: a comma list of fractions in (0, 1), e.g. '0.25,0.5'; '' runs no TEAL row."""
    try:
        levels = [float(x) for x in text.split(',') if x.strip()]
    except ValueError:
        levels = None
    if levels is None or not all(0 < x < 1 for x in levels):
        fail(f"--teal_sparsity={text!r}: a comma list of the fractions of MLP activations to drop, each in (0, 1), "
             f"e.g. '0.25,0.5'")
    return levels


def teal(b):
    """TEAL on the dense MLPs, per --teal_sparsity: val loss and cached decode vs the same dense model"""
    # thresholds set on training windows, the sparsity they give measured on validation windows
    if not b.teal_sparsity or not b.val_data or not dense_mlp_holders(b.model):
        return None
    ensure_prepared(b.val_data, ('train.bin',))
    train = np.memmap(os.path.join(b.val_data, 'train.bin'), dtype=np.uint16, mode='r')
    val = val_memmap(b.val_data)
    T, windows = b.model.config.block_size, b.val_windows or None
    calib = calibration_windows(train, T, CALIBRATION_WINDOWS).to(b.device)  # (16, T)
    held_out = calibration_windows(val, T, CALIBRATION_WINDOWS).to(b.device)
    dense_loss = evaluate_loss(b.model, val, T, b.batch, windows, b.device)
    ctx = (b.new_tokens + 1) / 2
    fig = dict(calibration_windows=CALIBRATION_WINDOWS, val_windows=len(fixed_windows(val, T, windows)),
               dense_val_loss=dense_loss, dense_flops_per_token=b.model.decode_cost(ctx).flops)
    for level in b.teal_sparsity:
        sparse = copy.deepcopy(b.model)
        thresholds = teal_sparsify(sparse, level, calib)
        loss = evaluate_loss(sparse, val, T, b.batch, windows, b.device)
        out = dict(thresholds=[round(t, 4) for t in thresholds],
                   val_sparsity=[round(x, 3) for x in teal_measured_sparsity(sparse, held_out)],
                   val_loss=loss, loss_delta=(loss - dense_loss) / dense_loss,
                   flops_per_token=sparse.decode_cost(ctx).flops)
        for prompt in (b.prompt[:1], b.prompt):
            B = prompt.size(0)
            gen = lambda m: lambda: m.generate(prompt, b.new_tokens, temperature=0)  # noqa: E731
            tokens, _, t = time_pair(gen(sparse), gen(b.model), b.runs, B * b.new_tokens, b.sync)
            out.update({f'b{B}_tok_s': t['a']['median'], f'b{B}_dense_tok_s': t['b']['median'],
                        f'b{B}_vs_dense': t['ratio']['median'], f'b{B}_vs_dense_min': t['ratio']['min'],
                        f'b{B}_vs_dense_max': t['ratio']['max']})
            set_teal_gather(sparse, False)  # the masked reference decodes the same greedy tokens
            out[f'b{B}_gathered_equals_masked_tokens'] = torch.equal(tokens, gen(sparse)())
            set_teal_gather(sparse, True)
        fig[f'sparsity {level}'] = out
    return fig


ROWS = (sparse_decode, sparse_compute, sparse_quality, mlp_micro, teal)
