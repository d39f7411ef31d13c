"""
A static-shape decode step, gpt-fast's design: the KV caches are preallocated, the position is a tensor, every step
writes its keys and values at that position's slot and attends over all the slots under a mask. Every step then has
the same shapes, so torch.compile makes one graph for the whole generation and never recompiles as the cache grows
(model.compile() sees a new key length at every step).

It runs the dense models (nanoGPT's GPT and the strong baseline: full attention, learned or rotary positions, GELU
MLPs) and EfficientGPT's combination (config/efficient_gpt.py): local attention in any layer, the hourglass, rotary
positions past block_size. The layers of both kinds share one step and differ only in how their cache holds
positions: a full KVCache holds position p in slot p, a RollingKVCache in its round-robin slot, with its slot_pos
(which the window mask is read from) written in the graph too. The hourglass makes two step kinds, one graph each:
a token that closes a group runs the shortened layers once on the group's mean and writes the group's upsampled
update; the others only read it.

The prompt is prefilled by the model's own forward into the model's own caches (new_cache); with an hourglass the
last pre-shortening states and the last group's update are then copied from its HourglassState into static buffers.
Past block_size a model that does not stream shifts its positions, so nothing cached stays valid: there the step
is the model's own next_logits over the cropped context, exactly as generate() does. A streaming model (rotary,
every layer local) keeps stepping: its rotary angles past the Rotary table are computed as Rotary.angles does.
"""

from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from local_attention import LocalSelfAttention, Rotary, RotarySelfAttention, keep, window_mask
from model import MLP, CausalSelfAttention, LayerNorm, decode_tokens, decoding, sample_next


def why_not_static(model):
    """Why StaticDecoder cannot run this model ('' when it can): it runs plain pre-norm layers (full or local
    attention, learned or rotary positions, GELU MLPs), and the hourglass around them."""
    c = model.config
    if getattr(c, 'enable_early_exit', False):
        return "early exit has decode engines of its own"
    if getattr(c, 'smear', False) or getattr(c, 'value_embeds', 'none') != 'none' or type(model.lm_head) is not nn.Linear:
        return "smear, value embeddings and a soft-capped head are not in the static step"
    for i, block in enumerate(model.transformer.h):
        attn, mlp = getattr(block, 'attn', None), getattr(block, 'mlp', None)
        norm = getattr(getattr(attn, 'rotate', None), 'norm', None)
        if not (isinstance(getattr(block, 'ln_1', None), LayerNorm) and norm in (None, keep)
                and type(attn) in (CausalSelfAttention, RotarySelfAttention, LocalSelfAttention)):
            return (f"layer {i} is not full or local attention with learned or rotary positions "
                    f"(ACT, Mixture-of-Depths and qk_norm are not in the static step)")
        if not (type(mlp) is MLP and isinstance(mlp.gelu, nn.GELU)):
            return f"layer {i}'s MLP is not a GELU MLP (top-k and mixture-of-experts MLPs are not in the static step)"
    return ''


def full_slots(cache, pos):
    """A KVCache holds position p in slot p: the query at pos (1,) sees every slot up to it. Slot (1,), mask (1, S)"""
    return pos, torch.arange(cache.k.size(2), device=pos.device)[None] <= pos


def rolling_slots(cache, pos):
    """A RollingKVCache holds position p in the slot RollingKVCache.update writes it to, and records it in slot_pos;
    the query at pos (1,) sees the sinks and the last `window` positions held. Slot (1,), mask (1, S)"""
    s = cache.sinks
    slot = torch.where(pos < s, pos, s + (pos - s) % cache.ring)
    cache.slot_pos.index_copy_(0, slot, pos)
    return slot, window_mask(pos, cache.slot_pos, cache.window, s)[None]


def table_rotation(rotary, pos):
    """cos and signed sin (1, hs) at pos (1,) from the Rotary module's table (a model that never passes block_size)."""
    return rotary.cos[pos], rotary.sin[pos]


def streaming_rotation(rotary, pos):
    """As table_rotation, and past the table the angles computed as Rotary.angles does (a streaming model): both are
    computed and one is selected, so the step's ops never depend on the position."""
    inside = (pos < rotary.table_len)[:, None]  # (1, 1)
    table_cos, table_sin = table_rotation(rotary, pos.clamp(max=rotary.table_len - 1))
    cos, sin = rotary.angles(pos.float())
    return torch.where(inside, table_cos, cos), torch.where(inside, table_sin, sin)


def no_rotation(pos):
    return None


