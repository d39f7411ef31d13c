"""
Speed, compute, memory and quality of a model, each figure measured in one process: a table on stdout and,
with --json=PATH, every figure with the settings that produced it.
$ python bench.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --vocab_size=65   # random weights
$ python bench.py --ckpt=out-shakespeare-char/ckpt.pt --val_data=data/shakespeare_char --json=bench.json
Every row of the report is one function in ROWS; a timed row hands its two paths to time_pair.
"""

import json
import os
import pickle
import resource
import statistics
import sys
import time
from dataclasses import asdict, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import configure_or_exit
from early_exit import CRITERIA, EarlyExitDecoder, exit_logits
from efficient_modules import MoEMLP, TopKMLP, ffn_flops_per_token, set_topk_gather
from evaluate import bits, decode_consistent_loss, evaluate_loss, fixed_windows, teacher_forced_decode_loss
from local_attention import LocalSelfAttention
from model import GPT, MLP, CausalSelfAttention, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from sample import REPO, autocast, fail, pick_device, pick_dtype
from tokenizer import ensure_prepared

# the model measured without --ckpt: random weights, shakespeare_char's size unless overridden
MODEL_ARGS = {**{f.name: f.default for f in fields(GPTConfig)},
              **dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False)}
DEFAULTS = dict(
    ckpt='',  # a checkpoint to measure; empty: a GPT with random weights from the model args below
    data_root=os.path.join(REPO, 'data'),  # where a nanoGPT checkpoint's data/<dataset>/meta.pkl is
    **MODEL_ARGS,
    new_tokens=250,  # N new tokens per decode run: the one-token prompt + N stay inside block_size 256
    runs=5,  # timed runs of each path, alternating A B A B, after a warm-up
    batch=16,  # batch of the batched decode and prefill rows
    rows='all',  # comma list of the ROWS to run
    device='auto',  # auto: cuda, then mps, then cpu
    dtype='auto',  # auto: bfloat16 autocast on a GPU that supports it, else float32
    compile=False,
    threads=0,  # torch threads; 0 keeps torch's default
    seed=1337,  # random weights, prompts and prefill tokens
    val_data='',  # a dataset folder: adds the deterministic validation loss of its val.bin
    val_windows=0,  # score only the first val_windows fixed windows; 0: all of them
    train_batch=8,  # batch of the training-step timing (the CPU benchmark config's)
    json='',  # write every figure and the settings to this path
    # the cached baseline, compared in the same run by the early exit rows (an early-exit checkpoint in --ckpt)
    # and by the against_baseline, pondering and sparse_* rows (any --ckpt of the same depth); empty: those rows
    # are skipped
    baseline='',  # checkpoint of the baseline (e.g. out-bench-baseline/ckpt.pt)
    exit_sweep='max_prob:0.8,0.5,0.3;margin:0.6,0.3,0.1;saturation:0.995,0.99,0.98;learned:0.9,0.8,0.6',  # criterion:thresholds;...
    exit_windows=8,  # decode-consistent val loss over the first exit_windows fixed windows of val.bin
    spec_sweep='1:4,2:4,2:6,3:6',  # self-speculative settings, spec_exit_layer:spec_draft_tokens,...
    long_T='1024,2048,4096',  # local attention: sequence lengths of the training-step row
    long_window=128,  # local attention: window of the training-step row
    long_tokens=16384,  # local attention: tokens of the long decode row (rolling vs full cache)
    stream_tokens=100000,  # local attention: tokens of the streaming row (rolling cache, past block_size)
)


def stats(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), runs=xs)


def time_pair(fn_a, fn_b, runs, work, sync):
    """The timing protocol of every speed row. One untimed warm-up call of each function, then `runs`
    timed calls of each alternating A B A B, so that a noisy neighbour slows both alike. work is
    what one call does (e.g. tokens); sync waits for the device. Returns the warm-up outputs (for
    parity checks) and the stats (median, min, max) of work/s for A and B and of the per-pair A/B."""
    out_a, out_b = fn_a(), fn_b()
    sync()
    rate_a, rate_b = [], []
    for _ in range(runs):
        for fn, rates in ((fn_a, rate_a), (fn_b, rate_b)):
            t0 = time.perf_counter()
            fn()
            sync()
            rates.append(work / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(rate_a, rate_b)]
    return out_a, out_b, dict(a=stats(rate_a), b=stats(rate_b), ratio=stats(ratios))


