"""Early exit and self-speculative decoding (early_exit.py) against the cached baseline."""

import statistics
import time

import torch

from bench_rows.protocol import speed, time_pair, val_memmap
from early_exit import CRITERIA, DecodeSteps, EarlyExitDecoder, exit_logits
from model import decode_tokens
from evaluate import decode_consistent_loss, evaluate_loss, fixed_windows


def applies(b):
    return b.baseline is not None and getattr(b.model.config, 'enable_early_exit', False)


def exit_full(b):
    """early-exit model, decode='full' vs the cached baseline, batch 1"""
    if not applies(b):
        return None
    prompt, n = b.prompt[:1], b.new_tokens
    _, _, t = time_pair(lambda: b.model.generate(prompt, n, temperature=0),
                        lambda: b.baseline.generate(prompt, n, temperature=0), b.runs, n, b.sync)
    return dict(new_tokens=n, full_tok_s=t['a'], baseline_cached_tok_s=t['b'], ratio=t['ratio'])


def early_exit(b):
    """early exit sweep, batch 1: tok/s vs the cached baseline, decode-consistent val loss, layers, FLOPs"""
    if not applies(b) or not b.val_data:
        return None
    m, n, T = b.model, b.new_tokens, b.model.config.block_size
    data = val_memmap(b.val_data)
    base = evaluate_loss(b.baseline, data, T, b.batch, b.exit_windows, b.device)
    out = dict(windows=b.exit_windows, tokens_scored=len(fixed_windows(data, T, b.exit_windows)) * T,
               baseline_val_loss=base, full_val_loss=evaluate_loss(m, data, T, b.batch, b.exit_windows, b.device),
               dense_flops_per_token=b.baseline.decode_cost((n + 2) / 2).flops)
    for criterion, threshold in b.exit_sweep:
        _, t, stats = engine_pair(b, b.baseline, decode='early_exit', criterion=criterion, threshold=threshold)
        q = decode_consistent_loss(m, data, T, b.exit_windows, criterion, threshold, b.device)
        out[f'{criterion}@{threshold}'] = dict(
            **speed(t), val_loss=q['loss'], loss_delta=(q['loss'] - base) / base,
            val_exit_layer=q['mean_exit_layer'], gen_exit_layer=stats['mean_exit_layer'],
            flops_per_token=stats['flops_per_token'])
    return out


def engine_pair(b, other, **policy):
    """Greedy batch-1 decode of the model with a decode engine and policy, timed against other's full cached
    decode: (whether the tokens are identical, time_pair's stats, what the engine measured)."""
    prompt, n, stats = b.prompt[:1], b.new_tokens, {}
    a, ref, t = time_pair(lambda: b.model.generate(prompt, n, temperature=0, stats=stats, **policy),
                          lambda: other.generate(prompt, n, temperature=0), b.runs, n, b.sync)
    return torch.equal(a, ref), t, stats


def steps_full_decode(model, prompt, n):
    """Greedy full-depth decode through the speculative engine's DecodeSteps (every layer, one token a step):
    the control that tells what speculation gains from what fewer ops per layer gain."""
    with torch.inference_mode():
        steps, cache = DecodeSteps(model), model.new_cache(prompt.size(0))

        def next_logits(idx):
            pos = cache[-1].len
            x = model.run_trunk(steps.embed(idx[:, pos:], pos), cache)
            for l in model.post:
                x = steps.layers[l](x, cache[l])
            return steps.head(x)[:, -1]
        greedy = lambda logits: logits.argmax(dim=-1, keepdim=True)  # noqa: E731
        return torch.cat((prompt, *decode_tokens(next_logits, prompt, n, greedy)), dim=1)


