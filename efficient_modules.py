"""
The interchangeable parts of an EfficientGPT block. Each slot has a registry, and a block fills its
slots once in __init__ from the layer plan (model_efficient.LayerPlan):

    ATTN[kind](config, layer) -> module with forward(x, cache=None) -> y          x, y: (B, T, C)
    FFN[kind](config, layer)  -> module with forward(x) -> y                      x, y: (B, T, C)
    CACHE[attn kind](config, batch_size, device, dtype, rollback) -> the KV cache that attention reads

A module that adds a training loss stores it in `self.aux = {name: (weight, value)}` during forward;
EfficientGPT.aux_losses() gathers them and the training script adds Σ weight·value to the LM loss.
"""

from local_attention import LocalSelfAttention, RollingKVCache, RotarySelfAttention
from model import MLP, CausalSelfAttention, KVCache

ATTN = {
    'full': lambda config, layer: CausalSelfAttention(config),
    'full_rope': lambda config, layer: RotarySelfAttention(config),
    'local': lambda config, layer: LocalSelfAttention(config, rope=False),
    'local_rope': lambda config, layer: LocalSelfAttention(config, rope=True),
}


def full_cache(c, batch_size, device, dtype, rollback):
    return KVCache(batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype)


def rolling_cache(c, batch_size, device, dtype, rollback):
    return RollingKVCache(batch_size, c.n_head, c.local_attention_window, c.n_embd // c.n_head,
                          c.attention_sinks, rollback, device, dtype)


CACHE = {'full': full_cache, 'full_rope': full_cache, 'local': rolling_cache, 'local_rope': rolling_cache}

FFN = {
    'dense': lambda config, layer: MLP(config),
}
