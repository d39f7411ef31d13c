"""
The interchangeable parts of an EfficientGPT block. Each slot has a registry, and a block fills its
slots once in __init__ from the layer plan (model_efficient.LayerPlan):

    ATTN[kind](config, layer) -> module with forward(x, cache=None) -> y          x, y: (B, T, C)
    FFN[kind](config, layer)  -> module with forward(x) -> y                      x, y: (B, T, C)
    CACHE[attn kind](config, batch_size, max_len, device, dtype, rollback) -> the KV cache attention reads

A module that adds a training loss stores it in `self.aux = {name: (weight, value)}` during forward;
EfficientGPT.aux_losses() gathers them and the training script adds Σ weight·value to the LM loss.
"""

import torch
import torch.nn as nn

from local_attention import LocalSelfAttention, RollingKVCache, RotarySelfAttention
from model import MLP, CausalSelfAttention, KVCache

ATTN = {
    'full': lambda config, layer: CausalSelfAttention(config),
    'full_rope': lambda config, layer: RotarySelfAttention(config),
    'local': lambda config, layer: LocalSelfAttention(config, rope=False),
    'local_rope': lambda config, layer: LocalSelfAttention(config, rope=True),
}


def full_cache(c, batch_size, max_len, device, dtype, rollback):
    return KVCache(batch_size, c.n_head, max_len, c.n_embd // c.n_head, device, dtype)


def rolling_cache(c, batch_size, max_len, device, dtype, rollback):  # w (+ sinks, rollback) slots, whatever max_len
    return RollingKVCache(batch_size, c.n_head, c.local_attention_window, c.n_embd // c.n_head,
                          c.attention_sinks, rollback, device, dtype)


CACHE = {'full': full_cache, 'full_rope': full_cache, 'local': rolling_cache, 'local_rope': rolling_cache}

FFN = {
    'dense': lambda config, layer: MLP(config),
}


class StepCaches(list):
    """The KV caches of a pondering layer, one per ponder step (a step attends to the earlier tokens'
    K/V at the same step). Looks like one KVCache to the model: len, reset, truncate, nbytes."""

    @property
    def len(self):
        return self[0].len

    def reset(self):
        for c in self:
            c.reset()

    def truncate(self, n):
        for c in self:
            c.truncate(n)

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self)


class Ponder(nn.Module):
    """Adaptive computation time (Graves 2016) around one block: the block is applied up to
    max_pondering_steps times; after step n a halting unit gives h_n = sigmoid(w . s_n + b) per token;
    a token halts at the first step N where h_1 + .. + h_N >= 1 - eps (or at the last step), its step
    weights are h_1 .. h_{N-1} and the remainder R = 1 - (h_1 + .. + h_{N-1}) for step N (they sum to 1),
    its output is sum_n p_n * s_n, and the ponder cost is N + R (aux loss, weight ponder_cost).

    A halted token's state is frozen; when later steps run for other tokens, it still supplies keys
    and values at those steps, computed from its frozen (final) state, so that later tokens can attend
    to it. This is the semantics of training, of the teacher-forced reference and of decode alike: at
    decode a halted token runs no more steps and its K/V for the skipped steps come from one K/V
    projection of its final state (the same for every skipped step, since the steps share weights)."""

    def __init__(self, block, config):
        super().__init__()
        self.block = block
        self.halt = nn.Linear(config.n_embd, 1)
        self.max_steps = config.max_pondering_steps
        self.threshold = 1.0 - config.act_epsilon
        self.ponder_cost = config.ponder_cost
        self.aux = {}
        self.steps = None  # (B, T) ponder steps of each token in the last forward, for statistics

    def forward(self, x, cache=None):
        B, T, _ = x.shape
        state, out = x, torch.zeros_like(x)
        cumulative = x.new_zeros(B, T)  # sum of the halting probabilities of the steps before
        remainder = x.new_zeros(B, T)
        running = torch.ones(B, T, dtype=torch.bool, device=x.device)
        steps = torch.zeros(B, T, dtype=torch.long, device=x.device)
        for n in range(self.max_steps):
            new = self.block(state, cache[n] if cache is not None else None)
            state = torch.where(running[..., None], new, state)  # halted tokens stay frozen
            h = torch.sigmoid(self.halt(state)).squeeze(-1)  # (B, T)
            halts_now = running & ((cumulative + h >= self.threshold) | (n == self.max_steps - 1))
            weight = torch.where(halts_now, 1.0 - cumulative, torch.where(running, h, 0.0))
            out = out + weight[..., None] * state
            remainder = torch.where(halts_now, 1.0 - cumulative, remainder)
            cumulative = cumulative + torch.where(running & ~halts_now, h, 0.0)
            steps = steps + running.long()
            running = running & ~halts_now
            if not running.any():  # every token halted: no more steps run
                break
        if cache is not None:  # the steps not run still need this position's K/V, from the final state
            for c in cache[n + 1:]:
                append_kv(self.block.attn, self.block.ln_1(state), c)
        self.steps = steps
        self.aux = {'ponder': (self.ponder_cost, (steps + remainder).mean())}
        return out

    def new_cache(self, make_cache, max_len):
        return StepCaches(make_cache(max_len) for _ in range(self.max_steps))


def append_kv(attn, x, cache):
    """Append the keys and values that attention `attn` computes from x (B, T, C) to cache, without
    the queries or the attention itself (state propagation for skipped steps)."""
    _, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
    cache.update(attn.heads(k), attn.heads(v))