def decode_pair(b, prompt, n):
    """Greedy decode of n tokens after prompt (B, T): model.generate's cached path vs its reference path."""
    def gen(use_cache):
        return lambda: b.model.generate(prompt, n, temperature=0, use_cache=use_cache)
    cached, reference, t = time_pair(gen(True), gen(False), b.runs, prompt.size(0) * n, b.sync)
    return dict(batch=prompt.size(0), prompt_tokens=prompt.size(1), new_tokens=n, cached_tok_s=t['a'],
                reference_tok_s=t['b'], ratio=t['ratio'], identical_tokens=torch.equal(cached, reference))


def prefill_pair(b, x):
    """One forward over x (B, T): into a fresh KV cache (the cached path) vs without one (reference)."""
    m = b.model
    _, _, t = time_pair(lambda: m(x, cache=m.new_cache(x.size(0))), lambda: m(x), b.runs, x.numel(), b.sync)
    return dict(batch=x.size(0), tokens=x.size(1), cached_tok_s=t['a'], reference_tok_s=t['b'], ratio=t['ratio'])


def decode(b):
    """decode, batch 1, cached / reference"""
    return decode_pair(b, b.prompt[:1], b.new_tokens)


def decode_batch(b):
    """decode, batched, cached / reference"""
    return decode_pair(b, b.prompt, b.new_tokens)


def past_block(b):
    """decode past block_size (2 * block_size tokens), batch 1, cached / reference"""
    # past block_size both paths recompute the cropped context every step; the cached one must still agree
    return decode_pair(b, b.prompt[:1], 2 * b.model.config.block_size)


def prefill(b):
    """prefill, batch 1, one forward over block_size tokens, cached / reference"""
    return prefill_pair(b, b.prefill_x[:1])


def prefill_batch(b):
    """prefill, batched, one forward over block_size tokens, cached / reference"""
    return prefill_pair(b, b.prefill_x)


def dense_flops_per_token(model, ctx):
    """Forward FLOPs of one token that attends to ctx positions in the dense model:
    2 * N + 2 * 2 * n_layer * n_embd * ctx, where N = get_num_params() (every weight but the position
    table; the token table counts once, as the LM head it is tied to) and 2 FLOPs per multiply-add;
    the attention term is q.k over ctx keys plus att.v over ctx values, n_embd multiply-adds each."""
    c = model.config
    return 2 * model.get_num_params() + 2 * 2 * c.n_layer * c.n_embd * ctx


def compute(b):
    """compute per generated token and KV cache, batch 1"""
    m, n = b.model, b.new_tokens
    cache, idx = m.new_cache(1), b.prompt[:1]
    for _ in range(n):  # generate's cached greedy loop, keeping the cache to weigh it
        idx = torch.cat((idx, m.next_logits(idx, cache).argmax(dim=-1, keepdim=True)), dim=1)
    ctx = (n + 1) / 2  # decoding N tokens feeds positions 0 .. N-1, which attend to 1 .. N positions
    return dict(new_tokens=n, mean_ctx=ctx, dense_flops_per_token=dense_flops_per_token(m, ctx),
                dense_flops_per_token_full_block=dense_flops_per_token(m, m.config.block_size),
                kv_cache_positions=cache[-1].len, kv_cache_bytes=sum(c.nbytes for c in cache))


def val_loss(b):
    """validation loss over fixed windows"""
    if not b.val_data:
        return None
    ensure_prepared(b.val_data, ('val.bin',))
    data = np.memmap(os.path.join(b.val_data, 'val.bin'), dtype=np.uint16, mode='r')
    T, V, windows = b.model.config.block_size, b.model.config.vocab_size, b.val_windows or None
    if int(data.max()) >= V:
        fail(f"{b.val_data}/val.bin holds token {int(data.max())}, past the model's vocab_size {V}")
    loss = evaluate_loss(b.model, data, T, b.batch, windows, b.device)  # runs inside main's autocast
    return dict(val_data=b.val_data, windows=len(fixed_windows(data, T, windows)), block_size=T,
                val_loss=loss, val_bits=bits(loss))


def val_memmap(b):
    ensure_prepared(b.val_data, ('val.bin',))
    return np.memmap(os.path.join(b.val_data, 'val.bin'), dtype=np.uint16, mode='r')


