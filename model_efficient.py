"""
EfficientGPT: the baseline GPT with its slots (attention, feed-forward, depth) filled from the config.
Every mechanism is off by default, and with all of them off EfficientGPT computes exactly what GPT
computes with the same weights (the parameter names are the same, so state dicts load either way).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from early_exit import CRITERIA, DECODE, ExitHeads, ExitPoint, keep_output, no_losses
from efficient_modules import ATTN, FFN
from model import GPT, GPTConfig, LayerNorm


@dataclass
class EfficientGPTConfig(GPTConfig):
    # Each mechanism adds its group of fields here, off by default; conflicts go in __post_init__.

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
        exits = expand_layers(config.exit_layers, L)[:-1] + (False,) if config.enable_early_exit else (False,) * L
        return cls(attn=('full',) * L, ffn=('dense',) * L, exit=exits)


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

        # early exit: the exit loss through the shared ln_f and lm_head, and CALM's exit classifiers
        self.exit_heads = ExitHeads(config, self.plan) if config.enable_early_exit else None
        self.exit_losses = self.exit_heads.losses if config.enable_early_exit else no_losses

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
