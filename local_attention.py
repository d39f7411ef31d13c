"""
Local (sliding-window) attention, rotary positions and the rolling KV cache.

Convention: with window w, the query at position t attends to itself and the w-1 positions before it
(t-w+1 .. t). With s attention sinks (StreamingLLM) positions 0 .. s-1 also stay visible to every query.

- Training does O(T·w) work: queries in chunks of w, each chunk attending to its own and the previous
  chunk of keys under a band mask (sliding_window_attention; window_attention_reference is its oracle).
- Decode keeps a RollingKVCache of s + w entries written round-robin, so memory and per-token work stop
  growing after w tokens.
- Rotary positions (RoPE, Su et al. 2021) rotate q and k by their absolute position, so scores depend
  only on the distance between tokens. Keys enter the cache already rotated: a rolling buffer can hold
  them in any order, since attention is a softmax over a set.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import CausalSelfAttention, attend

try:  # FlexAttention (torch >= 2.5) turns the band into skipped blocks on CUDA
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None


def window_mask(q_pos, k_pos, window, sinks=0):
    """Bool mask, True where a query at absolute position q_pos may read a key at k_pos (broadcast).
    Keys at negative positions are empty slots."""
    return (k_pos >= 0) & (k_pos <= q_pos) & ((q_pos - k_pos < window) | (k_pos < sinks))


def window_attention_reference(q, k, v, window, sinks=0, dropout_p=0.0):
    """The oracle: dense attention over all T keys with the band mask, O(T²) work. (B, nh, T, hs)"""
    pos = torch.arange(q.size(2), device=q.device)
    mask = window_mask(pos[:, None], pos[None, :], window, sinks)  # (T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def sliding_window_attention(q, k, v, window, sinks=0, dropout_p=0.0):
    """Causal attention of T queries over T keys, each query seeing the last `window` keys (and the sinks),
    computing only T·(2w + s) scores instead of T²/2. (B, nh, T, hs)"""
    B, nh, T, hs = q.size()
    if q.is_cuda and flex_attention is not None and dropout_p == 0.0:
        return flex_window_attention(q, k, v, window, sinks)
    if T <= 2 * window:
        # one or two chunks: the blocked form would compute as many scores as this dense masked call
        return window_attention_reference(q, k, v, window, sinks, dropout_p)
    w, n = window, math.ceil(T / window)
    pad = n * w - T  # the padded tail queries are dropped at the end; causality hides their keys

    def chunks(t):  # (B, nh, T, hs) -> (B·nh, n, w, hs): chunk c holds positions cw .. cw+w-1
        return F.pad(t, (0, 0, 0, pad)).reshape(B * nh, n, w, hs)

    def with_previous(t):  # chunk c's keys: positions (c-1)w .. (c+1)w-1, empty slots before chunk 0
        t = chunks(t)
        return torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[:, :n], t], dim=2)  # (B·nh, n, 2w, hs)

    qb, kb, vb = chunks(q), with_previous(k), with_previous(v)
    q_pos = torch.arange(n * w, device=q.device).view(n, w, 1)
    k_pos = torch.arange(-w, w, device=q.device) + w * torch.arange(n, device=q.device).view(n, 1, 1)  # (n, 1, 2w)
    mask = window_mask(q_pos, k_pos, window)  # (n, w, 2w)
    if sinks:
        # the sinks as extra keys of every chunk, visible only where the band does not already hold them
        sink_pos = torch.arange(sinks, device=q.device)
        kb = torch.cat([k[:, :, None, :sinks].expand(B, nh, n, sinks, hs).reshape(B * nh, n, sinks, hs), kb], dim=2)
        vb = torch.cat([v[:, :, None, :sinks].expand(B, nh, n, sinks, hs).reshape(B * nh, n, sinks, hs), vb], dim=2)
        mask = torch.cat([(q_pos - sink_pos >= w).expand(n, w, sinks), mask], dim=2)  # (n, w, s+2w)
    # chunks stand where SDPA expects heads, so the mask is (1, n, w, S): the shape CPU flash attention takes
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[None], dropout_p=dropout_p)  # (B·nh, n, w, hs)
    return y.view(B, nh, n * w, hs)[:, :, :T]


def flex_window_attention(q, k, v, window, sinks=0):
    """CUDA path: FlexAttention skips the blocks outside the band (fast under torch.compile). The same
    mask as window_mask; the CPU tests run it in eager mode against the band reference."""
    def keep(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki < window) | (ki < sinks))
    T = q.size(2)
    block_mask = create_block_mask(keep, None, None, T, T, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask)


class Rotary(nn.Module):
    """Rotary position embedding (GPT-NeoX layout: the two halves of each head are the pairs rotated).
    cos and sin of the first block_size positions are tabled (decode rotates every token in every layer,
    and each op's overhead is what costs); positions past the table, when a model streams, are computed.
    norm: applied to q and k per head before the rotation (qk_norm), or None."""

    def __init__(self, head_size, base=10000.0, table_len=0, norm=None):
        super().__init__()
        self.norm = norm
        assert head_size % 2 == 0, "rotary positions need an even head size"
        inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
        # derived, so not in checkpoints: (hs/2,), and (table_len, hs) full-width cos and signed sin
        self.register_buffer('inv_freq', inv_freq, persistent=False)
        cos, sin = self.angles(torch.arange(table_len, dtype=torch.float32))
        self.register_buffer('cos', cos, persistent=False)
        self.register_buffer('sin', sin, persistent=False)
        self.half, self.base, self.table_len = head_size // 2, base, table_len

    def angles(self, pos):
        """cos and signed sin (T, hs) of positions pos (T,): x·cos + swap_halves(x)·sin rotates x."""
        angles = torch.outer(pos, self.inv_freq)  # (T, hs/2)
        return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles, angles], dim=-1).sin()

    def position(self, qk, start=0):
        """qk (..., T, hs): heads at absolute positions start .. start+T-1 (q and k stacked, or keys alone),
        normalised and rotated in one chain of ops: x·cos + swap_halves(x)·sin."""
        T = qk.size(-2)
        if T == 1 and start < self.table_len:  # one decoded token: one matmul by its position's rotation
            return (qk if self.norm is None else self.norm(qk)) @ self.turn(start)
        if start + T <= self.table_len:
            cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        else:
            cos, sin = self.angles(torch.arange(start, start + T, device=qk.device, dtype=torch.float32))
        if self.norm is not None:
            qk = self.norm(qk)
        out = torch.addcmul(qk * cos, qk.roll(self.half, -1), sin)  # rolled by half a head: (x2, x1)
        return out if out.dtype == qk.dtype else out.to(qk.dtype)  # float32 tables: back to bf16 under autocast

    turns = {}  # (half head size, base, device): {position: (hs, hs) rotation}, shared by every layer and model

    def turn(self, t):
        """The (hs, hs) matrix M with x @ M = x·cos + swap_halves(x)·sin at position t, made at its first use: a
        decode step rotates with one matmul instead of five ops (each op's overhead is the cost at batch 1)."""
        made = Rotary.turns.setdefault((self.half, self.base, self.cos.device), {})
        if t not in made:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable in training too
                cos, sin = self.cos[t], self.sin[t]  # (hs,)
                made[t] = torch.diag(cos) + torch.diag(sin).roll(-self.half, 0)  # row i - hs/2 of column i: sin
        return made[t]

    def keys(self, k, start=0):
        """k (B, nh, T, hs) alone at positions start .. start+T-1 (keys computed outside attention)."""
        return self.position(k, start)

    def forward(self, q, k, start=0):
        """q, k (B, nh, T, hs) at absolute positions start .. start+T-1, rotated together."""
        return self.position(torch.stack([q, k]), start).unbind(0)


def keep(t):
    return t


def head_norm(t):
    """Each head's vector normalised (LayerNorm without weights over hs): bounded q·k scores. One fused kernel on
    CPU, where F.rms_norm runs as a chain of a dozen small ops."""
    return F.layer_norm(t, t.shape[-1:])


class LearnedPositions:
    """With learned position embeddings (added at the input) attention leaves q and k as they are (but for the
    per-head norm, when given)."""

    def __init__(self, norm=None):
        self.norm = norm or keep

    def position(self, qk, start=0):
        return self.norm(qk)

    def __call__(self, q, k, start=0):
        return self.norm(q), self.norm(k)

    def keys(self, k, start=0):
        return self.norm(k)


def positions(config, rope):
    """What attention does to q and k: rotary positions (rope), or nothing (learned positions enter at the input);
    normalised per head first when config.qk_norm."""
    norm = head_norm if config.qk_norm else None
    if rope:
        return Rotary(config.n_embd // config.n_head, config.rope_base, config.block_size, norm)
    return LearnedPositions(norm)


def positioned_qkv(attn, x, start):
    """q, k, v (B, nh, T, hs) of x (B, T, C) at positions start .. start+T-1: views of one c_attn output (no
    split, and q and k positioned together without a cat: at batch-1 decode each op's overhead is the cost)."""
    B, T, C = x.size()
    qkv = attn.c_attn(x).view(B, T, 3, attn.n_head, C // attn.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
    q, k = attn.rotate.position(qkv[:2], start).unbind(0)
    return q, k, qkv[2]


class RotarySelfAttention(CausalSelfAttention):
    """Full causal attention whose q and k pass through positions(): rotary (rope=True) or none (learned positions,
    with qk_norm); reads a full KVCache. Same parameters as the baseline."""

    def __init__(self, config, rope=True):
        super().__init__(config)
        self.rotate = positions(config, rope)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = positioned_qkv(self, x, cache.len if cache is not None else 0)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, S, hs)
        y = attend(q, k, v, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def store(self, k, v, cache):
        cache.update(self.rotate.keys(k, cache.len), v)  # keys enter the cache rotated, as forward's do


class LocalSelfAttention(CausalSelfAttention):
    """Sliding-window causal attention (learned or rotary positions); reads a RollingKVCache.
    Same parameters as the baseline (c_attn, c_proj), so baseline weights load into it."""

    def __init__(self, config, rope):
        super().__init__(config)
        self.window = config.local_attention_window
        self.sinks = config.attention_sinks
        self.rotate = positions(config, rope)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        dropout_p = self.attn_dropout if self.training else 0.0
        # training / reference: positions 0 .. T-1; decode: cache.len, the absolute positions seen so far
        q, k, v = positioned_qkv(self, x, cache.len if cache is not None else 0)  # (B, nh, T, hs)
        if cache is None:
            y = sliding_window_attention(q, k, v, self.window, self.sinks, dropout_p)
        else:
            k, v, mask = cache.update(k, v)  # (B, nh, S, hs), (T, S): S = the cache's slots (+ T when T > 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def store(self, k, v, cache):
        cache.update(self.rotate.keys(k, cache.len), v)  # keys enter the cache rotated, as forward's do

    def cost(self, keys):
        return super().cost(min(keys, self.window + self.sinks))  # the window bounds the keys read


class RollingKVCache:
    """Keys and values of one local attention layer: the s sinks plus the last w (+ rollback) positions,
    in a fixed buffer written round-robin, so its memory stops growing after w positions.
    Same interface as model.KVCache, except that update() also returns the (T, S) visibility mask.
    Position p >= s lives in slot s + (p - s) % (w + rollback); slot_pos records which position each
    slot holds (-1: empty), and the mask is computed from it, so slot order never matters."""

    def __init__(self, batch_size, n_head, window, head_size, sinks=0, rollback=0, device=None, dtype=None):
        self.window, self.sinks, self.ring = window, sinks, window + rollback
        shape = (batch_size, n_head, sinks + self.ring, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((sinks + self.ring,), -1, dtype=torch.long, device=device)
        self.len = 0  # absolute positions seen (rotary positions continue from here)
        self.prefix = True  # the positions held fill slots 0 .. len-1, or the whole buffer (nothing rolled back)

    def write(self, k, v, pos):
        # several positions at once; of a prefill longer than the ring only the sinks and the last `ring` stay
        keep = (pos < self.sinks) | (pos > pos[-1] - self.ring)  # (T,)
        pos = pos[keep]
        slots = torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.ring)
        self.k[:, :, slots] = k[:, :, keep]
        self.v[:, :, slots] = v[:, :, keep]
        self.slot_pos[slots] = pos

    def update(self, k, v):
        # k, v: (B, nh, T, hs) for positions len .. len+T-1
        T = k.size(2)
        if T == 1:  # the slot overwritten held a position that has left the window: write, then read
            slot = self.len if self.len < self.sinks else self.sinks + (self.len - self.sinks) % self.ring
            # slices, not an integer index: torch.compile then keeps the slot symbolic instead of recompiling per slot
            self.k[:, :, slot:slot + 1], self.v[:, :, slot:slot + 1] = k, v
            self.slot_pos[slot:slot + 1] = self.len
            self.len += 1
            if self.ring == self.window and self.prefix:
                # every position held is in this query's window, and they fill the first slots: no mask
                held = min(self.len, self.k.size(2))
                return self.k[:, :, :held], self.v[:, :, :held], None
            keys, values, key_pos, pos = self.k, self.v, self.slot_pos, self.slot_pos.new_tensor([self.len - 1])
        else:  # earlier queries of this chunk may need keys that the chunk overwrites: read, then write
            pos = torch.arange(self.len, self.len + T, device=self.slot_pos.device)
            keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # (B, nh, s+ring+T, hs)
            key_pos = torch.cat([self.slot_pos, pos])
            self.write(k, v, pos)
            self.len += T
        return keys, values, window_mask(pos[:, None], key_pos[None, :], self.window, self.sinks)

    def truncate(self, n):
        """Forget every position from n on (speculative rollback). Only positions still held can come
        back into view: rolling back more than `rollback` positions past a full ring is refused."""
        if n >= self.len:
            return
        oldest_needed = max(self.sinks, n - self.window + 1)  # the next query's window: n-w+1 .. n
        oldest_held = max(self.sinks, self.len - self.ring)
        if n > self.sinks and oldest_needed < oldest_held:
            raise ValueError(f"cannot roll back from {self.len} to {n} positions: a full rolling cache takes back "
                             f"at most {self.ring - self.window + 1}; build it with new_cache(rollback=...) for more")
        self.prefix &= self.len <= self.sinks + self.ring  # emptied slots inside a wrapped ring: masks from now on
        self.slot_pos[self.slot_pos >= n] = -1
        self.len = n

    def reset(self):
        self.slot_pos.fill_(-1)
        self.len = 0
        self.prefix = True

    @property
    def nbytes(self):
        """Bytes of the keys and values held (at most s + w + rollback positions)."""
        held = int((self.slot_pos >= 0).sum())
        return 2 * held * self.k[:, :, :1].nelement() * self.k.element_size()