def exit_full(b):
    """early-exit model, decode='full' vs the cached baseline, batch 1"""
    if b.baseline is None:
        return None
    prompt, n = b.prompt[:1], b.new_tokens
    _, _, t = time_pair(lambda: b.model.generate(prompt, n, temperature=0),
                        lambda: b.baseline.generate(prompt, n, temperature=0), b.runs, n, b.sync)
    return dict(new_tokens=n, full_tok_s=t['a'], baseline_cached_tok_s=t['b'], ratio=t['ratio'])


def early_exit(b):
    """early exit sweep, batch 1: tok/s vs the cached baseline, decode-consistent val loss, layers, FLOPs"""
    if b.baseline is None or not b.val_data:
        return None
    m, prompt, n, T = b.model, b.prompt[:1], b.new_tokens, b.model.config.block_size
    data = val_memmap(b)
    base = evaluate_loss(b.baseline, data, T, b.batch, b.exit_windows, b.device)
    out = dict(windows=b.exit_windows, tokens_scored=len(fixed_windows(data, T, b.exit_windows)) * T,
               baseline_val_loss=base, full_val_loss=evaluate_loss(m, data, T, b.batch, b.exit_windows, b.device),
               dense_flops_per_token=dense_flops_per_token(b.baseline, (n + 2) / 2))
    kept = m.config.exit_criterion, m.config.exit_threshold
    for criterion, threshold in b.exit_sweep:
        m.config.exit_criterion, m.config.exit_threshold = criterion, threshold
        stats = {}
        _, _, t = time_pair(lambda: m.generate(prompt, n, temperature=0, decode='early_exit', stats=stats),
                            lambda: b.baseline.generate(prompt, n, temperature=0), b.runs, n, b.sync)
        q = decode_consistent_loss(m, data, T, b.exit_windows, device=b.device)
        out[f'{criterion}@{threshold}'] = dict(
            **sweep_speed(t), val_loss=q['loss'], loss_delta=(q['loss'] - base) / base,
            val_exit_layer=q['mean_exit_layer'], gen_exit_layer=stats['mean_exit_layer'],
            flops_per_token=stats['flops_per_token'])
    m.config.exit_criterion, m.config.exit_threshold = kept
    return out


def sweep_speed(t):
    """The speed figures of one sweep setting from time_pair's stats: A's median tok/s and the A/B ratio."""
    r = t['ratio']
    return dict(tok_s=t['a']['median'], ratio=r['median'], ratio_min=r['min'], ratio_max=r['max'])


def speculative(b):
    """self-speculative decode, batch 1, greedy: tok/s vs decode='full' of the same model"""
    if b.baseline is None:
        return None
    m, prompt, n = b.model, b.prompt[:1], b.new_tokens
    out = {}
    kept = m.config.spec_exit_layer, m.config.spec_draft_tokens
    for layers, tokens in b.spec_sweep:
        m.config.spec_exit_layer, m.config.spec_draft_tokens = layers, tokens
        stats = {}
        spec, full, t = time_pair(lambda: m.generate(prompt, n, temperature=0, decode='speculative', stats=stats),
                                  lambda: m.generate(prompt, n, temperature=0), b.runs, n, b.sync)
        out[f'draft {layers} layers x {tokens}'] = dict(
            **sweep_speed(t), full_tok_s=t['b']['median'], identical_tokens=torch.equal(spec, full),
            acceptance_rate=stats['acceptance_rate'], tokens_per_pass=stats['tokens_per_pass'],
            flops_per_token=stats['flops_per_token'])
    m.config.spec_exit_layer, m.config.spec_draft_tokens = kept
    return out


def exit_costs(b):
    """early exit cost breakdown, batch 1, mid-generation (new_tokens / 2 cached positions): microseconds"""
    if b.baseline is None:
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


# --- top-k sparse MLP and mixture of experts (efficient_modules.TopKMLP, MoEMLP) ----------------------------

def ffn_slots(model):
    return [block.mlp for block in model.transformer.h]


def ffn_paths(mlps, other):
    """The inference paths to measure: a top-k model's gathered and masked ones, else one named `other`."""
    return {'gathered': True, 'masked': False} if any(isinstance(x, TopKMLP) for x in mlps) else {other: True}


