"""The hourglass and ACT (hierarchical_modules.Hourglass, efficient_modules.Ponder) against a baseline of the
same depth: training step, decode, the work a generated token executes, and what pondering tracks."""

from dataclasses import fields

import numpy as np
import torch
from torch.nn import functional as F

from bench_rows.protocol import time_pair, train_step, val_memmap
from efficient_modules import Ponder
from evaluate import evaluate_loss, fixed_windows, teacher_forced_decode_loss
from model import GPT, GPTConfig


def ponder_layers(model):
    return [i for i, block in enumerate(model.transformer.h) if isinstance(block, Ponder)]


def counted_decode(model, prompt, n):
    """Greedy decode of n tokens after prompt (1, T), counting what ran: the runs of the first shortened layer
    (returned) and, in each pondering layer itself, its steps (Ponder.mean_steps, read by decode_cost)."""
    short_runs, hooks = [], []
    if model.hourglass is not None:
        first = model.transformer.h[model.shortened.start]
        hooks.append(first.register_forward_hook(lambda mod, i, o: short_runs.append(o.size(1))))
    for i in ponder_layers(model):
        model.transformer.h[i].reset_step_count()
    model.generate(prompt, n, temperature=0)  # feeds positions 0 .. T+n-2
    for h in hooks:
        h.remove()
    return len(short_runs)


def against_baseline(b):
    """the model vs --baseline: training step (fwd+bwd) and decode batch 1"""
    if b.baseline is None:
        return None
    m, base, x = b.model, b.baseline, b.prefill_x[:b.train_batch]
    _, _, train = time_pair(train_step(m, x), train_step(base, x), b.runs, x.numel(), b.sync)
    gen = lambda model: lambda: model.generate(b.prompt[:1], b.new_tokens, temperature=0)  # noqa: E731
    _, _, dec = time_pair(gen(m), gen(base), b.runs, b.new_tokens, b.sync)
    return dict(baseline=b.baseline_path, train_batch=x.size(0), train_tok_s=train['a'],
                baseline_train_tok_s=train['b'], train_speedup=train['ratio'], decode_tok_s=dec['a'],
                baseline_decode_tok_s=dec['b'], decode_speedup=dec['ratio'])


def hourglass(b):
    """hourglass: shortened-layer runs and FLOPs executed per generated token, batch 1"""
    m = b.model
    if getattr(m, 'hourglass', None) is None:
        return None
    runs = counted_decode(m, b.prompt[:1], b.new_tokens)
    ctx = (b.new_tokens + 1) / 2
    return dict(hierarchy_factor=m.config.hierarchy_factor, layers=f"{len(m.pre)} pre / {len(m.shortened)} "
                f"shortened / {len(m.post)} post", shortened_runs_per_token=runs / b.new_tokens,
                executed_flops_per_token=m.decode_cost(ctx).flops,
                dense_flops_per_token=GPT.decode_cost(m, ctx).flops)


def pondering(b):
    """ACT: ponder steps on validation text through the decode engine, decode-consistent loss, easy vs hard tokens"""
    m = b.model
    layers = ponder_layers(m)
    if not layers or not b.val_data:
        return None
    data = val_memmap(b.val_data)
    T, windows, N = m.config.block_size, b.val_windows or None, m.config.max_pondering_steps
    per_step = []  # one (B, len(layers)) tensor of ponder steps per decoded token

    def record(model):
        per_step.append(torch.stack([model.transformer.h[i].steps[:, -1] for i in layers], dim=1))
    loss, scored = teacher_forced_decode_loss(m, data, T, b.batch, windows, b.device, on_step=record)
    # regroup to (windows, T, layers): the engine decodes b.batch windows at a time, T steps each
    steps = torch.cat([torch.stack(per_step[i:i + T], dim=1) for i in range(0, len(per_step), T)]).cpu()
    figures = dict(val_windows=steps.size(0), tokens_scored=scored, decode_consistent_val_loss=loss,
                   forward_val_loss=evaluate_loss(m, data, T, b.batch, windows, b.device),
                   ponder_layers=','.join(map(str, layers)), max_pondering_steps=N,
                   mean_ponder_steps=steps.float().mean().item(),
                   ponder_steps_fractions=[round((steps == n).float().mean().item(), 4) for n in range(1, N + 1)])
    if b.baseline is not None:  # easy and hard tokens: the quarters of lowest and highest baseline loss
        starts = fixed_windows(data, T, windows)
        x = torch.from_numpy(np.stack([data[j:j + T] for j in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[j + 1:j + 1 + T] for j in starts]).astype(np.int64))
        base_loss = torch.cat([F.cross_entropy(b.baseline(xb.to(b.device), yb.to(b.device))[0].transpose(1, 2).float(),
                                               yb.to(b.device), reduction='none').cpu()
                               for xb, yb in zip(x.split(b.batch), y.split(b.batch))])  # (windows, T)
        mean_steps = steps.float().mean(dim=2)  # (windows, T) over the pondering layers
        lo, hi = base_loss.quantile(0.25), base_loss.quantile(0.75)
        figures.update(easy_tokens_mean_steps=mean_steps[base_loss <= lo].mean().item(),
                       hard_tokens_mean_steps=mean_steps[base_loss >= hi].mean().item(),
                       steps_vs_baseline_loss_corr=torch.corrcoef(torch.stack([mean_steps.flatten(),
                                                                               base_loss.flatten()]))[0, 1].item())
    # speed against a plain model with the same maximum compute (every pondering layer run N times)
    gpt_args = {f.name: getattr(m.config, f.name) for f in fields(GPTConfig)}
    same_max = GPT(GPTConfig(**{**gpt_args, 'n_layer': m.config.n_layer + (N - 1) * len(layers)})).eval().to(b.device)
    gen = lambda model: lambda: model.generate(b.prompt[:1], b.new_tokens, temperature=0)  # noqa: E731
    _, _, dec = time_pair(gen(m), gen(same_max), b.runs, b.new_tokens, b.sync)
    counted_decode(m, b.prompt[:1], b.new_tokens)
    ctx = (b.new_tokens + 1) / 2
    figures.update(same_max_compute_layers=same_max.config.n_layer, decode_tok_s=dec['a'],
                   same_max_compute_decode_tok_s=dec['b'], decode_speedup=dec['ratio'],
                   decode_mean_ponder_steps_by_layer=[round(m.transformer.h[i].mean_steps(), 4) for i in layers],
                   executed_flops_per_token=m.decode_cost(ctx).flops,
                   same_max_compute_flops_per_token=same_max.decode_cost(ctx).flops)
    return figures


ROWS = (against_baseline, hourglass, pondering)