def rotated(qk, rotation):
    """q and k (2, B, nh, 1, hs) rotated together: x·cos + swap_halves(x)·sin, as Rotary.position does."""
    cos, sin = rotation
    return torch.addcmul(qk * cos, qk.roll(cos.size(-1) // 2, -1), sin)


def unrotated(qk, rotation):
    return qk  # learned positions entered with the embedding


def embed_learned(wte, wpe, token, pos):
    """Token (B, 1) plus its learned position embedding at pos (1,). (B, 1, C)"""
    return F.embedding(token, wte) + wpe[pos]


def embed_rotary(wte, token, pos):
    """Token (B, 1) alone: rotary positions enter through q and k. (B, 1, C)"""
    return F.embedding(token, wte)


class LayerStep:
    """One pre-norm block over one position: its weights, and, chosen here once, whether it rotates q and k and how
    its cache holds positions (full_slots or rolling_slots)."""

    def __init__(self, block):
        attn, mlp = block.attn, block.mlp
        self.nh = attn.n_head
        self.ln_1, self.ln_2 = (block.ln_1.weight, block.ln_1.bias), (block.ln_2.weight, block.ln_2.bias)
        self.qkv, self.proj = (attn.c_attn.weight, attn.c_attn.bias), (attn.c_proj.weight, attn.c_proj.bias)
        self.fc, self.out = (mlp.c_fc.weight, mlp.c_fc.bias), (mlp.c_proj.weight, mlp.c_proj.bias)
        self.approximate = mlp.gelu.approximate
        self.turn = rotated if isinstance(getattr(attn, 'rotate', None), Rotary) else unrotated
        self.slots = rolling_slots if isinstance(attn, LocalSelfAttention) else full_slots

    def __call__(self, x, rotation, pos, cache):
        """x (B, 1, C) at position pos (1,) -> (B, 1, C); writes its k, v into cache's slot for pos."""
        B, _, C = x.shape
        h = F.layer_norm(x, (C,), *self.ln_1, 1e-5)
        qkv = F.linear(h, *self.qkv).view(B, 1, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, 1, hs)
        q, k = self.turn(qkv[:2], rotation).unbind(0)
        slot, seen = self.slots(cache, pos)
        cache.k.index_copy_(2, slot, k.to(cache.k.dtype))  # (B, nh, S, hs); float32 caches under autocast
        cache.v.index_copy_(2, slot, qkv[2].to(cache.v.dtype))
        y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=seen)  # (B, nh, 1, hs)
        x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), *self.proj)
        h = F.layer_norm(x, (C,), *self.ln_2, 1e-5)
        return x + F.linear(F.gelu(F.linear(h, *self.fc), approximate=self.approximate), *self.out)


def run_layers(layers, x, rotation, pos, caches):
    """(cache index, LayerStep) pairs in order over x (B, 1, C) at pos (1,)."""
    for i, layer in layers:
        x = layer(x, rotation, pos, caches[i])
    return x


def keep_input(x, pos, state):
    return x  # no hourglass: nothing between the pre layers (none) and the post layers


def no_groups(cache):
    return None  # no hourglass: no group buffers


class DecodeState:
    """What a static decode carries between steps: the model's own caches (its forward prefills the prompt into
    them, the steps write their KV caches in place), the hourglass's group buffers (None without one), and the
    position count (the caches' own len stay at the prefill's: the steps never read them)."""

    def __init__(self, caches):
        self.caches, self.groups, self.len = caches, None, 0


class StaticHourglass:
    """Hourglass.forward's decode at one position per step. Group j pools positions jk-k+1 .. jk and closes at token
    jk; the shortened layers see it at position j. Its buffers (B, k, C): `ring`, the last k pre-shortening states,
    position p at row (p - 1) % k so that a closing group's rows are in position order (the mean sums them as
    Hourglass.shorten does); `up`, the upsampled update of the last closed group, row p % k read by token p."""

    def __init__(self, model, rotation):
        self.k, self.upsample, self.rotation = model.config.hierarchy_factor, model.hourglass.upsample, rotation
        self.layers = [(i, LayerStep(model.transformer.h[i])) for i in model.shortened]

    def buffers(self, state):
        """ring and up after the model's prefill of state.len positions into its HourglassState `state`."""
        k, P, offset, (B, _, C) = self.k, state.len, state.offset, state.x.shape
        ring, up = state.x.new_zeros(B, k, C), state.x.new_zeros(B, k, C)
        held = torch.arange(max(0, P - k + 1), P, device=state.x.device)  # positions a later group pools
        ring[:, (held - 1) % k] = state.x[:, held - offset]
        first = (P - 1) // k * k  # the last closed group's first reader
        up.copy_(state.up[:, first - offset:first - offset + k])
        return ring, up

    def remember(self, x, pos, ring):
        ring.index_copy_(1, (pos - 1) % self.k, x)  # x (B, 1, C) over the state of position pos - k

    def read(self, x, pos, state):
        """A token inside a group: x (B, 1, C) plus its row of the group's update."""
        ring, up = state.groups
        self.remember(x, pos, ring)
        return x + up.index_select(1, pos % self.k)

    def close(self, x, pos, state):
        """Token jk completes group j: the shortened layers run once on its mean (B, 1, C) at position j, and the
        upsampled update (B, k, C) is kept for tokens jk .. jk+k-1, this one first."""
        ring, up = state.groups
        self.remember(x, pos, ring)
        pooled = ring.mean(dim=1, keepdim=True)
        group = pos // self.k
        h = run_layers(self.layers, pooled, self.rotation(group), group, state.caches)
        up.copy_(self.upsample(h - pooled).view_as(up))
        return x + up[:, :1]