def sparse_decode(b):
    """top-k / MoE: cached decode vs the cached baseline, batch 1 and batched (top-k: gathered and masked)"""
    mlps = ffn_slots(b.model)
    if not any(isinstance(x, (TopKMLP, MoEMLP)) for x in mlps) or b.baseline_model is None:
        return None
    paths, fig, tokens = ffn_paths(mlps, 'moe'), {}, {}
    for prompt in (b.prompt[:1], b.prompt):
        B = prompt.size(0)
        for name, gather in paths.items():
            set_topk_gather(b.model, gather)
            gen = lambda m: lambda: m.generate(prompt, b.new_tokens, temperature=0)  # noqa: E731
            tokens[name], _, t = time_pair(gen(b.model), gen(b.baseline_model), b.runs, B * b.new_tokens,
                                           b.sync)
            fig.update({f'b{B}_{name}_tok_s': t['a'], f'b{B}_baseline_tok_s': t['b'],
                        f'b{B}_{name}_vs_baseline': t['ratio']})
        if 'masked' in tokens:  # the two top-k paths compute the same function: the same greedy tokens
            fig[f'b{B}_gathered_equals_masked_tokens'] = torch.equal(tokens['gathered'], tokens['masked'])
    set_topk_gather(b.model, True)
    return fig


def sparse_compute(b):
    """top-k / MoE: matmul FLOPs executed per generated token, and expert load (batch-1 greedy decode)"""
    m, mlps = b.model, ffn_slots(b.model)
    if not any(isinstance(x, (TopKMLP, MoEMLP)) for x in mlps):
        return None
    ctx = (b.new_tokens + 1) / 2  # mean positions attended, as in compute
    # dense_flops_per_token counts every weight once; replace the FFN slots' weights by what they execute
    rest = dense_flops_per_token(m, ctx) - 2 * sum(p.numel() for x in mlps for p in x.parameters())
    fig = dict(mean_ctx=ctx, baseline_flops_per_token=dense_flops_per_token(b.baseline_model or m, ctx),
               all_weights_flops_per_token=dense_flops_per_token(m, ctx))
    for name, gather in ffn_paths(mlps, 'executed').items():
        set_topk_gather(m, gather)
        fig[f'{name}_flops_per_token'] = rest + sum(ffn_flops_per_token(x) for x in mlps)
    set_topk_gather(m, True)
    moes = [x for x in mlps if isinstance(x, MoEMLP)]
    if moes:
        for x in moes:
            x.reset_expert_load()
        m.generate(b.prompt[:1], b.new_tokens, temperature=0)
        fig['decode_expert_load_per_layer'] = [[round(f, 3) for f in x.expert_load()] for x in moes]
    return fig


def sparse_quality(b):
    """top-k / MoE: validation loss vs the baseline over the same fixed windows (and expert load on them)"""
    mlps = ffn_slots(b.model)
    if not b.val_data or b.baseline_model is None or not any(isinstance(x, (TopKMLP, MoEMLP)) for x in mlps):
        return None
    data = val_memmap(b)
    T, windows = b.model.config.block_size, b.val_windows or None
    moes = [x for x in mlps if isinstance(x, MoEMLP)]
    for x in moes:
        x.reset_expert_load()
    loss = evaluate_loss(b.model, data, T, b.batch, windows, b.device)
    base = evaluate_loss(b.baseline_model, data, T, b.batch, windows, b.device)
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
        config = EfficientGPTConfig(n_embd=C, bias=b.model.config.bias, sparsity_ratio=b.model.config.sparsity_ratio)
        dense = MLP(config).to(b.device).eval()
        sparse = TopKMLP(config).to(b.device).eval()
        sparse.load_state_dict(dense.state_dict())
        x = torch.randn(1, 1, C, generator=g).to(b.device)
        loop = lambda mlp: lambda: [mlp(x) for _ in range(calls)]  # noqa: E731
        _, _, t = time_pair(loop(sparse), loop(dense), b.runs, calls, b.sync)
        fig.update({f'd{C}_gathered_calls_s': t['a'], f'd{C}_dense_calls_s': t['b'],
                    f'd{C}_gathered_vs_dense': t['ratio'], f'd{C}_gathered_flops': sparse.flops_per_token(),
                    f'd{C}_dense_flops': ffn_flops_per_token(dense)})
    return fig


def memory(b):
    """peak memory of the process (after every row above)"""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = dict(peak_rss_bytes=rss * (1 if sys.platform == 'darwin' else 1024))
    if b.device.startswith('cuda'):
        peak['cuda_max_allocated_bytes'] = torch.cuda.max_memory_allocated()
    return peak


