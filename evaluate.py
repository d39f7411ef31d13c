"""
Deterministic validation loss: every model is scored on the same fixed windows (the whole split in
non-overlapping block_size windows, or a stated prefix of them), so that losses compare. nanoGPT's
random-batch estimate is kept for training logs only.
"""

import math
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F

from early_exit import EarlyExitDecoder
from model import decode_tokens


def fixed_windows(data, block_size, max_windows=None):
    """Start offsets of the non-overlapping windows: window i predicts data[s+1 : s+block_size+1]."""
    n = (len(data) - 1) // block_size
    if max_windows is not None:
        n = min(n, max_windows)
    return np.arange(n) * block_size


def window_batches(data, block_size, batch_size, max_windows, device):
    """Inputs and targets (B, block_size) of the fixed windows, batch_size windows at a time."""
    starts = fixed_windows(data, block_size, max_windows)
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        x = torch.from_numpy(np.stack([data[j:j + block_size] for j in s]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([data[j + 1:j + 1 + block_size] for j in s]).astype(np.int64)).to(device)
        yield x, y


@torch.no_grad()
def evaluate_loss(model, data, block_size, batch_size=16, max_windows=None, device='cpu', ctx=None):
    """Mean cross-entropy in nats per token over the fixed windows of data (a 1-D uint16 array)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in window_batches(data, block_size, batch_size, max_windows, device):
        with ctx or nullcontext():
            _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def bits(nats):
    """Nats per token to bits per token (bits/char for char models)."""
    return nats / math.log(2)


def teacher_forced(next_logits, x, y, after_step=None):
    """Summed cross-entropy of windows x (B, T) with targets y (B, T), teacher-forced through a decoder's
    next_logits with the shared token loop (model.decode_tokens): the prompt is x's first token and each
    token 'chosen' is the true next one, so the distribution every decode step produced is scored."""
    total, t = 0.0, 0

    def choose(logits):  # (B, V) -> the true token (B, 1)
        nonlocal total, t
        total += F.cross_entropy(logits.float(), y[:, t], reduction='sum').item()
        if after_step is not None:
            after_step()
        t += 1
        return y[:, t - 1:t]
    for _ in decode_tokens(next_logits, x[:, :1], x.size(1), choose):
        pass
    return total


@torch.no_grad()
def teacher_forced_decode_loss(model, data, block_size, batch_size=16, max_windows=None, device='cpu', ctx=None,
                               on_step=None):
    """Decode-consistent loss: the fixed windows of evaluate_loss teacher-forced through the cached decode
    engine one token at a time, scoring the distribution each step actually produced. For mechanisms whose
    decode may differ from the training forward (ACT halting). on_step(model), if given, runs after every
    step (to read statistics). Returns (mean nats per token, tokens scored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in window_batches(data, block_size, batch_size, max_windows, device):
        cache = model.new_cache(x.size(0))
        with ctx or nullcontext():
            total += teacher_forced(lambda idx: model.next_logits(idx, cache), x, y,
                                    on_step and (lambda: on_step(model)))
        count += y.numel()
    model.train(was_training)
    return total / count, count


@torch.no_grad()
def decode_consistent_loss(model, data, block_size, max_windows, criterion=None, threshold=None, device='cpu'):
    """Validation loss as the early-exit decoder produces it: each of the first max_windows fixed windows is
    teacher-forced token by token (batch 1, fresh KV cache) through early_exit.EarlyExitDecoder, exactly
    what generate(decode='early_exit') runs, and the distribution each step actually returned is scored.
    criterion / threshold override the model's config. Returns the loss in nats/token, the tokens scored,
    the mean exit layer (layers run per token), the FLOPs executed per token and how many tokens exited
    after each layer."""
    was_training = model.training
    model.eval()
    total, depth, flops, count = 0.0, 0, 0.0, 0
    exits = [0] * model.config.n_layer  # tokens answered after 1, 2, .. n_layer layers
    for x, y in window_batches(data, block_size, 1, max_windows, device):
        dec = EarlyExitDecoder(model, criterion=criterion, threshold=threshold)
        total += teacher_forced(dec.next_logits, x, y)
        depth, flops, count = depth + sum(dec.depths), flops + dec.flops.total, count + block_size
        for n in dec.depths:
            exits[n - 1] += 1
    model.train(was_training)
    return dict(loss=total / count, tokens=count, mean_exit_layer=depth / count, flops_per_token=flops / count,
                exit_layer_counts=exits)


def decoded_loss(model, data, block_size, max_windows, batch_size=16, device='cpu', decode='full', **policy):
    """Val loss as the model decodes, whatever its engine: the early-exit engine (decode_consistent_loss,
    batch 1, policy: criterion, threshold) or the cached decode every other model runs
    (teacher_forced_decode_loss). Returns a dict with at least loss and tokens."""
    if decode == 'early_exit':
        return decode_consistent_loss(model, data, block_size, max_windows, policy.get('criterion'),
                                      policy.get('threshold'), device)
    loss, tokens = teacher_forced_decode_loss(model, data, block_size, batch_size, max_windows, device)
    return dict(loss=loss, tokens=tokens)


@torch.no_grad()
def streaming_loss(model, data, n_tokens, chunk=64, device='cpu'):
    """Loss of a streaming model (model.streams) over the first n_tokens of data read as one text, fed
    through its caches chunk tokens at a time: what generation past block_size sees, no window ever
    recomputed. Returns the mean loss in nats/token over positions < block_size and over the rest."""
    was_training = model.training
    model.eval()
    cache = model.new_cache(1)
    x = torch.from_numpy(data[:n_tokens + 1].astype(np.int64)).to(device)
    losses = []
    for s in range(0, n_tokens, chunk):
        e = min(s + chunk, n_tokens)
        logits, _ = model(x[None, s:e], x[None, s + 1:e + 1], cache=cache)  # targets: every position's logits
        losses.append(F.cross_entropy(logits[0].float(), x[s + 1:e + 1], reduction='none'))
    model.train(was_training)
    losses, T = torch.cat(losses), model.config.block_size
    return losses[:T].mean().item(), losses[T:].mean().item()
