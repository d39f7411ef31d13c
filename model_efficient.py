"""
EfficientGPT: the baseline GPT with its slots (attention, feed-forward, depth) filled from the config.
Every mechanism is off by default, and with all of them off EfficientGPT computes exactly what GPT
computes with the same weights (the parameter names are the same, so state dicts load either way).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from early_exit import CRITERIA, DECODE, ExitHeads, ExitPoint, keep_output, no_losses
from efficient_modules import ATTN, CACHE, FFN
from model import GPT, GPTConfig, LayerNorm


@dataclass
class EfficientGPTConfig(GPTConfig):
    # Each mechanism adds its group of fields here, off by default; conflicts go in __post_init__.

    # local attention (mechanism 5): the query at position t attends to itself and the w-1 positions before
    # it (t-w+1 .. t); O(T·w) training and a rolling KV cache of w entries at decode
    enable_local_attention: bool = False
    local_attention_window: int = 128  # w
    global_layers: str = 'none'  # layers kept full attention, an expand_layers pattern ('every:3', '0,5'); rest local
    attention_sinks: int = 0  # the first s positions stay visible to every local query (StreamingLLM); 0: none
    # positions: 'learned' (nanoGPT's wpe table, block_size positions) or 'rope' (rotary q, k; no wpe). With rope
    # and every layer local, generation continues past block_size at constant memory
    pos_emb: str = 'learned'
    rope_base: float = 10000.0

    # early exit (CALM, LayerSkip): shallow layers answer easy tokens at decode; see early_exit.py
    enable_early_exit: bool = False
    exit_layers: str = 'all'  # layers that may exit (expand_layers pattern); the last layer is always the final one
    exit_threshold: float = 0.95  # exit when the criterion's confidence >= this: HIGHER exits LESS; > 1 never exits
    exit_criterion: str = 'max_prob'  # 'max_prob' | 'margin' (top-1 minus top-2 prob) | 'saturation' | 'learned'
    early_exit_loss_weight: float = 0.5  # total weight of the exits' cross-entropies, shared in proportion to depth
    layer_dropout: float = 0.0  # LayerSkip's layer dropout: skip rate of the last layer, rising linearly from 0
    spec_exit_layer: int = 0  # self-speculative decode drafts with this many layers; 0: half of n_layer
    spec_draft_tokens: int = 4  # tokens drafted per verification pass

    def __post_init__(self):
        self.check_local_attention()
        if self.enable_early_exit:
            if self.exit_criterion not in CRITERIA:
                raise ValueError(f"exit_criterion {self.exit_criterion!r}: use one of {', '.join(CRITERIA)}")
            if not any(expand_layers(self.exit_layers, self.n_layer)[:-1]):
                raise ValueError(f"exit_layers {self.exit_layers!r} names no layer before the last: nothing could exit")
            if self.early_exit_loss_weight < 0 or not 0 <= self.layer_dropout < 1:
                raise ValueError("early_exit_loss_weight must be >= 0 and layer_dropout in [0, 1)")
            if not 0 <= self.spec_exit_layer < self.n_layer or self.spec_draft_tokens < 1:
                raise ValueError(f"spec_exit_layer must be in [0, n_layer={self.n_layer}) (0: n_layer // 2) "
                                 f"and spec_draft_tokens >= 1")

    def check_local_attention(self):
        if self.pos_emb not in ('learned', 'rope'):
            raise ValueError(f"pos_emb must be 'learned' or 'rope', not {self.pos_emb!r}")
        if self.pos_emb == 'rope' and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos_emb='rope' needs an even head size, not n_embd/n_head = "
                             f"{self.n_embd // self.n_head}")
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be > 0, not {self.rope_base}")
        if self.local_attention_window < 1:
            raise ValueError(f"local_attention_window must be >= 1, not {self.local_attention_window}")
        if self.attention_sinks < 0:
            raise ValueError(f"attention_sinks must be >= 0, not {self.attention_sinks}")
        if self.enable_local_attention:
            expand_layers(self.global_layers, self.n_layer)  # raises on a bad pattern
        elif self.attention_sinks or self.global_layers != 'none' or self.local_attention_window != 128:
            raise ValueError("local_attention_window, global_layers and attention_sinks need "
                             "enable_local_attention=True")


def expand_layers(pattern, n_layer):
    """Which layers (0-based) a pattern names, as a tuple of bools, expanded once at build time.
    'all' | 'none' | 'every:N' (layers N-1, 2N-1, ...: every N-th, ending at the last when N divides
    n_layer) | 'last:N' | a comma list of layer indices '0,2,5' (negative counts from the end)."""
    p = str(pattern).strip().lower()
    try:
        if p == 'all':
            chosen = set(range(n_layer))
        elif p in ('none', ''):
            chosen = set()
        elif p.startswith('every:'):
            n = int(p.split(':', 1)[1])
            chosen = set(range(n - 1, n_layer, n))
        elif p.startswith('last:'):
            chosen = set(range(max(0, n_layer - int(p.split(':', 1)[1])), n_layer))
        else:
            chosen = {int(s) + n_layer if int(s) < 0 else int(s) for s in p.split(',')}
    except ValueError:
        raise ValueError(f"layer pattern {pattern!r}: use 'all', 'none', 'every:N', 'last:N' or '0,2,5'") from None
    bad = sorted(i for i in chosen if not 0 <= i < n_layer)
    if bad:
        raise ValueError(f"layer pattern {pattern!r} names layers {bad}, but the model has {n_layer} (0..{n_layer - 1})")
    return tuple(i in chosen for i in range(n_layer))


@dataclass(frozen=True)
class LayerPlan:
    """What each layer is, read from the config once: per-layer kinds of the block's slots."""
    attn: tuple
    ffn: tuple
    exit: tuple  # True where a token may leave the stack early (never the last layer)

    @classmethod
    def from_config(cls, config):
        L = config.n_layer
        full = expand_layers(config.global_layers, L) if config.enable_local_attention else (True,) * L
        positions = '_rope' if config.pos_emb == 'rope' else ''
        attn = tuple(('full' if is_full else 'local') + positions for is_full in full)
        exits = expand_layers(config.exit_layers, L)[:-1] + (False,) if config.enable_early_exit else (False,) * L
        return cls(attn=attn, ffn=('dense',) * L, exit=exits)