# local attention (issue 5): long-context rows; they run for a model with local attention and skip otherwise
def full_attention(model, **changes):
    """model's twin with every layer full attention (and `changes`), holding model's weights: rotary
    positions have no table, so the state dicts match at any block_size."""
    local_keys = ('enable_local_attention', 'local_attention_window', 'global_layers', 'attention_sinks')
    off = {f.name: f.default for f in fields(EfficientGPTConfig) if f.name in local_keys}
    twin = EfficientGPT(replace(model.config, **off, **changes)).to(model.lm_head.weight.device).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def layer_step(layer, x):
    """forward + backward of one layer on x (B, T, C) against a fixed output gradient"""
    def step():
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
    return step


def local_train_step(b):
    """training step (forward + backward), batch 1, local (window long_window) vs full attention at each
    T of long_T: one attention layer (learned positions), then the whole model (rotary), random weights"""
    c = b.model.config
    if not getattr(c, 'enable_local_attention', False):
        return None
    figures = dict(window=b.long_window)
    with torch.enable_grad():
        for T in (int(t) for t in b.long_T.split(',')):
            cfg = replace(c, block_size=T, local_attention_window=b.long_window, pos_emb='rope', global_layers='none',
                          attention_sinks=0, dropout=0.0)
            layer = CausalSelfAttention(cfg).to(b.device)
            local = LocalSelfAttention(cfg, rope=False).to(b.device)
            local.load_state_dict(layer.state_dict())
            x = torch.randn(1, T, c.n_embd, device=b.device, requires_grad=True)
            _, _, t = time_pair(layer_step(local, x), layer_step(layer, x), b.runs, T, b.sync)
            figures.update({f'layer_T{T}_local_tok_s': t['a'], f'layer_T{T}_full_tok_s': t['b'],
                            f'layer_T{T}_ratio': t['ratio']})
            model = EfficientGPT(cfg).to(b.device).train()
            idx = torch.randint(c.vocab_size, (1, T), device=b.device)
            _, _, t = time_pair(train_step(model, idx), train_step(full_attention(model).train(), idx), b.runs, T,
                                b.sync)
            figures.update({f'model_T{T}_local_tok_s': t['a'], f'model_T{T}_full_tok_s': t['b'],
                            f'model_T{T}_ratio': t['ratio']})
    return figures


def stream(model, cache, tok, n):
    """n greedy tokens after tok (B, 1), fed one at a time into cache; returns the last. Only the newest
    token enters the model, so the loop's own cost does not grow with the context (generate's idx does)."""
    for _ in range(n):
        logits, _ = model(tok, cache=cache)
        tok = logits[:, -1].argmax(dim=-1, keepdim=True)
    return tok


def timed_stream(model, cache, tok, n, sync):
    """stream() timed two ways: wall-clock tok/s, and tok/s of this process's CPU time, which neighbours
    on a shared machine disturb far less (so it shows whether the work per token grows)"""
    wall, cpu = time.perf_counter(), time.process_time()
    tok = stream(model, cache, tok, n)
    sync()
    return tok, n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def rss_bytes():
    """resident memory of the process now (Linux; None elsewhere)"""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return None


