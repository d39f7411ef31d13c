"""
EfficientGPT: the baseline GPT with its slots (attention, feed-forward, depth) filled from the config.
Every mechanism is off by default, and with all of them off EfficientGPT computes exactly what GPT
computes with the same weights (the parameter names are the same, so state dicts load either way).
"""

from dataclasses import InitVar, dataclass, replace

import torch.nn as nn

from early_exit import CRITERIA, DECODE, SCHEDULES, ExitHeads, ExitPoint, keep_output, no_losses
from efficient_modules import (ATTN, CACHE, FFN, MixtureOfDepths, Ponder, Smear, SmearState, SoftCapHead, ValueEmbeddings,
                               keep_input, lookup_cost)
from hierarchical_modules import Hourglass, HourglassState, groups_closed
from model import GPT, Cost, GPTConfig, LayerNorm, block_cost, decoding, module_cost


@dataclass
class EfficientGPTConfig(GPTConfig):
    # Each mechanism adds its group of fields here, off by default; conflicts go in __post_init__.

    # local attention: the query at position t attends to itself and the w-1 positions before
    # it (t-w+1 .. t); O(T·w) training and a rolling KV cache of w entries at decode
    enable_local_attention: bool = False  # sliding-window attention in every layer not named in global_layers
    local_attention_window: int = 128  # w: a query sees itself and the w-1 positions before it
    global_layers: str = 'none'  # layers kept full attention, an expand_layers pattern ('every:3', '0,5'); rest local
    attention_sinks: int = 0  # the first s positions stay visible to every local query (StreamingLLM); 0: none
    # positions: 'learned' (nanoGPT's wpe table, block_size positions) or 'rope' (rotary q, k; no wpe). With rope
    # and every layer local, generation continues past block_size at constant memory
    pos_emb: str = 'learned'  # 'learned' (nanoGPT's position table) or 'rope' (rotary q and k)
    rope_base: float = 10000.0  # rotary positions: the base of the angle frequencies

    # early exit (CALM, LayerSkip): shallow layers answer easy tokens at decode; see early_exit.py
    enable_early_exit: bool = False  # exit heads on the shared LM head, and the early-exit and speculative decoders
    exit_layers: str = 'all'  # layers that may exit (expand_layers pattern); the last layer is always the final one
    exit_threshold: float = 0.95  # exit when the criterion's confidence >= this: HIGHER exits LESS; > 1 never exits
    exit_criterion: str = 'max_prob'  # 'max_prob' | 'margin' (top-1 minus top-2 prob) | 'saturation' | 'learned'
    early_exit_loss_weight: float = 0.5  # total weight of the exits' cross-entropies, shared in proportion to depth
    exit_loss_schedule: str = 'constant'  # that weight over training: 'constant' | 'decay' (to 0) | 'late' (last 30%) | 'rise' (from 0)
    exit_detach_trunk: bool = False  # exit losses train only the shared ln_f and lm_head, never the layers below
    # the learned criterion's classifiers: detached, yet at weight 1 their gradients join the one clipped norm and
    # cost the LM 3% (docs/early_exit.md); Adam trains them as well at 0.01
    exit_classifier_loss_weight: float = 0.01  # the learned criterion's classifiers' weight in the training loss
    layer_dropout: float = 0.0  # LayerSkip's layer dropout: skip rate of the last layer, rising linearly from 0
    spec_exit_layer: int = 0  # self-speculative decode drafts with this many layers; 0: half of n_layer
    spec_draft_tokens: int = 4  # tokens drafted per verification pass

    # hierarchical processing: hourglass (hierarchical_modules.Hourglass)
    enable_hierarchical: bool = False  # the hourglass: hierarchy_layers run at 1/hierarchy_factor resolution
    hierarchy_factor: int = 2  # k: the shortened layers see one position per k tokens
    hierarchy_layers: str = 'none'  # the shortened layers, a contiguous run before the last layer, e.g. '1,2,3,4'
    # adaptive depth: 'none', 'act' (adaptive computation time, efficient_modules.Ponder) or 'mod' (Mixture-of-Depths,
    # efficient_modules.MixtureOfDepths)
    adaptive_compute: str = 'none'
    max_pondering_steps: int = 3  # N: a pondering layer runs its block at most this many times per token
    ponder_cost: float = 0.01  # tau: weight of the ponder cost N + R in the loss
    act_layers: str = 'none'  # which layers ponder (a pattern, see expand_layers)
    act_epsilon: float = 0.01  # a token halts once its halting probabilities sum to 1 - act_epsilon
    mod_capacity: float = 0.5  # MoD: fraction of each sequence's tokens a routed layer runs in training (top-k)
    mod_layers: str = 'every:2'  # MoD: the routed layers (a pattern, see expand_layers)
    mod_router_loss_weight: float = 0.1  # MoD: weight of the router's BCE towards top-k membership (the decode predictor)
    mod_router_scale: str = 'sigmoid'  # MoD: a chosen token's update times sigmoid(logit), or 'straight' (1, sigmoid's gradient)
    # checkpoints written before adaptive_compute carry this flag: True builds ACT
    enable_adaptive_compute: InitVar[bool] = None

    # sparse activation: top-k MLP (efficient_modules.TopKMLP)
    enable_sparse_activation: bool = False  # top-k MLPs in sparse_layers
    sparsity_ratio: float = 0.1  # fraction of the 4 * n_embd hidden units each token keeps
    sparse_layers: str = 'all'  # which layers are top-k MLPs (a pattern, see expand_layers)
    # dynamic routing: mixture-of-experts MLP (efficient_modules.MoEMLP)
    enable_dynamic_routing: bool = False  # mixture-of-experts MLPs in moe_layers
    num_experts: int = 4  # experts per MoE layer, each a full-size MLP
    experts_top_k: int = 1  # experts per token: 1 (Switch) or 2 (weights renormalised to sum to 1)
    router_aux_loss_weight: float = 0.01  # Switch load-balancing loss E * sum_i f_i * P_i
    router_z_loss_weight: float = 0.001  # ST-MoE z-loss: mean logsumexp(router logits)^2
    moe_layers: str = 'all'  # which layers are MoE MLPs

    # the strong dense baseline: the cheap modern pieces of the modded-nanogpt speedrun (docs/strong_baseline.md),
    # with GPTConfig's mlp_act='relu2'
    qk_norm: bool = False  # normalise q and k per head (LayerNorm without weights) before positions and attention
    zero_init_proj: bool = False  # start every output projection (c_proj of attention and MLP) at zero
    tie_embeddings: bool = True  # True: the token embedding is the LM head's weight (nanoGPT); False: two tables
    value_embeds: str = 'none'  # layers whose values add a token table's row (a layer pattern, e.g. '0,-1')
    smear: bool = False  # each token's embedding adds a gated share of the previous token's (one-token look-back)
    logit_softcap: float = 0.0  # logits become c·tanh(logits / c) for this c (e.g. 30); 0: off

    def __post_init__(self, enable_adaptive_compute=None):
        super().__post_init__()
        if enable_adaptive_compute and self.adaptive_compute == 'none':
            self.adaptive_compute = 'act'
        self.check_local_attention()
        self.check_hierarchy_and_act()
        self.check_mixture_of_depths()
        self.check_sparse_and_routing()
        self.check_strong_baseline()
        if self.enable_early_exit:
            if self.exit_criterion not in CRITERIA:
                raise ValueError(f"exit_criterion {self.exit_criterion!r}: use one of {', '.join(CRITERIA)}")
            if not any(exit_layers(self)):
                raise ValueError(f"exit_layers {self.exit_layers!r} names no layer before the last"
                                 + (" among the full-resolution layers after the hourglass (a token exits only there: "
                                    "the shortened layers run once per group whatever it exits at)"
                                    if self.enable_hierarchical else "") + ": nothing could exit")
            if self.exit_loss_schedule not in SCHEDULES:
                raise ValueError(f"exit_loss_schedule {self.exit_loss_schedule!r}: use one of {', '.join(SCHEDULES)}")
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

    def check_hierarchy_and_act(self):
        if self.hierarchy_factor < 1:
            raise ValueError(f"hierarchy_factor must be at least 1, not {self.hierarchy_factor}")
        shortened = [i for i, s in enumerate(expand_layers(self.hierarchy_layers, self.n_layer)) if s]
        if self.enable_hierarchical:
            last = self.n_layer - 1  # the last layer sees each token itself at full resolution
            if not shortened or shortened[-1] == last or shortened != list(range(shortened[0], shortened[-1] + 1)):
                raise ValueError(f"hierarchy_layers={self.hierarchy_layers!r} must name a contiguous run of layers "
                                 f"that leaves the last layer at full resolution, e.g. '1,2,3,4' of {self.n_layer}")
        if self.max_pondering_steps < 1:
            raise ValueError(f"max_pondering_steps must be at least 1, not {self.max_pondering_steps}")
        if self.ponder_cost < 0 or not 0 <= self.act_epsilon < 1:
            raise ValueError("ponder_cost must be >= 0 and act_epsilon in [0, 1)")
        expand_layers(self.act_layers, self.n_layer)  # a bad pattern fails here, not at build time
        if self.enable_early_exit and self.adaptive_compute == 'act':
            raise ValueError("enable_early_exit does not combine with ACT: both decide per token how deep it goes, and "
                             "an exiting token's K/V cannot stand in for the ponder steps a skipped layer never ran")

    def check_mixture_of_depths(self):
        if self.adaptive_compute not in ('none', 'act', 'mod'):
            raise ValueError(f"adaptive_compute must be 'none', 'act' or 'mod', not {self.adaptive_compute!r}")
        if self.mod_router_scale not in ('sigmoid', 'straight'):
            raise ValueError(f"mod_router_scale must be 'sigmoid' or 'straight', not {self.mod_router_scale!r}")
        if not 0 < self.mod_capacity <= 1 or self.mod_router_loss_weight < 0:
            raise ValueError(f"mod_capacity must be in (0, 1] and mod_router_loss_weight >= 0, not {self.mod_capacity} "
                             f"and {self.mod_router_loss_weight}")
        routed = expand_layers(self.mod_layers, self.n_layer)  # a bad pattern fails here, not at build time
        if self.adaptive_compute != 'mod':
            return
        if not any(routed):
            raise ValueError(f"mod_layers {self.mod_layers!r} names no layer of {self.n_layer}: nothing is routed")
        if self.enable_early_exit:
            raise ValueError("adaptive_compute='mod' does not combine with enable_early_exit: both decide per token which "
                             "layers run, and an exiting token's K/V would enter caches that hold only routed tokens")
        full = expand_layers(self.global_layers, self.n_layer) if self.enable_local_attention else (True,) * self.n_layer
        local = [i for i in range(self.n_layer) if routed[i] and not full[i]]
        if local:
            raise ValueError(f"routed layers {local} are local-attention layers: a routed layer attends to the tokens "
                             f"that went through it, not to a window of positions; name them in global_layers")

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


    def check_strong_baseline(self):
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0: off), not {self.logit_softcap}")
        chosen = expand_layers(self.value_embeds, self.n_layer)  # a bad pattern fails here
        shortened = expand_layers(self.hierarchy_layers, self.n_layer) if self.enable_hierarchical else ()
        both = [i for i, (v, s) in enumerate(zip(chosen, shortened)) if v and s]
        if both:
            raise ValueError(f"value_embeds names shortened layers {both}: their positions are groups, not tokens")
        if (any(chosen) or self.smear) and self.enable_early_exit:
            raise ValueError("value_embeds and smear do not combine with enable_early_exit yet: its decode engines "
                             "run the layers without the model's forward, which feeds them")
        if (any(chosen) or self.smear or self.qk_norm) and self.adaptive_compute == 'mod':
            raise ValueError("qk_norm, value_embeds and smear do not combine with adaptive_compute='mod' yet: its "
                             "routed layers see a subset of the tokens and position q and k themselves")


