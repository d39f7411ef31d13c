"""
The baseline GPT: nanoGPT's model (same parameter names, init and weight tying, so nanoGPT checkpoints
load) plus a KV cache for generation. Every speed figure of EfficientGPT is measured against this
model's cached decode, and its uncached reference path is what nanoGPT's `generate` does.
"""

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    mlp_act: str = 'gelu'  # MLP activation: 'gelu' (nanoGPT), 'gelu_tanh' (GPT-2's own weights), 'relu2' (relu(x)²)

    def __post_init__(self):
        """A size that cannot build a model is named here, before torch fails on it."""
        small = [k for k in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd') if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(f'{k}={getattr(self, k)}' for k in small)}: must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.mlp_act not in ACTIVATIONS:
            raise ValueError(f"mlp_act must be one of {', '.join(map(repr, ACTIVATIONS))}, not {self.mlp_act!r}")


@dataclass
class Cost:
    """The work of one token at decode, counted from what runs: matmul FLOPs (2 per multiply-add) and the
    bytes of weights read. Modules report theirs with cost(); the model sums them (GPT.decode_cost)."""
    flops: float = 0.0
    weight_bytes: float = 0.0

    def __add__(self, other):
        return Cost(self.flops + other.flops, self.weight_bytes + other.weight_bytes)

    def __mul__(self, scale):
        return Cost(self.flops * scale, self.weight_bytes * scale)

    __rmul__ = __mul__


def weights_cost(*tensors):
    """Every element of these weight tensors read once and used in one multiply-add."""
    return Cost(2 * sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors))