class EfficientBlock(nn.Module):
    """nanoGPT's pre-norm block with its attention and feed-forward chosen from the plan."""

    def __init__(self, config, plan, layer):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = ATTN[plan.attn[layer]](config, layer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FFN[plan.ffn[layer]](config, layer)
        # early exit: layer dropout, and the output kept for the exit loss; passes the output through when off
        self.exit = ExitPoint(config, layer) if config.enable_early_exit else keep_output

    def forward(self, x, cache=None):
        y = x + self.attn(self.ln_1(x), cache)
        y = y + self.mlp(self.ln_2(y))
        return self.exit(x, y, self.training)


class EfficientGPT(GPT):

    def __init__(self, config):
        self.plan = LayerPlan.from_config(config)  # read by make_block during GPT.__init__
        super().__init__(config)
        if config.pos_emb == 'rope':  # positions enter through q, k in every attention layer instead
            del self.transformer['wpe']
            self.embed = self.embed_tokens
        # with rotary positions and every layer local nothing depends on the position count: the model streams
        self.streams = all(kind == 'local_rope' for kind in self.plan.attn)

        # early exit: the exit loss through the shared ln_f and lm_head, and CALM's exit classifiers
        self.exit_heads = ExitHeads(config, self.plan) if config.enable_early_exit else None
        self.exit_losses = self.exit_heads.losses if config.enable_early_exit else no_losses

    def embed_tokens(self, idx, start=0):
        """Token embeddings only (rotary positions): no position table, so no block_size limit. (B, T, C)"""
        return self.transformer.drop(self.transformer.wte(idx))

    def new_cache(self, batch_size, device=None, dtype=None, rollback=0):
        """One cache per layer, of the kind its attention reads (CACHE registry): full for full attention,
        rolling for local layers. rollback: positions a rolling cache must be able to take back on top
        of one (speculative decoding's draft length)."""
        p = self.lm_head.weight
        return [CACHE[kind](self.config, batch_size, device or p.device, dtype or p.dtype, rollback)
                for kind in self.plan.attn]

    def next_logits(self, idx, cache=None):
        """A streaming model (rotary positions, every layer local) sees no block_size limit: the cache keeps
        rolling past it with no re-prefill, and the reference path recomputes the whole context (its
        windows and absolute positions are what the cache holds). Any other model crops at block_size,
        like the baseline: a full-attention layer's cache would grow, and learned positions end there."""
        if not self.streams:
            return super().next_logits(idx, cache)
        logits, _ = self(idx if cache is None else idx[:, cache[0].len:], cache=cache)
        return logits[:, -1, :]

    def make_block(self, layer):
        return EfficientBlock(self.config, self.plan, layer)

    def forward(self, idx, targets=None, cache=None):
        logits, loss = super().forward(idx, targets, cache)
        self.aux = self.exit_losses(self, targets, logits)  # {name: (weight, value)}
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None,
                 decode='full', stats=None):
        """GPT.generate with a choice of decode engine (early_exit.DECODE): 'full' runs every layer (the
        baseline's cached path, exactly); 'early_exit' and 'speculative' (batch 1, cached) skip work.
        stats: a dict that receives what the engine measured (exit layers, acceptance, layers run)."""
        if decode == 'full':
            return super().generate(idx, max_new_tokens, temperature, top_k, use_cache, generator)
        if decode not in DECODE:
            raise ValueError(f"decode {decode!r}: use 'full' or one of {', '.join(DECODE)}")
        if not self.config.enable_early_exit or idx.size(0) != 1 or not use_cache:
            raise ValueError(f"decode={decode!r} needs enable_early_exit, batch 1 and use_cache=True")
        return DECODE[decode](self, idx, max_new_tokens, temperature, top_k, generator,
                              {} if stats is None else stats)

    def aux_losses(self):
        """{name: (weight, value)} summed over the modules that produced one in the last forward."""
        total = {}
        for m in self.modules():
            for name, (w, v) in getattr(m, 'aux', {}).items():
                total[name] = (w, total[name][1] + v) if name in total else (w, v)
        return total
