"""
The interchangeable parts of an EfficientGPT block. Each slot has a registry, and a block fills its
slots once in __init__ from the layer plan (model_efficient.LayerPlan):

    ATTN[kind](config) -> module with forward(x, cache=None) -> y, and cost(keys)     x, y: (B, T, C)
    FFN[kind](config)  -> module with forward(x) -> y, and cost()                      x, y: (B, T, C)
    CACHE[attn kind](config, batch_size, max_len, device, dtype, rollback) -> the KV cache attention reads

cost() is the model.Cost (FLOPs, weight bytes) one token executes on the path forward runs now, which the
model sums into its decode cost.

A module that adds a training loss stores it in `self.aux = {name: (weight, value)}` during forward;
EfficientGPT.aux_losses() gathers them and the training script adds Σ weight·value to the LM loss.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from local_attention import LocalSelfAttention, RollingKVCache, RotarySelfAttention
from model import MLP, CausalSelfAttention, KVCache, block_cost, module_cost, weights_cost


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


ATTN = {
    'full': CausalSelfAttention,
    'full_rope': RotarySelfAttention,
    'local': lambda config: LocalSelfAttention(config, rope=False),
    'local_rope': lambda config: LocalSelfAttention(config, rope=True),
}


def full_cache(c, batch_size, max_len, device, dtype, rollback):
    return KVCache(batch_size, c.n_head, max_len, c.n_embd // c.n_head, device, dtype)


def rolling_cache(c, batch_size, max_len, device, dtype, rollback):  # w (+ sinks, rollback) slots, whatever max_len
    return RollingKVCache(batch_size, c.n_head, c.local_attention_window, c.n_embd // c.n_head,
                          c.attention_sinks, rollback, device, dtype)


CACHE = {'full': full_cache, 'full_rope': full_cache, 'local': rolling_cache, 'local_rope': rolling_cache}

FFN = {'dense': MLP, 'topk': TopKMLP, 'moe': MoEMLP}


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
    cache.update(attn.heads(k), attn.heads(v))