def exit_layers(config):
    """Where a token may exit: exit_layers before the last layer, and with an hourglass only after it (its
    shortened layers run once per group whatever a token exits at)."""
    L = config.n_layer
    after = 0
    if config.enable_hierarchical:
        shortened = [i for i, s in enumerate(expand_layers(config.hierarchy_layers, L)) if s]
        after = shortened[-1] + 1 if shortened else 0
    return tuple(e and i >= after for i, e in enumerate(expand_layers(config.exit_layers, L)[:-1])) + (False,)


def expand_layers(pattern, n_layer):
    """Which layers (0-based) a pattern names, as a tuple of bools, expanded once at build time.
    'all' | 'none' | 'every:N' (layers N-1, 2N-1, ...: every N-th, ending at the last when N divides
    n_layer) | 'last:N' | a slice 'A:B' as in Python ('1:-1': all but the first and the last, at any depth)
    | a comma list of layer indices '0,2,5' (negative counts from the end)."""
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
        elif ':' in p:
            a, b = (int(x) if x.strip() else None for x in p.split(':'))
            chosen = set(range(n_layer)[a:b])
        else:
            chosen = {int(s) + n_layer if int(s) < 0 else int(s) for s in p.split(',')}
    except ValueError:
        raise ValueError(f"layer pattern {pattern!r}: use 'all', 'none', 'every:N', 'last:N', 'A:B' or '0,2,5'") from None
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
    shortened: tuple  # True: the layer runs inside the hourglass at 1/hierarchy_factor resolution
    ponder: tuple  # True: the layer is an ACT pondering block
    route: tuple  # True: the layer is a Mixture-of-Depths routed block (its attention is of kind 'routed')

    @classmethod
    def from_config(cls, config):
        L = config.n_layer
        off = (False,) * L
        full = expand_layers(config.global_layers, L) if config.enable_local_attention else (True,) * L
        positions = '_rope' if config.pos_emb == 'rope' else ''
        route = expand_layers(config.mod_layers, L) if config.adaptive_compute == 'mod' else off
        attn = tuple(('routed' if routed else 'full' if is_full else 'local') + positions
                     for is_full, routed in zip(full, route))
        exits = exit_layers(config) if config.enable_early_exit else off
        shortened = expand_layers(config.hierarchy_layers, L) if config.enable_hierarchical else off
        ponder = expand_layers(config.act_layers, L) if config.adaptive_compute == 'act' else off
        sparse = expand_layers(config.sparse_layers, L) if config.enable_sparse_activation else off
        moe = expand_layers(config.moe_layers, L) if config.enable_dynamic_routing else off
        ffn = tuple('moe' if moe[i] else 'topk' if sparse[i] else 'dense' for i in range(L))
        return cls(attn=attn, ffn=ffn, exit=exits, shortened=shortened, ponder=ponder, route=route)

    def runs(self):
        """(pre, shortened, post) layer ranges: everything is 'post' without an hourglass."""
        s = [i for i, v in enumerate(self.shortened) if v]
        a, b = (s[0], s[-1] + 1) if s else (0, 0)
        return range(a), range(a, b), range(b, len(self.shortened))


