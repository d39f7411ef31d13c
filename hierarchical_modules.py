"""
Hierarchical processing: the hourglass of Nawrot et al. 2021 ("Hierarchical Transformers Are More
Efficient Language Models"). The layers of the stack split into three runs:

    pre layers (full resolution) -> shorten by k -> shortened layers (1/k of the positions) ->
    upsample, added to the pre-shortening residual -> post layers (full resolution)

The pre run may be empty: the shortened layers then read the pooled token embeddings, like MEGABYTE's
global model reading patches (Yu et al. 2023), and the post layers alone see every token.

Causality. Shortened position j pools the k full-resolution positions jk-k+1 .. jk: the sequence is
shifted right by k-1 (k-1 zero vectors in front, the tail dropped) before mean pooling, so group j
holds nothing after token jk. Its output goes to tokens jk .. jk+k-1, none of which precedes jk.
T need not be a multiple of k: the last group is computed as soon as its last token jk exists.

Choices: mean pooling (no parameters; the shortened layers read the pooled state, which already
carries the learned per-token position embeddings, so they get no position embedding of their own; with
rotary positions they rotate by group index);
linear upsampling (one Linear n_embd -> k * n_embd per group, a vector for each of the k tokens
that read the group, as in the paper). What is upsampled and added is the shortened layers' update
(their output minus their input): with k = 1 pooling and upsampling are the identity and the
hourglass is exactly the plain stack with the same parameter names.

Decode. The shortened layers run once per group, when its last token arrives (every k tokens), with
their own KV caches at 1/k resolution; the k tokens of a group read that group's upsampled output.
HourglassState keeps only the last groups, so with every layer local and rotary the model streams.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F


class HourglassState:
    """What the hourglass keeps between decode calls besides the shortened layers' KV caches: the
    pre-shortening states of recent positions (pooling reads the last k of them) and the upsampled
    output of recent groups (a token reads its group's). Position p is stored at index p - offset; when
    the buffers fill, only the last `keep` positions (whole groups, at least k + rollback) move to the
    front, so memory stays flat however far generation streams, and truncate(n) stays exact within them."""

    def __init__(self, batch_size, capacity, k, n_embd, device=None, dtype=None, rollback=0):
        self.k = k
        self.keep = k * math.ceil((k + rollback) / k)
        capacity = k * math.ceil(max(capacity, 2 * self.keep) / k)
        self.x = torch.zeros(batch_size, capacity, n_embd, device=device, dtype=dtype)  # pre-shortening states
        self.up = torch.zeros(batch_size, capacity + k, n_embd, device=device, dtype=dtype)  # + a group that closes last
        self.len = 0  # positions seen
        self.offset = 0  # the position held at index 0, a multiple of k

    def reset(self):
        self.len = self.offset = 0

    def truncate(self, n):
        # exact while the positions n-k+1 .. n-1 (pooled by the next group, and the group token n reads) are held
        if n >= self.len:
            return
        if n - self.k + 1 < self.offset and self.offset > 0:
            raise ValueError(f"cannot roll the hourglass back from {self.len} to {n} positions: it holds "
                             f"positions {self.offset} on; build it with new_cache(rollback=...) for more")
        self.len = n

    def append(self, x):
        """Store x (B, T, C) as positions len .. len+T-1; returns the states held (B, len+T-offset, C)."""
        T, start = x.size(1), self.len
        if start + T - self.offset > self.x.size(1):
            self.make_room(start, T)
        self.x[:, start - self.offset:start + T - self.offset] = x
        self.len = start + T
        return self.x[:, :self.len - self.offset]

    def make_room(self, start, T):
        # drop whole groups before start - keep; a prompt longer than the buffers grows them
        offset = max(self.offset, self.k * ((start - self.keep) // self.k))
        held, shift = start - offset, offset - self.offset
        self.x[:, :held] = self.x[:, shift:shift + held].clone()
        self.up[:, :held + self.k] = self.up[:, shift:shift + held + self.k].clone()
        self.offset = offset
        if held + T > self.x.size(1):
            grow = self.k * math.ceil((held + T - self.x.size(1)) / self.k)
            self.x = torch.cat([self.x, self.x.new_zeros(self.x.size(0), grow, self.x.size(2))], dim=1)
            self.up = torch.cat([self.up, self.up.new_zeros(self.up.size(0), grow, self.up.size(2))], dim=1)

    @property
    def nbytes(self):
        groups = math.ceil(self.len / self.k)
        held = (self.len - self.offset) + (groups * self.k - self.offset)
        return held * self.x[:, :1].nelement() * self.x.element_size()


def groups_closed(n, k):
    """Groups whose last token is among the first n positions (group j closes at token jk)."""
    return math.ceil(n / k)


class Hourglass(nn.Module):
    """Shortening, the shortened layers' run, and upsampling. The blocks themselves stay in the
    model's transformer.h (plain parameter names); forward receives the shortened ones."""

    def __init__(self, config):
        super().__init__()
        self.k = config.hierarchy_factor
        C = config.n_embd
        # (B, G, C) -> (B, G, k*C): a vector for each of the k tokens that read group j
        self.upsample = nn.Linear(C, self.k * C, bias=config.bias) if self.k > 1 else nn.Identity()

    def shorten(self, x, g0, g1, origin=0):
        """Mean-pooled groups g0 .. g1-1 of the full-resolution states x (B, S, C) of positions origin ..
        origin+S-1. Group j pools positions jk-k+1 .. jk; positions before 0 are zeros (the right shift). (B, G, C)"""
        k, B, _, C = self.k, *x.shape
        first, end = g0 * k - (k - 1) - origin, (g1 - 1) * k + 1 - origin  # indices pooled, end exclusive
        seg = F.pad(x[:, max(first, 0):end], (0, 0, max(-first, 0), 0))  # (B, G*k, C)
        return seg.view(B, g1 - g0, k, C).mean(dim=2)

    def forward(self, x, blocks, caches, state=None):
        """x (B, T, C): the pre layers' output for positions start .. start+T-1, start = state.len (0
        without a state); caches: the shortened blocks' (Nones without). Returns x plus the upsampled
        update of the groups these tokens read."""
        B, T, C = x.shape
        k, start = self.k, state.len if state is not None else 0
        # decode: pooling may need positions of earlier calls, which the state holds from state.offset on
        x_hist, origin = (state.append(x), state.offset) if state is not None else (x, 0)
        g0, g1 = groups_closed(start, k), groups_closed(start + T, k)  # groups that close in this call
        if g1 > g0:  # between group boundaries a decode step runs no shortened layer at all
            s = self.shorten(x_hist, g0, g1, origin)  # (B, G, C)
            h = s
            for block, cache in zip(blocks, caches):
                h = block(h, cache)
            up = self.upsample(h - s).view(B, (g1 - g0) * k, C)  # positions g0*k .. g1*k-1
            if state is None:
                return x + up[:, :T]
            state.up[:, g0 * k - origin:g1 * k - origin] = up
        return x + state.up[:, start - origin:start + T - origin]
