"""
The interchangeable parts of an EfficientGPT block. Each slot has a registry, and a block fills its
slots once in __init__ from the layer plan (model_efficient.LayerPlan):

    ATTN[kind](config) -> module with forward(x, cache=None) -> y, and cost(keys)     x, y: (B, T, C)
    FFN[kind](config)  -> module with forward(x) -> y, and cost()                      x, y: (B, T, C)
    CACHE[attn kind](config, batch_size, max_len, device, dtype, rollback) -> the KV cache attention reads

cost() is the model.Cost (FLOPs, weight bytes) one token executes on the path forward runs now, which the
model sums into its decode cost. The 'routed' attention kinds belong to Mixture-of-Depths layers: their
forward(x, route) always gets a route (the tokens' positions and the keys they read) from MixtureOfDepths.

A module that adds a training loss stores it in `self.aux = {name: (weight, value)}` during forward;
EfficientGPT.aux_losses() gathers them and the training script adds Σ weight·value to the LM loss.
"""

import math

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from local_attention import LocalSelfAttention, RollingKVCache, Rotary, RotarySelfAttention
from model import MLP, CausalSelfAttention, Cost, KVCache, attend, block_cost, module_cost, weights_cost


class TopKMLP(MLP):
    """nanoGPT's MLP (same parameter names, so a dense checkpoint loads) that keeps, per token, only the
    k hidden units with the largest pre-activations and zeroes the rest (Lazy Neuron, TEAL).
    Largest value, not magnitude: GELU rises monotonically from -0.17 at u = -0.75, so the k largest
    pre-activations u are the k largest GELU outputs whenever more than k units have u > -0.75, and a dropped
    negative output is at most 0.17 in size. Selecting on u lets GELU run on the k kept units only.
    k = hidden is the dense MLP.

    Two paths compute the same function:
      masked   (training, and the reference): the full down-projection over the zeroed activations,
               so gradients flow through the kept units exactly as in a dense MLP.
      gathered (inference, when self.gather): F.embedding_bag reads only the k rows of c_proj.weight.T
               that the kept units multiply, so the down-projection does k/hidden of the dense work."""

    def __init__(self, config):
        super().__init__(config)
        self.hidden = 4 * config.n_embd
        self.k = max(1, round(config.sparsity_ratio * self.hidden))
        self.gather = True  # inference path; set False (set_topk_gather) to time the masked path in eval
        self._rows = None  # (version, c_proj.weight.T contiguous): the rows embedding_bag reads

    def forward(self, x):
        if self.training or not self.gather:
            return self.forward_masked(x)
        return self.forward_gathered(x)

    def top_units(self, x):
        """The k kept units per token: their GELU outputs (B, T, k) and indices (B, T, k)."""
        u, idx = self.c_fc(x).topk(self.k, dim=-1, sorted=False)  # (B, T, k) of the (B, T, 4C) pre-activations
        return self.gelu(u), idx

    def forward_masked(self, x):
        vals, idx = self.top_units(x)
        h = torch.zeros(*x.shape[:-1], self.hidden, dtype=vals.dtype, device=x.device).scatter(-1, idx, vals)
        return self.dropout(self.c_proj(h))  # (B, T, C)

    def forward_gathered(self, x):
        B, T, C = x.shape
        vals, idx = self.top_units(x)
        # y[n] = sum_j vals[n, j] * W.T[idx[n, j]]: k rows of C numbers per token instead of 4C
        rows = self.down_rows()  # (4C, C)
        weights = vals.view(B * T, self.k).to(rows.dtype)
        y = F.embedding_bag(idx.view(B * T, self.k), rows, per_sample_weights=weights, mode='sum')  # (B*T, C)
        if self.c_proj.bias is not None:
            y = y + self.c_proj.bias
        return self.dropout(y.view(B, T, C))

    def down_rows(self):
        """c_proj.weight.T as a contiguous (4C, C) table, rebuilt whenever the weight changes in place
        (optimizer step, load_state_dict) or moves (.to): the gathered path reads rows, the weight is
        stored (C, 4C) so that nanoGPT checkpoints load. Costs one extra copy of c_proj at inference."""
        w = self.c_proj.weight
        key = (w._version, w.data_ptr(), w.dtype)
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, w.detach().t().contiguous())
        return self._rows[1]

    def cost(self):
        """The whole up-projection, then k of the 4C rows of the down-projection when gathered (all when masked)."""
        down = self.k / self.hidden if self.gather and not self.training else 1.0
        return module_cost(self.c_fc) + module_cost(self.c_proj) * down


