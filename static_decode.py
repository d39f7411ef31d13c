"""
A static-shape decode step for the dense models (nanoGPT's GPT and the strong baseline: full attention, learned
or rotary positions, GELU MLPs), gpt-fast's design: the KV caches are preallocated for block_size positions, the
position is a tensor, every step writes its keys and values at that position and attends over all block_size
slots under a mask. Every step then has the same shapes, so torch.compile makes one graph for the whole
generation and never recompiles as the cache grows (model.compile() sees a new key length at every step).

The prompt is prefilled by the model's own forward into the same caches. Past block_size the dense model's
positions shift, so nothing cached stays valid: there the step is the model's own next_logits over the cropped
context, exactly as generate() does.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from local_attention import Rotary, RotarySelfAttention, keep
from model import MLP, CausalSelfAttention, LayerNorm, decode_tokens, decoding, sample_next


def why_not_static(model):
    """Why StaticDecoder cannot run this model ('' when it can): it runs plain pre-norm layers only."""
    c = model.config
    if getattr(model, 'hourglass', None) is not None or getattr(c, 'enable_early_exit', False):
        return "the hourglass and early exit have decode paths of their own"
    if getattr(c, 'smear', False) or getattr(c, 'value_embeds', 'none') != 'none' or type(model.lm_head) is not nn.Linear:
        return "smear, value embeddings and a soft-capped head are not in the static step"
    for i, block in enumerate(model.transformer.h):
        attn, mlp = getattr(block, 'attn', None), getattr(block, 'mlp', None)
        norm = getattr(getattr(attn, 'rotate', None), 'norm', None)
        if not (isinstance(getattr(block, 'ln_1', None), LayerNorm) and type(attn) in (CausalSelfAttention, RotarySelfAttention)
                and norm in (None, keep)):
            return f"layer {i} is not full attention with learned or rotary positions (and no qk_norm)"
        if not (type(mlp) is MLP and isinstance(mlp.gelu, nn.GELU)):
            return f"layer {i}'s MLP is not a GELU MLP"
    return ''


class StaticDecoder:
    """Greedy or sampled decode of a dense model through one static-shape step, eager or compiled
    (compile=True: torch.compile(fullgraph=True, dynamic=False), compiled at the first step)."""

    def __init__(self, model, compile=False):
        reason = why_not_static(model)
        if reason:
            raise ValueError(f"static decode runs dense models only: {reason}")
        t, c = model.transformer, model.config
        self.model, self.C, self.nh, self.T = model, c.n_embd, c.n_head, c.block_size
        self.wte, self.wpe = t.wte.weight, t.wpe.weight if 'wpe' in t else None
        self.ln_f, self.lm_head = (t.ln_f.weight, t.ln_f.bias), model.lm_head.weight
        self.layers = [dict(ln_1=(b.ln_1.weight, b.ln_1.bias), qkv=(b.attn.c_attn.weight, b.attn.c_attn.bias),
                            proj=(b.attn.c_proj.weight, b.attn.c_proj.bias), ln_2=(b.ln_2.weight, b.ln_2.bias),
                            fc=(b.mlp.c_fc.weight, b.mlp.c_fc.bias), out=(b.mlp.c_proj.weight, b.mlp.c_proj.bias),
                            approximate=b.mlp.gelu.approximate,
                            rotary=b.attn.rotate if isinstance(getattr(b.attn, 'rotate', None), Rotary) else None)
                       for b in t.h]
        self.step = torch.compile(self.step_eager, fullgraph=True, dynamic=False) if compile else self.step_eager

    def step_eager(self, token, pos, caches):
        """Logits (B, V) after token (B, 1) at position pos (a (1,) long tensor); writes each layer's k, v at pos
        into caches (KVCache objects, block_size slots each) and attends over every slot up to pos."""
        B, C, nh = token.size(0), self.C, self.nh
        x = F.embedding(token, self.wte)  # (B, 1, C)
        if self.wpe is not None:
            x = x + self.wpe[pos]
        seen = (torch.arange(self.T, device=pos.device) <= pos)[None]  # (1, S): the slots written so far
        for layer, cache in zip(self.layers, caches):
            h = F.layer_norm(x, (C,), *layer['ln_1'], 1e-5)
            qkv = F.linear(h, *layer['qkv']).view(B, 1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, 1, hs)
            rotary = layer['rotary']
            if rotary is not None:  # x·cos + swap_halves(x)·sin at pos, q and k together
                qk = qkv[:2]
                qk = qk * rotary.cos[pos] + qk.roll(rotary.half, -1) * rotary.sin[pos]
                q, k = qk.unbind(0)
            else:
                q, k = qkv[0], qkv[1]
            cache.k.index_copy_(2, pos, k.to(cache.k.dtype))  # (B, nh, S, hs); float32 caches under autocast
            cache.v.index_copy_(2, pos, qkv[2].to(cache.v.dtype))
            y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=seen)  # (B, nh, 1, hs)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), *layer['proj'])
            h = F.layer_norm(x, (C,), *layer['ln_2'], 1e-5)
            x = x + F.linear(F.gelu(F.linear(h, *layer['fc']), approximate=layer['approximate']), *layer['out'])
        return F.linear(F.layer_norm(x[:, -1], (C,), *self.ln_f, 1e-5), self.lm_head)

    def next_logits(self, idx, caches):
        """Logits (B, V) of the token after idx (B, t): the prompt through the model's forward, each new token
        through the static step, and past block_size the model's own path over the cropped context."""
        t = idx.size(1)
        if t > self.T or caches[-1].len == 0:
            return self.model.next_logits(idx, caches)
        pos = caches[-1].len  # the step feeds idx's last token; the cache holds every position before it
        logits = self.step(idx[:, -1:], torch.tensor([pos], device=idx.device), caches)
        for c in caches:
            c.len = pos + 1
        return logits

    @decoding
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """As the model's generate(): idx (B, T) and max_new_tokens new tokens."""
        caches = self.model.new_cache(idx.size(0))
        new = decode_tokens(lambda context: self.next_logits(context, caches), idx, max_new_tokens,
                            lambda logits: sample_next(logits, temperature, top_k, generator))
        return torch.cat((idx, *new), dim=1)
