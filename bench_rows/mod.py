"""Mixture-of-Depths (efficient_modules.MixtureOfDepths) against a baseline: how many layer-steps a token runs, how
well the causal predictor agrees with training's top-k, speed (decode batch 1 and batched, training step) and the
decode-consistent validation loss."""

import torch
from torch.nn import functional as F

from bench_rows.protocol import time_pair, train_step, val_memmap
from efficient_modules import MixtureOfDepths, set_mod_routing
from evaluate import evaluate_loss, teacher_forced_decode_loss, window_batches


def routed_layers(model):
    return [i for i, block in enumerate(model.transformer.h) if isinstance(block, MixtureOfDepths)]


def fractions_run(model, layers):
    return [model.transformer.h[i].fraction_run() for i in layers]


def reset_counts(model, layers):
    for i in layers:
        model.transformer.h[i].reset_counts()


@torch.no_grad()
def predictor_agreement(model, layers, data, T, batch, windows, device):
    """Training's semantics (top-k over each window, set_mod_routing) over the fixed windows: per routed layer, the
    fraction of tokens where the decode decision sigmoid(logit) > 0.5 equals top-k membership, and the fraction of
    the top-k tokens that the predictor would also run."""
    set_mod_routing(model, True)
    agree, hits, top, n = [0.0] * len(layers), [0.0] * len(layers), [0.0] * len(layers), 0
    for x, _ in window_batches(data, T, batch, windows, device):
        model(x)
        for j, i in enumerate(layers):
            layer = model.transformer.h[i]
            predicted, chosen = layer.logits > 0, layer.chosen
            agree[j] += (predicted == chosen).sum().item()
            hits[j] += (predicted & chosen).sum().item()
            top[j] += chosen.sum().item()
        n += x.numel()
    set_mod_routing(model, False)
    return [a / n for a in agree], [h / t for h, t in zip(hits, top)]


@torch.no_grad()
def difficulty(model, layers, baseline, data, T, batch, windows, device):
    """Does routing follow difficulty? Per routed layer, the baseline's mean loss on the tokens that ran it and on
    those that skipped it (decode's decisions: the eval forward routes as decode does)."""
    ran, skipped = [[] for _ in layers], [[] for _ in layers]
    for x, y in window_batches(data, T, batch, windows, device):
        base_loss = F.cross_entropy(baseline(x, y)[0].transpose(1, 2).float(), y, reduction='none')  # (B, T)
        model(x)
        for j, i in enumerate(layers):
            chosen = model.transformer.h[i].chosen
            ran[j].append(base_loss[chosen])
            skipped[j].append(base_loss[~chosen])
    mean = lambda parts: round(torch.cat(parts).mean().item(), 4)  # noqa: E731
    return dict(baseline_loss_of_tokens_run_by_layer=[mean(p) for p in ran],
                baseline_loss_of_tokens_skipped_by_layer=[mean(p) for p in skipped])


def training_steps(model, x):
    """A training step (forward with training's top-k routing, backward) for time_pair."""
    step = train_step(model, x)

    def run():
        model.train()
        step()
        model.eval()
    return run


def mixture_of_depths(b):
    """MoD: layer-steps run per token, predictor vs top-k, decode and training step vs --baseline, decode-consistent loss"""
    m = b.model
    layers = routed_layers(m)
    if not layers:
        return None
    L, T = m.config.n_layer, m.config.block_size
    figures = dict(routed_layers=','.join(map(str, layers)), capacity=m.config.mod_capacity)
    if b.val_data:
        data, windows = val_memmap(b.val_data), b.val_windows or None
        reset_counts(m, layers)
        loss, scored = teacher_forced_decode_loss(m, data, T, b.batch, windows, b.device)
        run = fractions_run(m, layers)
        agree, recall = predictor_agreement(m, layers, data, T, b.batch, windows, b.device)
        set_mod_routing(m, True)
        topk_loss = evaluate_loss(m, data, T, b.batch, windows, b.device)
        set_mod_routing(m, False)
        figures.update(tokens_scored=scored, decode_consistent_val_loss=loss,
                       forward_val_loss=evaluate_loss(m, data, T, b.batch, windows, b.device),
                       top_k_forward_val_loss=topk_loss, decode_fraction_run_by_layer=[round(f, 4) for f in run],
                       decode_fraction_run=sum(run) / len(run), layer_steps_run_per_token=L - len(layers) + sum(run),
                       predictor_agrees_with_top_k_by_layer=[round(a, 4) for a in agree],
                       top_k_tokens_predicted_by_layer=[round(r, 4) for r in recall])
        if b.baseline is not None:
            base = evaluate_loss(b.baseline, data, T, b.batch, windows, b.device)
            figures.update(baseline_val_loss=base, val_loss_delta=(loss - base) / base,
                           **difficulty(m, layers, b.baseline, data, T, b.batch, windows, b.device))
    if b.baseline is None:
        return figures
    gen = lambda model, prompt: lambda: model.generate(prompt, b.new_tokens, temperature=0)  # noqa: E731
    for prompt in (b.prompt[:1], b.prompt):
        B = prompt.size(0)
        reset_counts(m, layers)
        _, _, t = time_pair(gen(m, prompt), gen(b.baseline, prompt), b.runs, B * b.new_tokens, b.sync)
        figures.update({f'b{B}_tok_s': t['a'], f'b{B}_baseline_tok_s': t['b'], f'b{B}_vs_baseline': t['ratio'],
                        f'b{B}_generation_fraction_run': sum(fractions_run(m, layers)) / len(layers)})
    reset_counts(m, layers)
    m.generate(b.prompt[:1], b.new_tokens, temperature=0)  # the FLOPs of batch-1 generation, counted as it ran
    ctx = (b.new_tokens + 1) / 2
    x = b.prefill_x[:b.train_batch]
    _, _, train = time_pair(training_steps(m, x), training_steps(b.baseline, x), b.runs, x.numel(), b.sync)
    figures.update(executed_flops_per_token=m.decode_cost(ctx).flops,
                   baseline_flops_per_token=b.baseline.decode_cost(ctx).flops, train_batch=x.size(0),
                   train_tok_s=train['a'], baseline_train_tok_s=train['b'], train_step_vs_baseline=train['ratio'],
                   train_step_time_vs_baseline=1 / train['ratio']['median'])
    return figures


ROWS = (mixture_of_depths,)
