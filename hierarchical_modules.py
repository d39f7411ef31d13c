"""
Hierarchical processing: the hourglass of Nawrot et al. 2021 ("Hierarchical Transformers Are More
Efficient Language Models"). The layers of the stack split into three runs:

    pre layers (full resolution) -> shorten by k -> shortened layers (1/k of the positions) ->
    upsample, added to the pre-shortening residual -> post layers (full resolution)

Causality. Shortened position j pools the k full-resolution positions jk-k+1 .. jk: the sequence is
shifted right by k-1 (k-1 zero vectors in front, the tail dropped) before mean pooling, so group j
holds nothing after token jk. Its output goes to tokens jk .. jk+k-1, none of which precedes jk.
T need not be a multiple of k: the last group is computed as soon as its last token jk exists.

Choices: mean pooling (no parameters; the shortened layers read the pooled state, which already
carries the learned per-token position embeddings, so they get no position embedding of their own);
linear upsampling (one Linear n_embd -> k * n_embd per group, a vector for each of the k tokens
that read the group, as in the paper). What is upsampled and added is the shortened layers' update
(their output minus their input): with k = 1 pooling and upsampling are the identity and the
hourglass is exactly the plain stack with the same parameter names.

Decode. The shortened layers run once per group, when its last token arrives (every k tokens), with
their own KV caches at 1/k resolution; the k tokens of a group read that group's upsampled output.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F


class HourglassState:
    """What the hourglass keeps between decode calls besides the shortened layers' KV caches: the
    pre-shortening states of every position (pooling reads the last k of them) and the upsampled
    output of every group computed so far (a token reads its group's). Keeping the history rather
    than a k-long buffer makes truncate(n) exact."""

    def __init__(self, batch_size, max_len, k, n_embd, device=None, dtype=None):
        self.k = k
        self.x = torch.zeros(batch_size, max_len, n_embd, device=device, dtype=dtype)  # pre-shortening states
        self.up = torch.zeros(batch_size, math.ceil(max_len / k) * k, n_embd, device=device, dtype=dtype)
        self.len = 0  # positions held

    def reset(self):
        self.len = 0

    def truncate(self, n):
        # exact: the history keeps what positions n-k+1 .. n-1 pooled and what group (n-1)//k output;
        # EfficientGPT.truncate_cache rolls the shortened layers' caches back with it
        self.len = min(self.len, n)

    @property
    def nbytes(self):
        groups = math.ceil(self.len / self.k)
        return (self.len + groups * self.k) * self.x[:, :1].nelement() * self.x.element_size()


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

    def shorten(self, x, g0, g1):
        """Mean-pooled groups g0 .. g1-1 of the full-resolution states x (B, S, C) of positions 0 .. S-1.
        Group j pools positions jk-k+1 .. jk; the positions before 0 are zeros (the right shift). (B, G, C)"""
        k, B, _, C = self.k, *x.shape
        first, end = g0 * k - (k - 1), (g1 - 1) * k + 1  # positions pooled, end exclusive
        seg = F.pad(x[:, max(first, 0):end], (0, 0, max(-first, 0), 0))  # (B, G*k, C)
        return seg.view(B, g1 - g0, k, C).mean(dim=2)

    def forward(self, x, blocks, caches, state=None):
        """x (B, T, C): the pre layers' output for positions start .. start+T-1, start = state.len (0
        without a state); caches: the shortened blocks' (Nones without). Returns x plus the upsampled
        update of the groups these tokens read."""
        B, T, C = x.shape
        k, start = self.k, state.len if state is not None else 0
        if state is not None:  # decode: pooling may need positions of earlier calls
            state.x[:, start:start + T] = x
            x_hist, state.len = state.x[:, :start + T], start + T
        else:
            x_hist = x
        g0, g1 = groups_closed(start, k), groups_closed(start + T, k)  # groups that close in this call
        if g1 > g0:  # between group boundaries a decode step runs no shortened layer at all
            s = self.shorten(x_hist, g0, g1)  # (B, G, C)
            h = s
            for block, cache in zip(blocks, caches):
                h = block(h, cache)
            up = self.upsample(h - s).view(B, (g1 - g0) * k, C)  # positions g0*k .. g1*k-1
            if state is None:
                return x + up[:, :T]
            state.up[:, g0 * k:g1 * k] = up
        return x + state.up[:, start:start + T]