class StaticDecoder:
    """Greedy or sampled decode through static-shape steps, eager or compiled (compile=True: each step kind through
    torch.compile(fullgraph=True, dynamic=False), compiled at its first use)."""

    def __init__(self, model, compile=False):
        reason = why_not_static(model)
        if reason:
            raise ValueError(f"static decode runs dense models, local attention and the hourglass only: {reason}")
        t, c = model.transformer, model.config
        self.model, self.C = model, c.n_embd
        streams = getattr(model, 'streams', False)  # rotary and every layer local: no block_size limit
        # a model that does not stream recomputes the cropped context past block_size (its own next_logits)
        self.limit = float('inf') if streams else c.block_size
        self.embed = (partial(embed_learned, t.wte.weight, t.wpe.weight) if 'wpe' in t
                      else partial(embed_rotary, t.wte.weight))
        rotary = getattr(t.h[0].attn, 'rotate', None)  # every layer's Rotary has the same tables
        rotation = streaming_rotation if streams else table_rotation
        self.rotation = partial(rotation, rotary) if isinstance(rotary, Rotary) else no_rotation
        self.ln_f, self.lm_head = (t.ln_f.weight, t.ln_f.bias), model.lm_head.weight
        # without an hourglass every layer is a post layer (nanoGPT's GPT has no plan)
        self.pre = [(i, LayerStep(t.h[i])) for i in getattr(model, 'pre', ())]
        self.post = [(i, LayerStep(t.h[i])) for i in getattr(model, 'post', range(c.n_layer))]
        compiled = partial(torch.compile, fullgraph=True, dynamic=False) if compile else keep
        self.step = compiled(self.step_eager)
        if getattr(model, 'hourglass', None) is None:  # one step kind
            self.read_group, self.groups, self.step_at = keep_input, no_groups, lambda pos: self.step
        else:  # two: a token that closes a group (positions 0, k, 2k, ...) and the others
            hourglass, k = StaticHourglass(model, self.rotation), c.hierarchy_factor
            self.read_group, self.close_group, self.groups = hourglass.read, hourglass.close, hourglass.buffers
            self.closing_step = compiled(self.closing_step_eager)
            self.step_at = lambda pos: self.closing_step if pos % k == 0 else self.step

    def run(self, token, pos, state, group):
        """Logits (B, V) after token (B, 1) at position pos (a (1,) long tensor): the pre layers, the hourglass's
        group step (nothing without one), the post layers; each layer writes its k, v into state's caches."""
        x = self.embed(token, pos)  # (B, 1, C)
        rotation = self.rotation(pos)
        x = run_layers(self.pre, x, rotation, pos, state.caches)
        x = group(x, pos, state)
        x = run_layers(self.post, x, rotation, pos, state.caches)
        return F.linear(F.layer_norm(x[:, -1], (self.C,), *self.ln_f, 1e-5), self.lm_head)

    def step_eager(self, token, pos, state):
        """Every step without an hourglass; with one, a token that closes no group (it reads its group's update)."""
        return self.run(token, pos, state, self.read_group)

    def closing_step_eager(self, token, pos, state):
        """A token that closes a group (positions 0, k, 2k, ...): the shortened layers run once."""
        return self.run(token, pos, state, self.close_group)

    def new_state(self, batch_size):
        return DecodeState(self.model.new_cache(batch_size))

    def next_logits(self, idx, state):
        """Logits (B, V) of the token after idx (B, t): the prompt through the model's forward, each new token
        through a static step, and past block_size (a model that does not stream) the model's own path."""
        t = idx.size(1)
        if t > self.limit:
            return self.model.next_logits(idx, state.caches)
        if state.len == 0:
            logits = self.model.next_logits(idx, state.caches)
            state.groups, state.len = self.groups(state.caches[-1]), t
            return logits
        pos = state.len  # the step feeds idx's last token; the caches hold every position before it
        logits = self.step_at(pos)(idx[:, -1:], torch.tensor([pos], device=idx.device), state)
        state.len = pos + 1
        return logits

    @decoding
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """As the model's generate(): idx (B, T) and max_new_tokens new tokens."""
        state = self.new_state(idx.size(0))
        new = decode_tokens(lambda context: self.next_logits(context, state), idx, max_new_tokens,
                            lambda logits: sample_next(logits, temperature, top_k, generator))
        return torch.cat((idx, *new), dim=1)