def set_topk_gather(model, gather):
    """Choose the inference path of every TopKMLP in model: gathered (True) or masked (False)."""
    for m in model.modules():
        if isinstance(m, TopKMLP):
            m.gather = gather


class TEALMLP(MLP):
    """A trained dense MLP (same parameters) that drops, at inference, every hidden activation whose magnitude is
    under a per-layer threshold, training-free (TEAL, Liu et al. 2024): unit j of token n is kept when
    |h[n, j]| > threshold, so the kept count varies per token. teal_sparsify sets the threshold from calibration
    data so that the target fraction of activations falls under it.

    Two paths compute the same function, chosen with use_gathered (not per call):
      masked   (the reference): the dense down-projection over h with the dropped units zeroed.
      gathered (decode): F.embedding_bag reads only the rows of c_proj.weight.T that kept units multiply, one bag
               per token, so the down-projection does (1 - sparsity) of the dense work on average."""

    down_rows = TopKMLP.down_rows  # the same contiguous (4C, C) table of c_proj.weight.T, rebuilt when it changes

    def __init__(self, config, threshold, sparsity, gather=True):
        super().__init__(config)
        self.threshold, self.sparsity = threshold, sparsity
        self._rows = None
        self.use_gathered(gather)

    def use_gathered(self, gather):
        """Choose the down-projection path: gathered rows (True) or the masked dense reference (False)."""
        self.down = self.down_gathered if gather else self.down_masked
        self.down_share = 1 - self.sparsity if gather else 1.0  # of c_proj's work, for cost()

    def forward(self, x):
        h = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.down(h, h.abs() > self.threshold))

    def down_masked(self, h, keep):
        return self.c_proj(h * keep)

    def down_gathered(self, h, keep):
        # y[n] = sum over kept j of h[n, j] * W.T[j]: token n's bag is its kept units, in token order
        B, T, H = h.shape
        flat = keep.view(-1).nonzero().view(-1)  # (M,) kept positions of the (B*T*4C) activations, ascending
        rows = self.down_rows()  # (4C, C)
        weights = h.reshape(-1).index_select(0, flat).to(rows.dtype)  # (M,) their activations
        starts = torch.searchsorted(flat, torch.arange(0, B * T * H, H, device=h.device))  # (B*T,) each token's first
        y = F.embedding_bag(flat.remainder(H), rows, starts, mode='sum', per_sample_weights=weights)
        if self.c_proj.bias is not None:
            y = y + self.c_proj.bias
        return y.view(B, T, -1)  # (B, T, C)

    def cost(self):
        """The whole up-projection, then the kept share of the down-projection's rows (its target, 1 - sparsity)."""
        return module_cost(self.c_fc) + module_cost(self.c_proj) * self.down_share


def dense_mlp_holders(model):
    """The blocks (a Ponder's or router's inner block) whose MLP is nanoGPT's dense one."""
    return [h for h in (getattr(b, 'block', b) for b in model.transformer.h) if type(h.mlp) is MLP]


@torch.no_grad()
def teal_sparsify(model, sparsity, tokens, gather=True):
    """TEAL on a trained model: each dense MLP becomes a TEALMLP with its weights and its own threshold, the
    `sparsity` quantile of its |hidden activations| over the calibration tokens (B, T) (training data, read
    through the dense model). Returns the thresholds, layer by layer."""
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 < sparsity < 1:
        raise ValueError(f"TEAL sparsity is the fraction of activations dropped, in (0, 1), not {sparsity!r}")
    holders = dense_mlp_holders(model)
    if not holders:
        raise ValueError("TEAL needs dense MLPs, and this model has none (its MLPs are top-k or mixtures of experts)")
    seen = [[] for _ in holders]  # per layer: |h| of the calibration tokens (a pondering layer's every step)
    g = torch.Generator(tokens.device).manual_seed(0)

    def record(i, h):  # h (B, T, 4C); a large model's values are sampled, at most CALIBRATION_SAMPLE per call
        v = h.abs().flatten().float()
        seen[i].append(v if v.numel() <= CALIBRATION_SAMPLE else
                       v[torch.randint(v.numel(), (CALIBRATION_SAMPLE,), generator=g, device=v.device)])
    hooks = [h.mlp.c_proj.register_forward_pre_hook(lambda m, args, i=i: record(i, args[0]))
             for i, h in enumerate(holders)]
    was_training = model.training
    for chunk in tokens.split(4):  # a few windows at a time: GPT-2's activations over 16 windows are large
        model.eval()(chunk)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    thresholds = []
    for holder, parts in zip(holders, seen):
        values = torch.cat(parts)
        threshold = values.kthvalue(max(1, round(sparsity * values.numel()))).values.item()
        mlp = holder.mlp
        holder.mlp = TEALMLP(model.config, threshold, sparsity, gather).to(mlp.c_fc.weight.device, mlp.c_fc.weight.dtype)
        holder.mlp.load_state_dict(mlp.state_dict())
        thresholds.append(threshold)
    return thresholds


