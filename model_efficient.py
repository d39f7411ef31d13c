"""
EfficientGPT: the baseline GPT with its slots (attention, feed-forward, depth) filled from the config.
Every mechanism is off by default, and with all of them off EfficientGPT computes exactly what GPT
computes with the same weights (the parameter names are the same, so state dicts load either way).
"""

from dataclasses import dataclass

import torch.nn as nn

from efficient_modules import ATTN, FFN
from model import GPT, GPTConfig, LayerNorm


@dataclass
class EfficientGPTConfig(GPTConfig):
    # Each mechanism adds its group of fields here, off by default; conflicts go in __post_init__.

    # sparse activation: top-k MLP (efficient_modules.TopKMLP)
    enable_sparse_activation: bool = False
    sparsity_ratio: float = 0.1  # fraction of the 4 * n_embd hidden units each token keeps
    sparse_layers: str = 'all'  # which layers are top-k MLPs (a pattern, see expand_layers)
    # dynamic routing: mixture-of-experts MLP (efficient_modules.MoEMLP)
    enable_dynamic_routing: bool = False
    num_experts: int = 4  # each expert is a full-size MLP
    experts_top_k: int = 1  # experts per token: 1 (Switch) or 2 (weights renormalised to sum to 1)
    router_aux_loss_weight: float = 0.01  # Switch load-balancing loss E * sum_i f_i * P_i
    router_z_loss_weight: float = 0.001  # ST-MoE z-loss: mean logsumexp(router logits)^2
    moe_layers: str = 'all'  # which layers are MoE MLPs

    def __post_init__(self):
        self.check_sparse_and_routing()

    def check_sparse_and_routing(self):
        if not 0 < self.sparsity_ratio <= 1:
            raise ValueError(f"sparsity_ratio must be in (0, 1] (the fraction of hidden units kept), "
                             f"not {self.sparsity_ratio}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, not {self.num_experts}")
        if self.experts_top_k not in (1, 2) or self.experts_top_k > self.num_experts:
            raise ValueError(f"experts_top_k must be 1 or 2 and at most num_experts ({self.num_experts}), "
                             f"not {self.experts_top_k}")
        if self.router_aux_loss_weight < 0 or self.router_z_loss_weight < 0:
            raise ValueError("router_aux_loss_weight and router_z_loss_weight must be >= 0")
        sparse = expand_layers(self.sparse_layers, self.n_layer)
        moe = expand_layers(self.moe_layers, self.n_layer)
        both = [i for i in range(self.n_layer) if sparse[i] and moe[i]]
        if self.enable_sparse_activation and self.enable_dynamic_routing and both:
            raise ValueError(f"layers {both} are both top-k (sparse_layers={self.sparse_layers!r}) and MoE "
                             f"(moe_layers={self.moe_layers!r}): a layer has one MLP, choose disjoint patterns")


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

    @classmethod
    def from_config(cls, config):
        L = config.n_layer
        sparse = expand_layers(config.sparse_layers, L) if config.enable_sparse_activation else (False,) * L
        moe = expand_layers(config.moe_layers, L) if config.enable_dynamic_routing else (False,) * L
        ffn = tuple('moe' if moe[i] else 'topk' if sparse[i] else 'dense' for i in range(L))
        return cls(attn=('full',) * L, ffn=ffn)


class EfficientBlock(nn.Module):
    """nanoGPT's pre-norm block with its attention and feed-forward chosen from the plan."""

    def __init__(self, config, plan, layer):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = ATTN[plan.attn[layer]](config, layer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FFN[plan.ffn[layer]](config, layer)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class EfficientGPT(GPT):

    def __init__(self, config):
        self.plan = LayerPlan.from_config(config)  # read by make_block during GPT.__init__
        super().__init__(config)

    def make_block(self, layer):
        return EfficientBlock(self.config, self.plan, layer)

    def aux_losses(self):
        """{name: (weight, value)} summed over the modules that produced one in the last forward."""
        total = {}
        for m in self.modules():
            for name, (w, v) in getattr(m, 'aux', {}).items():
                total[name] = (w, total[name][1] + v) if name in total else (w, v)
        return total