def speculative(b):
    """self-speculative decode, batch 1, greedy: tok/s vs decode='full' of the same model, and vs full-depth
    decode through the engine's own steps (speculation alone)"""
    if not applies(b):
        return None
    prompt, n = b.prompt[:1], b.new_tokens
    steps_full = lambda: steps_full_decode(b.model, prompt, n)  # noqa: E731
    a, ref, t = time_pair(steps_full, lambda: b.model.generate(prompt, n, temperature=0), b.runs, n, b.sync)
    out = dict(steps_full_vs_full=dict(**speed(t), identical_tokens=torch.equal(a, ref)))
    for layers, tokens, *confidence in b.spec_sweep:
        policy = dict(decode='speculative', draft_layers=layers, draft_tokens=tokens,
                      draft_confidence=confidence[0] if confidence else 0.0)
        identical, t, stats = engine_pair(b, b.model, **policy)
        _, _, t_steps = time_pair(lambda: b.model.generate(prompt, n, temperature=0, **policy), steps_full, b.runs, n,
                                  b.sync)
        stop = f', stop under {confidence[0]}' if confidence else ''
        out[f'draft {layers} layers x {tokens}{stop}'] = dict(
            **speed(t), full_tok_s=t['b']['median'], identical_tokens=identical,
            ratio_vs_steps_full=t_steps['ratio']['median'], acceptance_rate=stats['acceptance_rate'],
            tokens_per_pass=stats['tokens_per_pass'], flops_per_token=stats['flops_per_token'])
    return out


def speculative_batch(b):
    """self-speculative decode, batched, greedy: tok/s vs decode='full' of the same model at the same batch"""
    if not applies(b):
        return None
    prompt, n, out = b.prompt, b.new_tokens, {}
    for layers, tokens, *confidence in b.spec_sweep:
        stats = {}
        policy = dict(decode='speculative', draft_layers=layers, draft_tokens=tokens,
                      draft_confidence=confidence[0] if confidence else 0.0)
        a, ref, t = time_pair(lambda: b.model.generate(prompt, n, temperature=0, stats=stats, **policy),
                              lambda: b.model.generate(prompt, n, temperature=0), b.runs, n * prompt.size(0), b.sync)
        stop = f', stop under {confidence[0]}' if confidence else ''
        out[f'batch {prompt.size(0)}, draft {layers} layers x {tokens}{stop}'] = dict(
            **speed(t), full_tok_s=t['b']['median'], identical_tokens=torch.equal(a, ref),
            acceptance_rate=stats['acceptance_rate'], tokens_per_pass=stats['tokens_per_pass'])
    return out


def exit_costs(b):
    """early exit cost breakdown, batch 1, mid-generation (new_tokens / 2 cached positions): microseconds"""
    if not applies(b):
        return None
    m, base, ctx = b.model, b.baseline, b.new_tokens // 2
    dec, base_cache = EarlyExitDecoder(m, threshold=2.0), base.new_cache(1)  # threshold 2: runs every layer
    for t in torch.randint(m.config.vocab_size, (ctx,), generator=torch.Generator().manual_seed(0)):
        dec.step(t.view(1, 1))
        base(t.view(1, 1), cache=base_cache)
    x = m.embed(b.prompt[:1], ctx)  # (1, 1, C)

    def us(fn, calls=200, repeats=5):
        """Median over repeats of the mean time of one call, in microseconds; caches are rolled back."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
                for c in (*dec.cache, *base_cache):
                    c.truncate(ctx)
            b.sync()
            times.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(times)

    out = dict(cached_positions=ctx, baseline_block_us=us(lambda: base.transformer.h[0](x, base_cache[0])),
               block_us=us(lambda: m.transformer.h[0](x, dec.cache[0])), head_us=us(lambda: exit_logits(m, x)),
               truncate_only_us=us(lambda: None))
    for name, criterion in CRITERIA.items():  # the check after layer 0, with its one host sync
        out[f'check_{name}_us'] = us(lambda: criterion(m, 0, x, x)[0].item())
    for layer in (0, m.config.n_layer // 2):
        if m.plan.exit[layer]:
            out[f'propagate_from_layer_{layer + 1}_us'] = us(lambda: dec.propagate(x, layer))
    return out


ROWS = (exit_full, early_exit, speculative, speculative_batch, exit_costs)