def set_teal_gather(model, gather):
    """Choose the down-projection path of every TEALMLP in model: gathered (True) or masked (False)."""
    for m in model.modules():
        if isinstance(m, TEALMLP):
            m.use_gathered(gather)


@torch.no_grad()
def teal_measured_sparsity(model, tokens):
    """The fraction of hidden activations each TEALMLP of model drops over tokens (B, T), layer by layer."""
    mlps = [m for m in model.modules() if isinstance(m, TEALMLP)]
    dropped = [[] for _ in mlps]  # per layer: (dropped, total) of each call
    hooks = [m.c_fc.register_forward_hook(lambda c_fc, args, u, i=i, m=m: dropped[i].append(
        ((m.gelu(u).abs() <= m.threshold).sum().item(), u.numel()))) for i, m in enumerate(mlps)]
    was_training = model.training
    model.eval()(tokens)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return [sum(d for d, _ in calls) / sum(n for _, n in calls) for calls in dropped]


CALIBRATION_WINDOWS = 16  # TEAL: block_size windows of the training split that its thresholds are set on
CALIBRATION_SAMPLE = 2 ** 21  # TEAL: activations kept per layer and forward of 4 windows (all of them up to 512 dims)


def calibration_windows(data, block_size, n=CALIBRATION_WINDOWS):
    """n windows of block_size tokens spread evenly over data (a 1-D token array, e.g. train.bin): (n, block_size)"""
    starts = np.linspace(0, len(data) - block_size - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([data[s:s + block_size] for s in starts]).astype(np.int64))


class MoEMLP(nn.Module):
    """Mixture of experts (Switch Transformer; top-2 as in GShard/Mixtral): a float32 router picks
    experts_top_k of num_experts full-size MLPs per token, and each expert runs only on its tokens
    (dropless: no capacity limit, no token is dropped), so the work is top_k/E of running every expert.
    Top-1 scales the expert's output by its router probability p (so the router learns from the LM loss);
    top-2 renormalises the pair's probabilities to sum to 1, keeping the output's scale a dense MLP's.
    Training adds the Switch load-balancing loss and the router z-loss to self.aux."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.experts_top_k
        self.router = nn.Linear(config.n_embd, config.num_experts, bias=False)
        self.experts = nn.ModuleList([MLP(config) for _ in range(config.num_experts)])
        self.aux_weights = (config.router_aux_loss_weight, config.router_z_loss_weight)
        self.aux = {}
        self.reset_expert_load()

    def route(self, x):
        """Router logits (N, E) and probabilities (N, E) in float32, and the chosen experts (N, k) with
        their mixing weights (N, k), for the N = B*T tokens of x (N, C)."""
        with torch.autocast(x.device.type, enabled=False):  # softmax over few logits: bf16 rounding flips choices
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, experts

    def forward(self, x):
        B, T, C = x.shape
        x = x.view(B * T, C)
        logits, probs, weights, experts = self.route(x)
        weights = weights.to(x.dtype)
        # At inference, when every token chose the same experts (always so at batch-1 decode), those experts
        # run on x itself: no sort, gather or scatter. Otherwise, and always while training, dispatch.
        chosen = None if self.training else experts.tolist()  # (N, k) on the host
        if chosen and chosen.count(chosen[0]) == len(chosen):
            y = self.run_shared(x, weights, chosen[0])
        else:
            y = self.dispatch(x, weights, experts)
        self.aux = self.router_losses(logits, probs, experts) if self.training else {}
        return y.view(B, T, C)

    def run_shared(self, x, weights, chosen):
        """Every token of x (N, C) chose the experts `chosen` (k ints), with weights (N, k). (N, C)"""
        for e in chosen:
            self.expert_tokens[e] += x.size(0)
        y = self.experts[chosen[0]](x) * weights[:, :1]
        for slot, e in enumerate(chosen[1:], start=1):
            y = y + self.experts[e](x) * weights[:, slot:slot + 1]
        return y

    def dispatch(self, x, weights, experts):
        """Dropless dispatch of the N*k token-expert assignments: sorted by expert, each expert runs once on
        its contiguous slice of token rows, and the outputs, scaled by their weights, add back into place."""
        flat = experts.view(-1)  # (N*k,)
        order = flat.argsort(stable=True)
        sizes = torch.bincount(flat, minlength=self.num_experts).tolist()  # assignments per expert
        self.expert_tokens = [a + b for a, b in zip(self.expert_tokens, sizes)]
        token = order // self.top_k  # (N*k,) the token of each sorted assignment
        xs = x[token]  # (N*k, C)
        # While training, an expert with no tokens still runs (on 0 rows): its parameters then get a zero
        # gradient, so DDP's all-reduce sees every parameter on every rank. At inference it is skipped.
        ys = [expert(chunk) for expert, chunk, n in zip(self.experts, xs.split(sizes), sizes) if n or self.training]
        gate = weights.view(-1)[order].unsqueeze(1)  # (N*k, 1)
        return torch.zeros_like(x).index_add_(0, token, torch.cat(ys) * gate)  # (N, C)

    def router_losses(self, logits, probs, experts):
        """Switch's balance loss E * sum_i f_i * P_i (f_i: share of the token-expert assignments routed to
        expert i, P_i: mean router probability of expert i; 1 when uniform, E when one expert takes every
        token with certainty) and the z-loss mean(logsumexp(logits)^2), which keeps the logits small."""
        f = F.one_hot(experts, self.num_experts).float().mean(dim=(0, 1))  # (E,)
        balance = self.num_experts * (f * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return {'moe_balance': (self.aux_weights[0], balance), 'router_z': (self.aux_weights[1], z)}

    def cost(self):
        """The router and top_k of the experts: at batch 1 only the chosen experts' weights are read."""
        return module_cost(self.router) + self.experts[0].cost() * self.top_k

    def reset_expert_load(self):
        # token-expert assignments per expert since the last reset, counted on the host (the split sizes
        # are there anyway): per process, not saved, and not a buffer that DDP would overwrite from rank 0
        self.expert_tokens = [0] * self.num_experts

    def expert_load(self):
        """Fraction of the token-expert assignments each expert received since the last reset."""
        return [n / max(1, sum(self.expert_tokens)) for n in self.expert_tokens]


