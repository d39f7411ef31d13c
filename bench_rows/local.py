"""Local attention and the rolling cache (local_attention.py): long-context rows; they run for a model with
local attention and skip otherwise."""

from dataclasses import fields, replace

import torch

from bench_rows.protocol import greedy, rss_bytes, stats, time_pair, timed, train_step
from local_attention import LocalSelfAttention
from model import CausalSelfAttention
from model_efficient import EfficientGPT, EfficientGPTConfig


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


def local_decode(b):
    """decode tok/s, batch 1, over the first and the last 1k of long_tokens generated tokens: the rolling
    cache vs the same weights with full attention and a full cache (block_size long_tokens), alternating
    A B A B over 1k-token windows"""
    if not getattr(b.model, 'streams', False):
        return None
    n, window = b.long_tokens, 1024
    full = full_attention(b.model, block_size=n + 1)
    streams = [greedy(m) for m in (b.model, full)]  # (token stream, cache) of each
    tokens = [stream(b.prompt[:1], n) for stream, _ in streams]
    wall, cpu = ([], []), ([], [])
    for _ in range(n // window):
        for i in (0, 1):
            rate, cpu_rate = timed(tokens[i], window, b.sync)
            wall[i].append(rate)
            cpu[i].append(cpu_rate)
    return dict(new_tokens=n, rolling_tok_s_first_1k=wall[0][0], full_tok_s_first_1k=wall[1][0],
                rolling_tok_s_last_1k=wall[0][-1], full_tok_s_last_1k=wall[1][-1],
                ratio_last_1k=wall[0][-1] / wall[1][-1],
                rolling_cpu_tok_s_first_1k=cpu[0][0], full_cpu_tok_s_first_1k=cpu[1][0],
                rolling_cpu_tok_s_last_1k=cpu[0][-1], full_cpu_tok_s_last_1k=cpu[1][-1],
                rolling_kv_cache_bytes=sum(c.nbytes for c in streams[0][1]),
                full_kv_cache_bytes=sum(c.nbytes for c in streams[1][1]))


def local_stream(b):
    """streaming generation past block_size, batch 1, rolling cache: KV-cache bytes, resident memory and
    tok/s (wall and CPU time, over the preceding 1k tokens) at 1k, 10k, ... stream_tokens generated tokens"""
    if not getattr(b.model, 'streams', False):
        return None
    (stream, cache), window, mark = greedy(b.model), 1000, 1000
    tokens = stream(b.prompt[:1], b.stream_tokens)
    figures, wall, cpu = dict(new_tokens=b.stream_tokens, block_size=b.model.config.block_size), [], []
    for done in range(window, b.stream_tokens + 1, window):
        rate, cpu_rate = timed(tokens, window, b.sync)
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


ROWS = (local_train_step, local_decode, local_stream)