class EfficientBlock(nn.Module):
    """nanoGPT's pre-norm block with its attention and feed-forward chosen from the plan."""

    def __init__(self, config, plan, layer):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = ATTN[plan.attn[layer]](config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FFN[plan.ffn[layer]](config)
        # early exit: layer dropout, and the output kept for the exit loss; passes the output through when off
        self.exit = ExitPoint(config, layer) if config.enable_early_exit else keep_output

    def forward(self, x, cache=None):
        y = x + self.attn(self.ln_1(x), cache)
        y = y + self.mlp(self.ln_2(y))
        return self.exit(x, y, self.training)

    def new_cache(self, make_cache, max_len):
        return make_cache(max_len)

    def cost(self, keys):
        return block_cost(self, keys)


class EfficientGPT(GPT):

    def __init__(self, config):
        self.plan = LayerPlan.from_config(config)  # read by make_block during GPT.__init__
        super().__init__(config)
        if config.pos_emb == 'rope':  # positions enter through q, k in every attention layer instead
            del self.transformer['wpe']
            self.embed = self.embed_tokens

        # early exit: the exit loss through the shared ln_f and lm_head, and CALM's exit classifiers
        self.exit_heads = ExitHeads(config, self.plan) if config.enable_early_exit else None
        self.exit_losses = self.exit_heads.losses if config.enable_early_exit else no_losses
        if config.enable_early_exit:
            self.set_progress = self.exit_heads.set_progress
        # hourglass and ACT
        for m in self.modules():  # GPT's init zeroed every bias; h = sigmoid(1) = 0.73: two steps per token at first
            if isinstance(m, Ponder):
                nn.init.constant_(m.halt.bias, 1.0)
        self.pre, self.shortened, self.post = self.plan.runs()
        self.hourglass = Hourglass(config) if self.shortened else None
        # rotary positions and every layer local (the shortened ones too): nothing depends on the position
        # count, so the model streams past block_size (the hourglass state keeps only its last groups)
        self.streams = all(kind == 'local_rope' for kind in self.plan.attn)

        # the strong dense baseline's input and output pieces (built last: with them off, init is GPT's exactly)
        if not config.tie_embeddings:  # a token table of its own; the LM head keeps lm_head.weight
            self.transformer.wte = nn.Embedding(config.vocab_size, config.n_embd)
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.02)
        if config.zero_init_proj:  # every block starts as the identity; the projections learn from step one
            for pn, p in self.named_parameters():
                if pn.endswith('c_proj.weight'):
                    nn.init.zeros_(p)
        value_layers = [i for i, v in enumerate(expand_layers(config.value_embeds, config.n_layer)) if v]
        self.value_embeds = ValueEmbeddings(config, value_layers) if value_layers else nn.Identity()
        if value_layers:
            self.value_embeds.attach([getattr(b, 'block', b) for b in self.transformer.h])  # a Ponder's block
        self.smear = Smear(config, slot=config.n_layer) if config.smear else keep_input  # state after the layers'

    def make_head(self):
        c = self.config
        return SoftCapHead(c.n_embd, c.vocab_size, c.logit_softcap) if c.logit_softcap else super().make_head()

    def get_num_params(self, non_embedding=True):
        """GPT's count; non_embedding also leaves out the tables that are only looked up: an untied token table and
        the value embeddings (a tied token table is the LM head's weight, a matmul)."""
        n = super().get_num_params(non_embedding)
        if non_embedding:
            n -= sum(t.weight.numel() for t in self.lookup_tables())
        return n

    def lookup_tables(self):
        """The embedding tables a token reads one row of, beyond nanoGPT's: an untied wte, the value embeddings."""
        return ([] if self.config.tie_embeddings else [self.transformer.wte]) + list(getattr(self.value_embeds, 'tables', []))

    def input_cost(self):
        """Work per token before the layers beyond nanoGPT's: rows of the lookup tables, the smear gate."""
        return lookup_cost(*self.lookup_tables()) + (self.smear.cost() if isinstance(self.smear, Smear) else Cost())

    def embed_tokens(self, idx, start=0):
        """Token embeddings only (rotary positions): no position table, so no block_size limit. (B, T, C)"""
        return self.transformer.drop(self.transformer.wte(idx))

    def next_logits(self, idx, cache=None):
        """A streaming model (rotary positions, every layer local) sees no block_size limit: the cache keeps
        rolling past it with no re-prefill, and the reference path recomputes the whole context (its
        windows and absolute positions are what the cache holds). Any other model crops at block_size,
        like the baseline: a full-attention layer's cache would grow, and learned positions end there."""
        if not self.streams:
            return super().next_logits(idx, cache)
        logits, _ = self(idx if cache is None else idx[:, cache[-1].len:], cache=cache)
        return logits[:, -1, :]

    def make_block(self, layer):
        block = EfficientBlock(self.layer_config(layer), self.plan, layer)
        if self.plan.route[layer]:
            return MixtureOfDepths(block, self.config)
        return Ponder(block, self.config) if self.plan.ponder[layer] else block

    def layer_config(self, layer):
        """The config a layer is built from. A shortened local layer's window counts groups, and training
        shows it at most the groups of one block_size context: its window is capped there, which changes
        nothing inside the context and keeps streaming decode past it within what the layer learned."""
        c = self.config
        if not (self.plan.shortened[layer] and c.enable_local_attention):
            return c
        return replace(c, local_attention_window=min(c.local_attention_window,
                                                      groups_closed(c.block_size, c.hierarchy_factor)))

    def run_layers(self, x, cache=None):
        """The blocks in order; with an hourglass the shortened run sits between the pre and post runs."""
        caches = cache or [None] * (len(self.transformer.h) + 1)
        x = self.run_trunk(self.smear(x, cache), caches)
        for i in self.post:
            x = self.transformer.h[i](x, caches[i])
        return x

    def run_trunk(self, x, caches):
        """The layers before the post run: the pre run and the hourglass, which every token runs at decode
        whatever it exits at (nothing without an hourglass: then every layer is in the post run)."""
        h = self.transformer.h
        for i in self.pre:
            x = h[i](x, caches[i])
        if self.hourglass is not None:  # (slicing the ModuleList would build a new module every call)
            x = self.hourglass(x, [h[i] for i in self.shortened],
                               caches[self.shortened.start:self.shortened.stop], caches[-1])
        return x

    def new_cache(self, batch_size, device=None, dtype=None, rollback=0):
        """One cache per layer, of the kind its attention reads (CACHE registry: a RollingKVCache for local
        layers, else a KVCache; the shortened layers' hold block_size / k positions; a pondering layer's
        is one per step), then, with an hourglass, its HourglassState. rollback: positions a rolling
        cache must be able to take back beyond one (speculative decoding's draft length)."""
        c, p = self.config, self.lm_head.weight
        device, dtype = device or p.device, dtype or p.dtype

        def cache_maker(layer):
            kind, lc = self.plan.attn[layer], self.layer_config(layer)
            return lambda max_len: CACHE[kind](lc, batch_size, max_len, device, dtype, rollback)

        short_len = groups_closed(c.block_size, c.hierarchy_factor)
        caches = [block.new_cache(cache_maker(i), short_len if self.plan.shortened[i] else c.block_size)
                  for i, block in enumerate(self.transformer.h)]
        if isinstance(self.smear, Smear):  # at cache[n_layer] (Smear.slot), before the hourglass's
            caches.append(SmearState(batch_size, c.n_embd, rollback, device, dtype))
        if self.hourglass is not None:
            caches.append(HourglassState(batch_size, c.block_size, c.hierarchy_factor, c.n_embd, device, dtype, rollback))
        return caches

    def decode_cost(self, keys):
        """Work of one generated token attending to `keys` positions, as the cached decode runs it: a shortened
        layer (and the hourglass's upsampling) runs once per k tokens over keys/k groups. Slots count their own
        work as executed: a local layer its window, top-k its k rows, MoE its chosen experts, a pondering layer
        its measured mean steps."""
        post = sum((self.transformer.h[i].cost(keys) for i in self.post), Cost())
        return self.input_cost() + self.trunk_cost(keys) + post + self.head_cost()

    def trunk_cost(self, keys):
        """Work of one token in run_trunk: the pre layers, and the shortened layers and the upsampling once
        per k tokens over keys/k groups."""
        h, k, total = self.transformer.h, self.config.hierarchy_factor, Cost()
        for i in self.pre:
            total = total + h[i].cost(keys)
        for i in self.shortened:
            total = total + h[i].cost(keys / k) * (1 / k)
        if self.hourglass is not None:
            total = total + module_cost(self.hourglass) * (1 / k)
        return total

    def truncate_cache(self, cache, n):
        """Roll a cache from new_cache back to its first n positions (the shortened layers' caches to
        the groups closed by then), e.g. after rejected speculative tokens."""
        k = self.config.hierarchy_factor
        for i, c in enumerate(cache[:self.config.n_layer]):
            c.truncate(groups_closed(n, k) if self.plan.shortened[i] else n)
        for c in cache[self.config.n_layer:]:  # the HourglassState
            c.truncate(n)

    def forward(self, idx, targets=None, cache=None):
        self.value_embeds(idx)  # the value embeddings' rows of these tokens, for their layers (no-op when off)
        logits, loss = super().forward(idx, targets, cache)
        self.aux = self.exit_losses(self, targets, logits)  # {name: (weight, value)}
        return logits, loss

    @decoding
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None,
                 decode='full', stats=None, **policy):
        """GPT.generate with a choice of decode engine (early_exit.DECODE): 'full' runs every layer (the
        baseline's cached path, exactly); 'early_exit' and 'speculative' (cached, any batch) skip work.
        stats: a dict that receives what the engine measured (exit layers, acceptance, layers run).
        policy: the engine's settings, overriding the config's (early_exit: criterion, threshold;
        speculative: draft_layers, draft_tokens), so a sweep never edits the model."""
        if decode == 'full':
            return super().generate(idx, max_new_tokens, temperature, top_k, use_cache, generator)
        if decode not in DECODE:
            raise ValueError(f"decode {decode!r}: use 'full' or one of {', '.join(DECODE)}")
        if not self.config.enable_early_exit or not use_cache:
            raise ValueError(f"decode={decode!r} needs enable_early_exit and use_cache=True")
        return DECODE[decode](self, idx, max_new_tokens, temperature, top_k, generator,
                              {} if stats is None else stats, **policy)

    def aux_losses(self):
        """{name: (weight, value)} summed over the modules that produced one in the last forward."""
        total = {}
        for m in self.modules():
            for name, (w, v) in getattr(m, 'aux', {}).items():
                total[name] = (w, total[name][1] + v) if name in total else (w, v)
        return total