class Tokens:
    """The tokens a routed layer runs, without a cache (training and the reference path): their absolute
    positions (B, n), in text order, so that causal attention among them is causal in the text; or an int p when
    every token runs (positions p, p+1, ...)."""

    def __init__(self, positions):
        self.positions = positions

    def update(self, k, v):
        return k, v, None


class RoutedSelfAttention(CausalSelfAttention):
    """Full causal attention among the tokens a Mixture-of-Depths router sent through its layer. route (Tokens, or
    the layer's RoutedKVCache at decode) gives their absolute positions, where rotary positions turn q and k, and
    the keys they read: earlier routed tokens only. Same parameters as the baseline's attention."""

    def __init__(self, config, rope):
        super().__init__(config)
        self.rotary = Rotary(config.n_embd // config.n_head, config.rope_base, config.block_size) if rope else None

    def forward(self, x, route):
        B, T, C = x.size()
        q, k, v = map(self.heads, self.c_attn(x).split(self.n_embd, dim=2))  # (B, nh, T, hs)
        if self.rotary is not None:
            p = route.positions
            q, k = self.rotary(q, k, p) if isinstance(p, int) else rotate_at(self.rotary, q, k, p)
        k, v, mask = route.update(k, v)  # (B, nh, S, hs); mask (B, 1, T, S) when the rows hold different counts
        dropout_p = self.attn_dropout if self.training else 0.0
        y = attend(q, k, v, dropout_p) if mask is None else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def rotate_at(rotary, q, k, positions):
    """q, k (B, nh, T, hs) rotated by their absolute positions (B, T), which need not be consecutive (the
    Rotary module's formula, read from its tables)."""
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)  # (B, 1, T, hs)
    qk = torch.cat([q, k], dim=1)  # (B, 2·nh, T, hs)
    x1, x2 = qk.chunk(2, dim=-1)
    qk = qk * cos + torch.cat([x2, x1], dim=-1) * sin
    return qk.type_as(q).split(q.size(1), dim=1)