def module_cost(module):
    """A module whose every parameter is used once per token (a dense Linear, an MLP, a LayerNorm)."""
    return weights_cost(*module.parameters())


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of one attention layer, preallocated for max_len positions.
    update() appends this step's k, v and returns everything attention reads (gpt-fast's shape)."""

    def __init__(self, batch_size, n_head, max_len, head_size, device=None, dtype=None):
        shape = (batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.len = 0  # positions held

    def update(self, k, v):
        # k, v: (B, nh, T, hs) for positions len .. len+T-1
        start, end = self.len, self.len + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def truncate(self, n):
        """Forget every position from n on (speculative decoding rolls back with this)."""
        self.len = min(self.len, n)

    def reset(self):
        self.len = 0

    @property
    def nbytes(self):
        """Bytes of the keys and values held."""
        return 2 * self.len * self.k[:, :, :1].nelement() * self.k.element_size()


def causal_mask(T, S, device):
    """(T, S) bool mask for T queries that are the last T of S positions: query i sees keys <= S-T+i.
    SDPA's is_causal aligns the triangle top-left, which is wrong once a cache holds earlier keys."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd ({config.n_embd}) must divide by n_head ({config.n_head})"
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def heads(self, t):
        B, T, C = t.size()
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = map(self.heads, self.c_attn(x).split(self.n_embd, dim=2))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, S, hs): the cached positions, then these T
        y = attend(q, k, v, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def store(self, k, v, cache):
        """Append keys and values computed outside forward (B, nh, T, hs) to cache, positioned as forward
        positions its own (state propagation of skipped steps and layers). Learned positions: as they are."""
        cache.update(k, v)

    def cost(self, keys):
        """One query: the projections, then q.k and att.v over `keys` cached positions."""
        return module_cost(self) + Cost(2 * 2 * self.n_embd * keys)


def attend(q, k, v, dropout_p=0.0):
    """Causal attention of T queries (the last T positions) over S >= T keys. (B, nh, T, hs)"""
    T, S = q.size(2), k.size(2)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:  # one new token sees every cached position: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device), dropout_p=dropout_p)


class ReLU2(nn.Module):
    """relu(x)² (Primer, So et al. 2021), the modded-nanogpt speedrun's MLP activation."""

    def forward(self, x):
        return F.relu(x).square()


ACTIVATIONS = {'gelu': nn.GELU, 'gelu_tanh': lambda: nn.GELU(approximate='tanh'), 'relu2': ReLU2}


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = ACTIVATIONS[config.mlp_act]()  # nanoGPT's attribute name, whatever the activation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    def cost(self):
        return module_cost(self)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x

    def cost(self, keys):
        return block_cost(self, keys)


def block_cost(block, keys):
    """A pre-norm block over one token that attends to `keys` positions: its slots as they execute."""
    return module_cost(block.ln_1) + block.attn.cost(keys) + module_cost(block.ln_2) + block.mlp.cost()


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 on CPU: torch runs it in bfloat16, which is
    fast on GPUs but about 30x slower than float32 on CPUs without bfloat16 units (a 384-dim training step went
    from 2 s to over 30 s). On CUDA it is bfloat16 as in torch, and the step is torch's: momentum lerp, Nesterov,
    the quintic iteration, decoupled decay, the shape-adjusted rate, the same state ('momentum_buffer').
    ns_dtype: the iteration's dtype; None picks bfloat16 on CUDA and float32 elsewhere."""

    def __init__(self, params, ns_dtype=None, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group['lr'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group['nesterov'] else buf
                update = orthogonalize(update, group['ns_coefficients'], group['ns_steps'], group['eps'],
                                       self.ns_dtype or (torch.bfloat16 if p.is_cuda else torch.float32))
                scale = 0.2 * math.sqrt(max(p.shape)) if group['adjust_lr_fn'] == 'match_rms_adamw' \
                    else math.sqrt(max(1, p.shape[0] / p.shape[1]))
                p.mul_(1 - lr * group['weight_decay'])
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


def orthogonalize(g, coefficients, steps, eps, dtype):
    """Muon's quintic Newton-Schulz iteration in dtype (Jordan et al. 2024): g (A, B) -> about U V^T of its SVD,
    computed on the wide side (the Gram matrix is min(A, B) square)."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype).T if tall else g.to(dtype)
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Optimizers:
    """Optimizers over disjoint parameters used as one (Muon's hidden matrices and AdamW's rest): param_groups
    lists every group, so a schedule sets each group's lr as it would for one optimizer; each optimizer steps at
    its lr_scale times that lr. The state dict holds each optimizer's, so a resumed run continues exactly."""

    def __init__(self, *scaled):
        self.optimizers = [o for o, _ in scaled]  # (optimizer, lr_scale) pairs
        self.lr_scales = [s for _, s in scaled]

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self, closure=None):
        for o, scale in zip(self.optimizers, self.lr_scales):
            lrs = [g['lr'] for g in o.param_groups]
            for g in o.param_groups:
                g['lr'] = g['lr'] * scale
            o.step()
            for g, lr in zip(o.param_groups, lrs):
                g['lr'] = lr  # the schedule's value, as set

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'optimizers': [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get('optimizers', ())) != len(self.optimizers):
            raise ValueError(f"an optimizer state of {len(state.get('optimizers', ()))} optimizers cannot load into "
                             f"{len(self.optimizers)} (was the run trained with another optimizer?)")
        for o, s in zip(self.optimizers, state['optimizers']):
            o.load_state_dict(s)


def token_probs(logits, temperature, top_k=None):
    """The distribution a token is drawn from: (..., V) logits -> (..., V) probabilities (temperature > 0)."""
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[..., [-1]], -float('inf'))
    return F.softmax(logits, dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """The one sampler: next token (B, 1) from last-position logits (B, vocab). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(token_probs(logits, temperature, top_k), num_samples=1, generator=generator)


def decode_tokens(next_logits, idx, max_new_tokens, choose):
    """The token loop of every decoder, evaluator and timer: yields each new token (B, 1) as it is chosen.
    next_logits(idx) gives the (B, V) logits of the token after idx (B, T); choose(logits) gives that token
    (a sampler, or the true next token when teacher forcing). The tokens go into a preallocated buffer and
    next_logits reads a view of it, so a step costs the same at the 100,000th token as at the first."""
    B, T = idx.shape
    buf = idx.new_empty(B, T + max_new_tokens)
    buf[:, :T] = idx
    for t in range(T, T + max_new_tokens):
        buf[:, t:t + 1] = choose(next_logits(buf[:, :t]))
        yield buf[:, t:t + 1]


def decoding(generate):
    """Run a generate method in inference mode: a decode step is many small ops, and autograd's
    per-op bookkeeping (which no_grad still does) is a measurable part of each. The tokens come back
    as an ordinary tensor, usable later in training."""
    @functools.wraps(generate)
    def run(*args, **kwargs):
        with torch.inference_mode():
            idx = generate(*args, **kwargs)
        return idx.clone()
    return run


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([self.make_block(i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = self.make_head()
        # weight tying: https://paperswithcode.com/method/weight-tying
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # scaled init of the residual projections, per the GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def make_block(self, layer):
        return Block(self.config)

    def make_head(self):
        return nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False)

    def set_progress(self, fraction):
        """Where training is, 0 .. 1, for losses on a schedule; the baseline has none."""

    def aux_losses(self):
        """{name: (weight, value)} of auxiliary losses from the last forward; the baseline has none."""
        return {}

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are subtracted by default (the token embeddings
        are tied to the LM head, so they count as weights)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and getattr(self.transformer, 'wpe', None) is not None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx, start=0):
        """Token plus position embeddings of idx (B, T) at positions start .. start+T-1. (B, T, C)"""
        T = idx.size(1)
        assert start + T <= self.config.block_size, \
            f"Cannot forward position {start + T - 1}, block size is only {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def forward(self, idx, targets=None, cache=None):
        """nanoGPT's forward: (logits, loss); logits of every position with targets, of the last one
        without. cache: a list of per-layer KVCache from new_cache(); idx then holds the new positions."""
        x = self.embed(idx, cache[-1].len if cache else 0)  # the last layer's cache counts every position
        x = self.run_layers(x, cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, -1:, :])  # inference: only the last position's logits
            loss = None
        return logits, loss

    def run_layers(self, x, cache=None):
        """The blocks in order over x (B, T, C); EfficientGPT overrides this to run other layouts."""
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache[i] if cache else None)
        return x

    def new_cache(self, batch_size, device=None, dtype=None):
        """One KVCache per layer, sized for block_size positions."""
        c = self.config
        p = self.lm_head.weight
        return [KVCache(batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
                        device or p.device, dtype or p.dtype) for _ in range(c.n_layer)]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw',
                             muon_lr_scale=1.0):
        """nanoGPT's AdamW ('adamw'), or 'muon': Muon (torch's, float32 on CPU) for the hidden matrices (every
        2-D weight but the embedding tables and the LM head) and AdamW for the rest. Muon scales its orthogonalised update to
        AdamW's RMS ('match_rms_adamw', Moonlight), so both follow learning_rate's schedule and share weight_decay;
        Muon's rate is muon_lr_scale times AdamW's."""
        if optimizer not in ('adamw', 'muon'):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")
        params = [p for p in self.parameters() if p.requires_grad]
        tables = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        tables.add(id(self.lm_head.weight))
        # a matrix with one row or column (a gate, a halting unit) is a vector to orthogonalise: AdamW's
        hidden = [p for p in params if p.dim() == 2 and min(p.shape) > 1 and id(p) not in tables] \
            if optimizer == 'muon' else []
        taken = {id(p) for p in hidden}
        rest = [p for p in params if id(p) not in taken]
        # every 2D parameter AdamW holds (matmul weights, embeddings) decays; biases, norms and scalars don't
        optim_groups = [
            {'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0},
        ]
        fused_available = 'fused' in inspect.signature(torch.optim.AdamW).parameters
        extra_args = dict(fused=True) if fused_available and device_type == 'cuda' else dict()
        adamw = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        if not hidden:
            return adamw
        muon = Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn='match_rms_adamw')
        return Optimizers((muon, muon_lr_scale), (adamw, 1.0))

    def head_cost(self):
        """The final norm and the LM head over one position."""
        return module_cost(self.transformer.ln_f) + weights_cost(self.lm_head.weight)

    def decode_cost(self, keys):
        """Work of one generated token that attends to `keys` positions: every layer, then the head (the
        token's embedding row is a lookup, not a matmul). Equals 2 * get_num_params() + 4 * n_layer *
        n_embd * keys FLOPs."""
        return sum((block.cost(keys) for block in self.transformer.h), Cost()) + self.head_cost()

    def next_logits(self, idx, cache=None):
        """Logits (B, vocab) for the token after idx (B, T), seeing at most block_size tokens as
        nanoGPT's cropping does. With a cache only the positions not yet cached are fed. Past
        block_size every position's embedding shifts, so nothing cached stays valid: the cache is
        refilled from the cropped context, which is exactly what the reference path computes."""
        if cache is None:
            logits, _ = self(idx[:, -self.config.block_size:])
        elif idx.size(1) > self.config.block_size:
            for c in cache:
                c.reset()
            logits, _ = self(idx[:, -self.config.block_size:], cache=cache)
        else:
            logits, _ = self(idx[:, cache[-1].len:], cache=cache)
        return logits[:, -1, :]

    @decoding
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens. temperature=0 is greedy. use_cache=False is the
        reference path: recompute the (cropped) context every step, like nanoGPT."""
        cache = self.new_cache(idx.size(0)) if use_cache else None
        new = decode_tokens(lambda context: self.next_logits(context, cache), idx, max_new_tokens,
                            lambda logits: sample_next(logits, temperature, top_k, generator))
        return torch.cat((idx, *new), dim=1)