def local_decode(b):
    """decode tok/s, batch 1, over the first and the last 1k of long_tokens generated tokens: the rolling
    cache vs the same weights with full attention and a full cache (block_size long_tokens), alternating
    A B A B over 1k-token windows"""
    if not getattr(b.model, 'streams', False):
        return None
    n, window = b.long_tokens, 1024
    full = full_attention(b.model, block_size=n + 1)
    models, caches, toks = (b.model, full), (b.model.new_cache(1), full.new_cache(1)), [b.prompt[:1]] * 2
    wall, cpu = ([], []), ([], [])
    for _ in range(n // window):
        for i in (0, 1):
            toks[i], rate, cpu_rate = timed_stream(models[i], caches[i], toks[i], window, b.sync)
            wall[i].append(rate)
            cpu[i].append(cpu_rate)
    return dict(new_tokens=n, rolling_tok_s_first_1k=wall[0][0], full_tok_s_first_1k=wall[1][0],
                rolling_tok_s_last_1k=wall[0][-1], full_tok_s_last_1k=wall[1][-1],
                ratio_last_1k=wall[0][-1] / wall[1][-1],
                rolling_cpu_tok_s_first_1k=cpu[0][0], full_cpu_tok_s_first_1k=cpu[1][0],
                rolling_cpu_tok_s_last_1k=cpu[0][-1], full_cpu_tok_s_last_1k=cpu[1][-1],
                rolling_kv_cache_bytes=sum(c.nbytes for c in caches[0]),
                full_kv_cache_bytes=sum(c.nbytes for c in caches[1]))


def local_stream(b):
    """streaming generation past block_size, batch 1, rolling cache: KV-cache bytes, resident memory and
    tok/s (wall and CPU time, over the preceding 1k tokens) at 1k, 10k, ... stream_tokens generated tokens"""
    if not getattr(b.model, 'streams', False):
        return None
    cache, tok, window, mark = b.model.new_cache(1), b.prompt[:1], 1000, 1000
    figures, wall, cpu = dict(new_tokens=b.stream_tokens, block_size=b.model.config.block_size), [], []
    for done in range(window, b.stream_tokens + 1, window):
        tok, rate, cpu_rate = timed_stream(b.model, cache, tok, window, b.sync)
        wall.append(rate)
        cpu.append(cpu_rate)
        if done == mark or done == b.stream_tokens:
            figures.update({f'at_{done}_kv_cache_bytes': sum(c.nbytes for c in cache),
                            f'at_{done}_rss_bytes': rss_bytes(), f'at_{done}_tok_s': rate,
                            f'at_{done}_cpu_tok_s': cpu_rate})
            mark *= 10
    figures.update(last_over_first=wall[-1] / wall[0], cpu_last_over_first=cpu[-1] / cpu[0],
                   tok_s_all_1k_windows=stats(wall), cpu_tok_s_all_1k_windows=stats(cpu))
    return figures


# --- hourglass and ACT rows: the model against --baseline (a model of the same depth) ---------------

def executed_flops_per_token(model, ctx, ponder_steps):
    """Forward FLOPs one generated token executes, counted from what ran: 2 per multiply-add of every
    weight used plus q.k and att.v over the keys attended (as dense_flops_per_token; a local layer's
    window bounds them), FFN slots as they execute (ffn_flops_per_token). A shortened layer
    runs once per k tokens over ctx/k keys, and so do pooling and upsampling; a pondering layer runs
    its block ponder_steps[i] times (the measured mean, halting unit included) and one K/V projection
    for each step it skipped."""
    c, C = model.config, model.config.n_embd
    k, plan = c.hierarchy_factor, model.plan

    def layer(block, keys):  # the FFN slot counts what it executes (k units, chosen experts)
        mlp = getattr(block, 'block', block).mlp  # a pondering layer wraps its block
        rest = sum(p.numel() for p in block.parameters()) - sum(p.numel() for p in mlp.parameters())
        return 2 * rest + ffn_flops_per_token(mlp) + 2 * 2 * C * keys

    total = 2 * c.vocab_size * C  # the LM head (the tied token table)
    for i, block in enumerate(model.transformer.h):
        keys, per_token = (ctx / k, 1 / k) if plan.shortened[i] else (ctx, 1)
        if plan.attn[i].startswith('local'):  # a local layer attends to its window at most
            keys = min(keys, c.local_attention_window + c.attention_sinks)
        if plan.ponder[i]:
            steps = ponder_steps[i]
            total += per_token * (steps * layer(block, keys) + (block.max_steps - steps) * 2 * 2 * C * C)
        else:
            total += per_token * layer(block, keys)
    if model.hourglass is not None:
        total += 2 * sum(p.numel() for p in model.hourglass.parameters()) / k
    return total


def decode_counts(model, prompt, n):
    """Greedy decode of n tokens after prompt (1, T), counting what ran: the runs of the first shortened
    layer and the mean ponder steps of each pondering layer (per position fed)."""
    short_runs, steps, hooks = [], {}, []
    if model.hourglass is not None:
        first = model.transformer.h[model.shortened.start]
        hooks.append(first.register_forward_hook(lambda mod, i, o: short_runs.append(o.size(1))))
    for i, block in enumerate(model.transformer.h):
        if model.plan.ponder[i]:
            hooks.append(block.register_forward_hook(lambda mod, inp, o, i=i: steps.setdefault(i, []).append(mod.steps)))
    model.generate(prompt, n, temperature=0)  # feeds positions 0 .. T+n-2
    for h in hooks:
        h.remove()
    mean_steps = {i: torch.cat([s.flatten() for s in v]).float().mean().item() for i, v in steps.items()}
    return len(short_runs), mean_steps


def train_step(model, x):
    """One forward and backward over x (B, T) with the aux losses, as the training loop does."""
    def step():
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            _, loss = model(x, x)
            (loss + sum(w * v for w, v in model.aux_losses().values())).backward()
    return step


def against_baseline(b):
    """the model vs --baseline: training step (fwd+bwd) and decode batch 1"""
    if b.baseline_model is None:
        return None
    m, base, x = b.model, b.baseline_model, b.prefill_x[:b.train_batch]
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
    runs, ponder_steps = decode_counts(m, b.prompt[:1], b.new_tokens)
    ctx = (b.new_tokens + 1) / 2
    return dict(hierarchy_factor=m.config.hierarchy_factor, layers=f"{len(m.pre)} pre / {len(m.shortened)} "
                f"shortened / {len(m.post)} post", shortened_runs_per_token=runs / b.new_tokens,
                executed_flops_per_token=executed_flops_per_token(m, ctx, ponder_steps),
                dense_flops_per_token=dense_flops_per_token(m, ctx))


def pondering(b):
    """ACT: ponder steps on validation text through the decode engine, decode-consistent loss, easy vs hard tokens"""
    m = b.model
    layers = [i for i, p in enumerate(getattr(getattr(m, 'plan', None), 'ponder', ())) if p]
    if not layers or not b.val_data:
        return None
    data = np.memmap(os.path.join(b.val_data, 'val.bin'), dtype=np.uint16, mode='r')
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
    if b.baseline_model is not None:  # easy and hard tokens: the quarters of lowest and highest baseline loss
        starts = fixed_windows(data, T, windows)
        x = torch.from_numpy(np.stack([data[j:j + T] for j in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[j + 1:j + 1 + T] for j in starts]).astype(np.int64))
        base_loss = torch.cat([F.cross_entropy(b.baseline_model(xb.to(b.device), yb.to(b.device))[0].transpose(1, 2).float(),
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
    _, decode_steps = decode_counts(m, b.prompt[:1], b.new_tokens)
    ctx = (b.new_tokens + 1) / 2
    figures.update(same_max_compute_layers=same_max.config.n_layer, decode_tok_s=dec['a'],
                   same_max_compute_decode_tok_s=dec['b'], decode_speedup=dec['ratio'],
                   decode_mean_ponder_steps_by_layer=[round(decode_steps[i], 4) for i in layers],
                   executed_flops_per_token=executed_flops_per_token(m, ctx, decode_steps),
                   same_max_compute_flops_per_token=dense_flops_per_token(same_max, ctx))
    return figures


def decode_profile(b):
    """where batch-1 decode time goes: wall time per token, the part spent inside aten ops (the rest is
    Python, module calls and dispatch), and the ops with the most self time per token (torch.profiler)"""
    from torch.profiler import ProfilerActivity, profile
    n = b.new_tokens
    b.model.generate(b.prompt[:1], n, temperature=0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        b.model.generate(b.prompt[:1], n, temperature=0)
        wall = time.perf_counter() - t0
    ops = sorted((e for e in prof.key_averages() if e.key.startswith('aten::')), key=lambda e: -e.self_cpu_time_total)
    inside = sum(e.self_cpu_time_total for e in ops) / 1e6  # seconds
    figures = dict(wall_us_per_token=1e6 * wall / n, aten_us_per_token=1e6 * inside / n,
                   aten_ops_per_token=sum(e.count for e in ops) / n, outside_ops_fraction=1 - inside / wall)
    for e in ops[:8]:
        figures[f"{e.key.removeprefix('aten::')}_us_per_token"] = e.self_cpu_time_total / n
    return figures


# name -> function(bench) -> dict of figures, or None where the row does not apply; its docstring is
# the row's title. Rows run in this order; memory stays last so that its peak covers all of them.
ROWS = {f.__name__: f for f in (decode, decode_batch, prefill, prefill_batch, past_block, compute, val_loss,
                                exit_full, early_exit, speculative, exit_costs, against_baseline, hourglass,
                                pondering, sparse_decode, sparse_compute, sparse_quality, mlp_micro,
                                local_train_step, local_decode, local_stream, decode_profile, memory)}


def fmt(key, v):
    if isinstance(v, dict) and 'median' not in v:  # one setting of a sweep: its figures on one line
        return ', '.join(f"{k} {fmt(k, x)}" for k, x in v.items())
    if isinstance(v, dict):  # stats of timed runs
        return f"{fmt(key, v['median'])}  ({fmt(key, v['min'])} - {fmt(key, v['max'])})"
    if isinstance(v, bool):
        return 'yes' if v else ('NO' if key == 'identical_tokens' else 'no')  # a parity failure should stand out
    if key.endswith('_bytes'):
        return f"{v / 2**20:.2f} MiB"
    if 'flops' in key:
        return f"{v / 1e6:.2f} MFLOP"
    if isinstance(v, float):
        return (f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}") + ('x' if key.startswith('ratio') else '')
    return f"{v:,}" if key.startswith('params') else str(v)


def load_model(config):
    if not config['ckpt']:
        return GPT(GPTConfig(**{k: config[k] for k in MODEL_ARGS}))
    try:
        model, _ = model_from_checkpoint(load_checkpoint(config['ckpt']), config['data_root'])
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        fail(e)
    return model


def main():
    config = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__)
    rows = list(ROWS) if config['rows'] == 'all' else config['rows'].split(',')
    if unknown := [r for r in rows if r not in ROWS]:
        fail(f"unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    if config['threads']:
        torch.set_num_threads(config['threads'])
    device = pick_device(config['device'])
    dtype = pick_dtype(config['dtype'], device)
    torch.manual_seed(config['seed'])
    model = load_model(config).eval().to(device)
    if config['compile']:
        model.compile()  # compiles model(...), which both generation paths call
    V, T = model.config.vocab_size, model.config.block_size
    early_exit_model = getattr(model.config, 'enable_early_exit', False)
    baseline = load_model({**config, 'ckpt': config['baseline']}).eval().to(device) if config['baseline'] else None
    g = torch.Generator().manual_seed(config['seed'])
    b = SimpleNamespace(
        model=model, device=device, runs=config['runs'], batch=config['batch'], new_tokens=config['new_tokens'],
        long_T=config['long_T'], long_window=config['long_window'], long_tokens=config['long_tokens'],
        stream_tokens=config['stream_tokens'],
        val_data=config['val_data'], val_windows=config['val_windows'],
        baseline=baseline if early_exit_model else None, baseline_model=baseline, baseline_path=config['baseline'],
        train_batch=config['train_batch'], exit_windows=config['exit_windows'], seed=config['seed'],
        exit_sweep=[(c, float(t)) for part in config['exit_sweep'].split(';') for c, ts in [part.split(':')]
                    for t in ts.split(',')],
        spec_sweep=[tuple(map(int, s.split(':'))) for s in config['spec_sweep'].split(',')],
        prompt=torch.randint(V, (config['batch'], 1), generator=g).to(device),  # one-token prompts (B, 1)
        prefill_x=torch.randint(V, (config['batch'], T), generator=g).to(device),  # (B, block_size)
        sync={'cuda': torch.cuda.synchronize, 'mps': torch.mps.synchronize}.get(device.split(':')[0], lambda: None),
    )
    setup = dict(command=' '.join(['python bench.py', *sys.argv[1:]]), model=config['ckpt'] or 'random weights',
                 model_type=type(model).__name__, params=model.get_num_params(non_embedding=False),
                 params_non_embedding=model.get_num_params(), device=device, dtype=dtype,
                 threads=torch.get_num_threads(), torch=torch.__version__, compile=config['compile'],
                 block_size=T, new_tokens=config['new_tokens'], batch=config['batch'], runs=config['runs'],
                 seed=config['seed'], prompt=b.prompt[:, 0].tolist())
    for k, v in setup.items():
        print(f"{k + ':':24} {fmt(k, v)}")
    results = {}
    with torch.no_grad(), autocast(device, dtype):
        for name in rows:
            figures = ROWS[name](b)
            if figures is None:
                continue
            results[name] = figures
            print(f"\n{name}: {ROWS[name].__doc__}")
            for k, v in figures.items():
                print(f"  {k:32} {fmt(k, v)}", flush=True)
    if config['json']:
        with open(config['json'], 'w') as f:
            json.dump(dict(settings=config, setup=setup, model_args=asdict(model.config), rows=results), f, indent=1)
        print(f"\nwrote {config['json']}")


if __name__ == '__main__':
    main()