class RoutedKVCache:
    """The KV cache of a routed layer: keys and values of only the tokens that went through it, packed per row
    (row b holds its routed tokens in text order), so a skipped token writes nothing and later tokens attend
    only to routed ones. len counts every position seen, routed or not (the model reads positions from it);
    routed[b][t] is how many of row b's first t positions went through, so truncate(n) is exact."""

    def __init__(self, batch_size, n_head, max_len, head_size, device=None, dtype=None):
        shape = (batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.reset()

    def reset(self):
        self.routed = [[0] for _ in range(self.k.size(0))]
        self.len = 0
        self.positions = None  # of the tokens running now (select): (B, n), or an int when all run

    def select(self, offsets):
        """The tokens at offsets (B, n) of the next positions are about to run, or all of them (offsets None).
        Returns self, their route."""
        self.positions = self.len if offsets is None else self.len + offsets
        return self

    def update(self, k, v):
        """Append the running tokens' k, v (B, nh, n, hs) after each row's routed tokens; returns what attention
        reads (B, nh, S, hs) and, when the rows hold different counts, the (B, 1, n, S) mask of each row's keys.
        Rows with fewer tokens running than n write their padding past their end, where nothing reads it."""
        B, n = k.size(0), k.size(2)
        held = [r[-1] for r in self.routed]
        if held.count(held[0]) == B:  # every row holds as many: causal attention over the first held + n slots
            S = held[0] + n
            self.k[:, :, held[0]:S], self.v[:, :, held[0]:S] = k, v
            return self.k[:, :, :S], self.v[:, :, :S], None
        slots = torch.tensor(held, device=k.device)[:, None] + torch.arange(n, device=k.device)  # (B, n)
        rows = torch.arange(B, device=k.device)[:, None]
        self.k[rows, :, slots], self.v[rows, :, slots] = k.transpose(1, 2), v.transpose(1, 2)  # (B, n, nh, hs)
        S = max(held) + n
        mask = torch.arange(S, device=k.device) <= slots[..., None]  # (B, n, S): a row's keys up to the query's own
        return self.k[:, :, :S], self.v[:, :, :S], mask[:, None]

    def advance(self, chosen):
        """Record the next positions: chosen[b] lists, for each, whether row b's token went through."""
        for r, went in zip(self.routed, chosen):
            for g in went:
                r.append(r[-1] + g)
        self.len += len(chosen[0])

    def truncate(self, n):
        """Forget every position from n on (speculative rollback): each row keeps its routed tokens before n."""
        for r in self.routed:
            del r[n + 1:]
        self.len = min(self.len, n)

    @property
    def nbytes(self):
        """Bytes of the keys and values held (the routed tokens only)."""
        return 2 * sum(r[-1] for r in self.routed) * self.k[0, :, :1].nelement() * self.k.element_size()


ATTN = {
    # nanoGPT's attention, or with the per-head qk norm the attention that transforms q and k (no rotation)
    'full': lambda config: RotarySelfAttention(config, rope=False) if config.qk_norm else CausalSelfAttention(config),
    'full_rope': RotarySelfAttention,
    'local': lambda config: LocalSelfAttention(config, rope=False),
    'local_rope': lambda config: LocalSelfAttention(config, rope=True),
    'routed': lambda config: RoutedSelfAttention(config, rope=False),  # a Mixture-of-Depths layer's
    'routed_rope': lambda config: RoutedSelfAttention(config, rope=True),
}


def full_cache(c, batch_size, max_len, device, dtype, rollback):
    return KVCache(batch_size, c.n_head, max_len, c.n_embd // c.n_head, device, dtype)


def rolling_cache(c, batch_size, max_len, device, dtype, rollback):  # w (+ sinks, rollback) slots, whatever max_len
    return RollingKVCache(batch_size, c.n_head, c.local_attention_window, c.n_embd // c.n_head,
                          c.attention_sinks, rollback, device, dtype)


def routed_cache(c, batch_size, max_len, device, dtype, rollback):
    return RoutedKVCache(batch_size, c.n_head, max_len, c.n_embd // c.n_head, device, dtype)


CACHE = {'full': full_cache, 'full_rope': full_cache, 'local': rolling_cache, 'local_rope': rolling_cache,
         'routed': routed_cache, 'routed_rope': routed_cache}

FFN = {'dense': MLP, 'topk': TopKMLP, 'moe': MoEMLP}


class SoftCapHead(nn.Linear):
    """The LM head with its logits soft-capped: c·tanh(logits / c) stays within ±c (Gemma 2; the modded-nanogpt
    speedrun). Same parameter (lm_head.weight) and the same matmul as the plain head."""

    def __init__(self, n_embd, vocab_size, cap):
        super().__init__(n_embd, vocab_size, bias=False)
        self.cap = cap

    def forward(self, x):
        return self.cap * torch.tanh(super().forward(x) / self.cap)


class Smear(nn.Module):
    """One-token look-back at the input (the modded-nanogpt speedrun's smear): each token's embedding adds a gated
    share of the previous token's, x_t + λ·σ(w·x_t[:g])·x_{t-1}, so the first layer already sees the bigram.
    λ starts at 0 (the plain embedding) and the gate reads the first g channels. The first position of a sequence
    adds nothing; at decode the previous embedding comes from the SmearState at cache[slot]."""

    def __init__(self, config, slot):
        super().__init__()
        self.gate = nn.Linear(min(12, config.n_embd), 1, bias=False)
        self.scale = nn.Parameter(torch.zeros(1))  # λ
        self.slot = slot  # where the model's cache list holds this module's state

    def forward(self, x, cache=None):
        prev = F.pad(x[:, :-1], (0, 0, 1, 0)) if cache is None else cache[self.slot].update(x)  # (B, T, C)
        return x + self.scale * torch.sigmoid(self.gate(x[..., :self.gate.in_features])) * prev

    def cost(self):
        """The gate and λ over one token (the previous embedding is held, not recomputed)."""
        return module_cost(self)


def keep_input(x, cache=None):
    return x


class SmearState:
    """What Smear reads at decode: the input embeddings of the last 1 + rollback positions (zeros before the
    first), so the next position finds its predecessor. Counts positions like a KV cache (len)."""

    def __init__(self, batch_size, n_embd, rollback=0, device=None, dtype=None):
        self.keep = 1 + rollback
        self.zeros = torch.zeros(batch_size, 1, n_embd, device=device, dtype=dtype)
        self.reset()

    def update(self, x):
        """x (B, T, C): the embeddings of positions len .. len+T-1; returns each one's predecessor (B, T, C)."""
        prev = torch.cat([self.recent[:, -1:], x[:, :-1]], dim=1)
        self.recent = torch.cat([self.recent, x], dim=1)[:, -self.keep:]
        self.len += x.size(1)
        return prev

    def truncate(self, n):
        if n >= self.len:
            return
        back = self.len - n
        if n and back >= self.recent.size(1):
            raise ValueError(f"cannot roll the smear state back from {self.len} to {n} positions: it holds the last "
                             f"{self.keep}; build the cache with new_cache(rollback=...) for more")
        self.recent = self.recent[:, :self.recent.size(1) - back] if n else self.zeros
        self.len = n

    def reset(self):
        self.recent = self.zeros  # (B, held, C); the zeros stand before position 0
        self.len = 0

    @property
    def nbytes(self):
        return self.recent.nelement() * self.recent.element_size()


class ValueEmbeddings(nn.Module):
    """Value embeddings (the modded-nanogpt speedrun): a token table per chosen layer whose row is added to that
    layer's values, so attention can move a token's identity without the residual stream carrying it. The model
    looks the rows up once per forward (forward(idx)); each chosen layer's c_attn, a ValueQKV, adds its row to the
    value third of its output, so every path that projects values (forward, K/V propagation) sees the same."""

    def __init__(self, config, layers):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(config.vocab_size, config.n_embd) for _ in layers)
        for t in self.tables:
            nn.init.normal_(t.weight, mean=0.0, std=0.02)
        self.layers = layers
        self.inputs = []  # the ValueQKV modules fed, one per table (a plain list: they belong to their attention)

    def attach(self, blocks):
        """Make each chosen layer's c_attn a ValueQKV with the same weights, and feed it."""
        for i in self.layers:
            attn = blocks[i].attn
            attn.c_attn = ValueQKV.of(attn.c_attn)
            self.inputs.append(attn.c_attn)

    def forward(self, idx):
        for table, qkv in zip(self.tables, self.inputs):
            qkv.rows = table(idx)  # (B, T, C)
        return idx

    def cost(self):
        """One row of each table read per token (a lookup: no multiply)."""
        return lookup_cost(*self.tables)


def lookup_cost(*tables):
    """One row of each embedding table read per token: weight bytes, no multiply."""
    return Cost(0, sum(t.weight[0].numel() * t.weight.element_size() for t in tables))


class ValueQKV(nn.Linear):
    """c_attn whose value third adds the row of a value embedding for the same tokens (set before each forward)."""

    @classmethod
    def of(cls, linear):
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device='meta')  # no init
        m.weight, m.bias = linear.weight, linear.bias
        m.rows = None
        return m

    def forward(self, x):
        y = super().forward(x)  # (B, T, 3C): q, k, v
        C = self.rows.size(-1)
        y[..., -C:] += self.rows
        return y


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
        self.reset_step_count()

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
        if not self.training:  # a tensor sum: counting adds no host sync to decode
            self.steps_run, self.positions_run = self.steps_run + steps.sum(), self.positions_run + steps.numel()
        return out

    def reset_step_count(self):
        self.steps_run, self.positions_run = 0, 0  # ponder steps and positions run in eval since the reset

    def mean_steps(self):
        """Mean ponder steps per position run in eval since reset_step_count(); None before any."""
        return float(self.steps_run) / self.positions_run if self.positions_run else None

    def new_cache(self, make_cache, max_len):
        return StepCaches(make_cache(max_len) for _ in range(self.max_steps))

    def cost(self, keys):
        """A token that ponders the measured mean steps (mean_steps(); all of them before any were counted):
        the block and the halting unit per step, then one K/V projection of the final state per step skipped."""
        steps = self.mean_steps() or self.max_steps
        C = self.block.attn.n_embd
        kv = weights_cost(self.block.attn.c_attn.weight[C:])  # the K and V rows (2C, C)
        return (block_cost(self.block, keys) + module_cost(self.halt)) * steps + kv * (self.max_steps - steps)


def append_kv(attn, x, cache):
    """Append the keys and values that attention `attn` computes from x (B, T, C) to cache, without
    the queries or the attention itself (state propagation for skipped steps)."""
    _, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
    attn.store(attn.heads(k), attn.heads(v), cache)


class RoutingStats:
    """What a MixtureOfDepths router decided: the tokens that ran the block and the positions seen in eval since
    reset_counts(), and the last forward's decisions and logits."""

    def __init__(self):
        self.tokens_run = self.positions_seen = 0
        self.chosen = self.logits = None


def straight_through(logits):
    """1 in the forward pass, sigmoid's gradient in the backward."""
    s = torch.sigmoid(logits)
    return s - s.detach() + 1


# mod_router_scale: (update weights of the chosen tokens from their router logits, the same for one logit as a float)
ROUTER_SCALES = {'sigmoid': (torch.sigmoid, lambda logit: 1 / (1 + math.exp(-logit))),
                 'straight': (straight_through, lambda logit: 1.0)}


class MixtureOfDepths(nn.Module):
    """Mixture-of-Depths (Raposo et al. 2024) around one block: a router (a Linear C -> 1) scores every token and only
    the tokens it picks run the block; the others pass on the residual stream unchanged. A token that runs gets
    x + w·(block(x) - x): its update scaled by its router weight w = sigmoid(logit), through which the router
    learns from the LM loss. With mod_router_scale='straight' the update runs at full strength (w = 1 in the forward
    pass) and the router still learns through sigmoid's gradient (a straight-through estimator), so a routed
    token's block computes what a dense block does.

    Training runs the top mod_capacity fraction of each sequence's tokens (fixed shapes: gather, block, scatter;
    attention among them in text order, rotary positions at their own positions). Top-k looks at the whole
    sequence, which decode cannot, so the router's sigmoid is also trained (a BCE aux loss, whose gradient stops
    at the router's input) to predict top-k membership, and outside training a token runs when sigmoid(logit)
    > 0.5, decided from the token alone: the uncached reference path and the cached decode route alike, and a
    skipped token writes no K/V (RoutedKVCache). With capacity 1 every token runs, in every mode."""

    def __init__(self, block, config):
        super().__init__()
        self.block = block
        self.router = nn.Linear(config.n_embd, 1)
        self.capacity = config.mod_capacity
        self.router_loss_weight = config.mod_router_loss_weight
        self.scale, self.scale_one = ROUTER_SCALES[config.mod_router_scale]
        self.topk_in_eval = False  # outside training, route by top-k as training does (set_mod_routing)
        self.aux = {}
        self.stats = RoutingStats()

    def forward(self, x, cache=None):
        B, T, C = x.shape
        topk = self.training or self.topk_in_eval
        if cache is not None and B * T == 1 and self.capacity < 1:
            return self.decode_one(x, cache)
        logits = self.router(x).squeeze(-1)  # (B, T)
        k = T if self.capacity >= 1 else math.ceil(self.capacity * T) if topk else None
        if k == T:  # every token runs
            chosen, idx, counts = torch.ones_like(logits, dtype=torch.bool), None, [T] * B
        elif topk:
            assert cache is None, "top-k routing reads the whole sequence: it has no cached decode"
            idx = logits.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values  # (B, k) in text order
            chosen, counts = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True), [k] * B
        else:  # sigmoid(logit) > 0.5
            chosen = logits > 0
            counts = chosen.sum(dim=1).tolist()
            # one token per row (batched decode): every row runs when any does, the unchosen ones as padding; else
            # each row's chosen tokens first, in text order, then unchosen ones as padding
            idx = None if T == 1 or min(counts) == T else \
                torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices[:, :max(counts)]  # (B, n)
        y = self.run(x, logits, chosen, idx, counts, cache) if max(counts) else x
        if cache is not None:
            cache.advance(chosen.tolist())
        if self.training:
            # the predictor's loss trains the router alone: its gradient into the residual stream cost 2.5% val loss
            own = F.linear(x.detach(), self.router.weight, self.router.bias).squeeze(-1)
            self.aux = {'mod_router': (self.router_loss_weight,
                                       F.binary_cross_entropy_with_logits(own, chosen.to(logits.dtype)))}
        else:
            self.aux = {}
            self.stats.tokens_run += sum(counts)
            self.stats.positions_seen += B * T
        self.stats.chosen, self.stats.logits = chosen, logits.detach()
        return y

    @property
    def chosen(self):
        """(B, T) bool: which tokens ran the block in the last forward."""
        c = self.stats.chosen
        return torch.tensor([[c]]) if isinstance(c, bool) else c

    @property
    def logits(self):
        """(B, T) router logits of the last forward (None after a single decode token, decided on the host)."""
        return self.stats.logits

    def run(self, x, logits, chosen, idx, counts, cache):
        """The block over the chosen tokens of x (B, T, C) and some padding: every token (idx None), or those at
        idx (B, n), where a row with fewer chosen tokens than n pads with unchosen ones. Padding runs and is written
        back unchanged (weight 0). Returns x with the chosen tokens' updates, x + w·(block(x) - x)."""
        if idx is None:
            xs, w, at = x, self.scale(logits), None
            if min(counts) < x.size(1):
                w = w * chosen
        else:
            at = idx[..., None].expand(-1, -1, x.size(2))
            xs, w = x.gather(1, at), self.scale(logits.gather(1, idx))  # (B, n, C), (B, n)
            if min(counts) < idx.size(1):
                w = w * (torch.arange(idx.size(1), device=x.device) < torch.tensor(counts, device=x.device)[:, None])
        route = Tokens(0 if idx is None else idx) if cache is None else cache.select(idx)
        y = torch.lerp(xs, self.block(xs, route), w[..., None].to(xs.dtype))
        return y if idx is None else x.scatter(1, at, y)

    def decode_one(self, x, cache):
        """One token of a cached decode (x: (1, 1, C)): the router's logit, one matrix-vector product read on the
        host, decides, so a skipped token costs the router alone."""
        logit = torch.addmv(self.router.bias, self.router.weight, x.view(-1)).item()
        went = logit > 0
        stats = self.stats  # a plain object: no nn.Module attribute hooks on this per-token path
        stats.chosen, stats.logits = went, None
        stats.tokens_run += went
        stats.positions_seen += 1
        y = torch.lerp(x, self.block(x, cache.select(None)), self.scale_one(logit)) if went else x
        cache.advance([[went]])
        return y

    def new_cache(self, make_cache, max_len):
        return self.block.new_cache(make_cache, max_len)

    def reset_counts(self):
        self.stats.tokens_run = self.stats.positions_seen = 0

    def fraction_run(self):
        """Fraction of the positions seen in eval since reset_counts() whose token ran the block; None before any."""
        s = self.stats
        return s.tokens_run / s.positions_seen if s.positions_seen else None

    def cost(self, keys):
        """The router, then the block for the measured fraction f of tokens (fraction_run(); the capacity before
        any was counted), attending to the f·keys routed tokens its cache holds."""
        f = self.fraction_run()
        f = self.capacity if f is None else f
        return module_cost(self.router) + self.block.cost(keys * f) * f


def set_mod_routing(model, topk):
    """Route every MixtureOfDepths layer of model outside training by top-k over the sequence (True: training's
    semantics, with no cached decode) or by the causal sigmoid(logit) > 0.5 decision (False, the default)."""
    for m in model.modules():
        if isinstance(m, MixtureOfDepths):
            m.topk_in_eval = topk
