"""
Early exit: answer easy tokens from a shallow layer, think deeper only when needed.

Training (LayerSkip): every exit layer's output is decoded through the model's own ln_f and lm_head
(shared, not a per-exit norm: no new parameters, and the loss teaches the residual stream to be readable
by the final head at every exit) and its cross-entropy is added to the final one with weight
    w_l = early_exit_loss_weight * (l + 1) / sum over exits of (l' + 1)
so the exits share early_exit_loss_weight in proportion to their depth (deeper exits, which are asked to
be nearly as good as the final layer, weigh more). Optional layer dropout skips whole layers per sample.
A small classifier per exit (CALM's learned criterion) is trained on detached features to predict
whether the exit's argmax agrees with the final layer's; it does not change the language model.

Decode engines (batch 1, with a KV cache), chosen by name in DECODE:
- 'early_exit' (CALM): per token run layers until an exit's confidence passes exit_threshold. The layers
  not run still need K/V at this position for later tokens: they are computed from the exiting hidden
  state through only ln_1 and the K/V rows of c_attn (CALM's state propagation).
- 'speculative' (LayerSkip's self-speculation, exact): draft spec_draft_tokens tokens with the first
  spec_exit_layer layers, verify them with the remaining layers in one pass over the drafted positions
  (reusing the draft's hidden states and its cache entries of the shallow layers), keep the longest
  agreeing prefix (greedy) or use rejection sampling (temperature > 0), and truncate the caches.
Both work inside block_size; past it they fall back to the full model over the cropped context, which
recomputes everything each step (GPT.next_logits), exactly as decode='full' does there.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import decode_tokens, sample_next, token_probs, weights_cost


def keep_output(x, y, training):
    """A block's exit point when early exit is off: the block's output, untouched."""
    return y


def no_losses(model, targets, logits):
    """EfficientGPT's exit losses when early exit is off: none."""
    return {}


class ExitPoint:
    """End of one block: LayerSkip's layer dropout in training, and the output kept for the exit loss.
    A plain callable, not an nn.Module: it has no parameters, and a module call per block per token would
    cost decode time for nothing."""

    def __init__(self, config, layer):
        # LayerSkip drops deeper layers more often: 0 for the first layer, layer_dropout for the last
        self.drop_rate = config.layer_dropout * layer / max(1, config.n_layer - 1)
        self.state = None  # (B, T, C) output of the last forward, read by ExitHeads.losses

    def __call__(self, x, y, training):
        # x: the block's input, y: its output, (B, T, C)
        if training and self.drop_rate > 0:
            keep = torch.rand(x.size(0), 1, 1, device=x.device) >= self.drop_rate  # per sample, (B, 1, 1)
            y = torch.where(keep, y, x)
        self.state = y
        return y


def exit_logits(model, x):
    """Logits (..., V) of a hidden state (..., C) through the shared final norm and head."""
    return model.lm_head(model.transformer.ln_f(x))


def exit_features(x, logits):
    """Features of CALM's learned exit classifier: the normalised state and the top-2 probabilities.
    (B, T, C) and (B, T, V) -> (B, T, C + 2)"""
    top2 = F.softmax(logits, dim=-1).topk(2, dim=-1).values
    return torch.cat([F.layer_norm(x, x.shape[-1:]), top2], dim=-1)


class ExitHeads(nn.Module):
    """The early-exit loss and the learned exit classifiers, one per exit layer."""

    def __init__(self, config, plan):
        super().__init__()
        exits = [l for l, e in enumerate(plan.exit) if e]
        depth = sum(l + 1 for l in exits)
        self.weights = {l: config.early_exit_loss_weight * (l + 1) / depth for l in exits}
        self.classifiers = nn.ModuleDict({str(l): nn.Linear(config.n_embd + 2, 1) for l in exits})

    def losses(self, model, targets, logits):
        """{name: (weight, value)}: per exit, its cross-entropy and its classifier's loss."""
        if targets is None:
            return {}
        aux = {}
        final_choice = logits.argmax(dim=-1)  # (B, T)
        for l, w in self.weights.items():
            point = model.transformer.h[l].exit
            x, point.state = point.state, None
            logits_l = exit_logits(model, x)  # (B, T, V)
            aux[f'exit{l + 1}_ce'] = (w, F.cross_entropy(logits_l.flatten(0, 1), targets.flatten(), ignore_index=-1))
            # the classifier learns from detached features: it never changes what the model predicts
            score = self.classifiers[str(l)](exit_features(x, logits_l).detach()).squeeze(-1)  # (B, T)
            agree = (logits_l.argmax(dim=-1) == final_choice).float()
            aux[f'exit{l + 1}_clf'] = (1.0, F.binary_cross_entropy_with_logits(score, agree))
        return aux


# Exit criteria: (model, layer, x, x_prev) -> (confidence in [0, 1] as a one-element tensor, logits or None).
# x is the exit layer's output, x_prev its input, (1, 1, C). A token exits when confidence >= exit_threshold.
def max_prob(model, layer, x, x_prev):
    logits = exit_logits(model, x)
    return F.softmax(logits, dim=-1).max(), logits


def margin(model, layer, x, x_prev):
    logits = exit_logits(model, x)
    top2 = F.softmax(logits, dim=-1).topk(2, dim=-1).values  # (1, 1, 2)
    return top2[..., 0] - top2[..., 1], logits


def saturation(model, layer, x, x_prev):
    """CALM's hidden-state saturation: the layer barely changed the state (cosine of output and input)."""
    return F.cosine_similarity(x, x_prev, dim=-1), None


def learned(model, layer, x, x_prev):
    logits = exit_logits(model, x)
    return torch.sigmoid(model.exit_heads.classifiers[str(layer)](exit_features(x, logits))), logits


CRITERIA = {f.__name__: f for f in (max_prob, margin, saturation, learned)}


def folded_kv(blocks):
    """The K/V rows of c_attn of these blocks with each ln_1's scale and shift folded in, stacked, so that
    CALM's state propagation into all of them is one normalisation and one matmul:
    K/V of layer m = c_attn_kv(ln_1_m(x)) = (W_m * g_m) norm(x) + (W_m b_m + c_m).
    -> weight (len(blocks) * 2C, C) and bias (len(blocks) * 2C,)"""
    weights, biases = [], []
    for block in blocks:
        C = block.attn.n_embd
        w, ln = block.attn.c_attn.weight[C:], block.ln_1  # (2C, C): the K and V rows
        b = block.attn.c_attn.bias[C:] if block.attn.c_attn.bias is not None else torch.zeros_like(w[:, 0])
        weights.append(w * ln.weight)
        biases.append(b + w @ ln.bias if ln.bias is not None else b)
    return torch.cat(weights), torch.cat(biases)


def flop_costs(model):
    """FLOPs of the pieces a decode engine runs for one token, from the modules' own costs (model.Cost):
    a layer over no keys, attention per key, the head, a K/V propagation into one layer. Read once, so
    the decode loop only adds numbers."""
    block = model.transformer.h[0]
    return dict(layer=block.cost(0).flops, attn_per_key=block.attn.cost(1).flops - block.attn.cost(0).flops,
                head=model.head_cost().flops, kv=weights_cost(block.attn.c_attn.weight[block.attn.n_embd:]).flops)


class EarlyExitDecoder:
    """Batch-1 early-exit decoding state: a KV cache and one step per token (also used by evaluate.py
    to teacher-force text through exactly what generation runs)."""

    def __init__(self, model, criterion=None, threshold=None):
        c = model.config
        self.model, self.blocks = model, list(model.transformer.h)
        self.check = [CRITERIA[criterion or c.exit_criterion] if e else None for e in model.plan.exit]
        self.threshold = c.exit_threshold if threshold is None else threshold
        self.cache = model.new_cache(1)
        self.cost, self.flops = flop_costs(model), 0.0
        self.depths, self.stepped, self.fallback = [], 0, 0  # layers run per call; step() calls; calls past block_size
        # per exit layer, the folded K/V weights of every layer after it (recomputed per decoder: weights may train)
        self.propagation = [folded_kv(self.blocks[l + 1:]) if e else None for l, e in enumerate(model.plan.exit)]

    def next_logits(self, idx):
        """Logits (1, V) of the token after idx (1, T), for model.decode_tokens: one new token inside the
        context goes through step(); a prompt of several tokens, and every step past block_size, run the
        full model (GPT.next_logits), which counts as every layer run."""
        inside = idx.size(1) <= self.model.config.block_size
        if inside and idx.size(1) - self.cache[0].len == 1:
            logits, depth = self.step(idx[:, -1:])
            self.stepped += 1
        else:
            logits, depth = self.model.next_logits(idx, self.cache), len(self.blocks)
            self.fallback += not inside
        self.depths.append(depth)
        return logits

    def step(self, token):
        """token (1, 1) at the next position -> (logits (1, V) for the token after it, layers run)."""
        m, pos, cost = self.model, self.cache[0].len, self.cost
        x = m.embed(token, pos)
        for l, (block, check) in enumerate(zip(self.blocks, self.check)):
            x_prev, x = x, block(x, self.cache[l])
            self.flops += cost['layer'] + cost['attn_per_key'] * (pos + 1)
            if check is None:
                continue
            confidence, logits = check(m, l, x, x_prev)
            self.flops += cost['head']
            if confidence.item() >= self.threshold:  # the one host sync of an exit layer
                self.propagate(x, l)
                return (exit_logits(m, x) if logits is None else logits)[:, -1], l + 1
        self.flops += cost['head']
        return exit_logits(m, x)[:, -1], len(self.blocks)

    def propagate(self, x, layer):
        """CALM's state propagation: the layers after `layer` are not run for this token, but later tokens
        attend to it there, so their caches get K/V computed from the exit state x (1, 1, C)."""
        w, b = self.propagation[layer]
        skipped = self.cache[layer + 1:]
        attn = self.blocks[-1].attn
        kv = F.linear(F.layer_norm(x, x.shape[-1:], eps=1e-5), w, b)  # (1, 1, skipped * 2C), LayerNorm's eps
        kv = kv.view(len(skipped), 2, 1, attn.n_head, 1, attn.n_embd // attn.n_head)  # per layer, K and V (1, nh, 1, hs)
        for cache, (k, v) in zip(skipped, kv):
            cache.update(k, v)
        self.flops += self.cost['kv'] * len(skipped)


def stream_early_exit(model, idx, max_new_tokens, choose, stats, criterion=None, threshold=None):
    """Yield each new token (1, 1) of idx (1, T) as it is chosen, with the number of layers that produced
    its distribution; fills stats at the end. The token loop is model.decode_tokens over the decoder.
    criterion and threshold override the config's decode-time settings."""
    dec = EarlyExitDecoder(model, criterion, threshold)
    for token in decode_tokens(dec.next_logits, idx, max_new_tokens, choose):
        yield token, dec.depths[-1]
    depths = dec.depths
    stats.update(exit_layers=depths, mean_exit_layer=sum(depths) / max(1, len(depths)),
                 layers_run_fraction=sum(depths) / max(1, model.config.n_layer * len(depths)),
                 fallback_tokens=dec.fallback, flops_per_token=dec.flops / max(1, dec.stepped))


def early_exit_decode(model, idx, max_new_tokens, temperature, top_k, generator, stats, criterion=None,
                      threshold=None):
    choose = lambda logits: sample_next(logits, temperature, top_k, generator)  # noqa: E731
    tokens = stream_early_exit(model, idx, max_new_tokens, choose, stats, criterion, threshold)
    return torch.cat([idx, *(t for t, _ in tokens)], dim=1)


def greedy_accept(drafts, draft_logits, logits, temperature, top_k, generator):
    """Keep the drafts the full model would have chosen, then its own choice at the first mismatch.
    drafts (γ,), logits (γ, V) -> (accepted draft count, tokens to append (≤ γ,))"""
    choice = logits.argmax(dim=-1)  # (γ,)
    k = int((choice == drafts).cumprod(0).sum())
    return k, torch.cat((drafts[:k], choice[k:k + 1]))


def rejection_accept(drafts, draft_logits, logits, temperature, top_k, generator):
    """Speculative sampling (Leviathan et al. 2023): accept draft i with probability min(1, p_i/q_i),
    at the first rejection draw from max(0, p - q) normalised; the tokens are then distributed exactly
    as the full model's samples."""
    q = token_probs(draft_logits, temperature, top_k)  # (γ, V) what the drafts were drawn from
    p = token_probs(logits, temperature, top_k)  # (γ, V) the full model
    i = torch.arange(drafts.numel(), device=drafts.device)
    u = torch.rand(drafts.numel(), generator=generator, device=drafts.device)
    k = int((u * q[i, drafts] < p[i, drafts]).cumprod(0).sum())
    if k == drafts.numel():
        return k, drafts
    residual = (p[k] - q[k]).clamp(min=0)
    residual = residual if residual.sum() > 0 else p[k]  # p == q: nothing to correct
    return k, torch.cat((drafts[:k], torch.multinomial(residual, 1, generator=generator)))


def speculative_decode(model, idx, max_new_tokens, temperature, top_k, generator, stats, draft_layers=None,
                       draft_tokens=None):
    """draft_layers and draft_tokens override the config's spec_exit_layer and spec_draft_tokens."""
    c = model.config
    L, T, gamma = c.n_layer, c.block_size, draft_tokens or c.spec_draft_tokens
    E = draft_layers or c.spec_exit_layer or L // 2
    blocks, cache, cost = model.transformer.h, model.new_cache(1), flop_costs(model)
    accept = greedy_accept if temperature == 0 else rejection_accept
    # invariant: every layer's cache holds positions 0 .. idx.size(1) - 2; the last token is not yet fed
    if 1 < idx.size(1) <= T:
        model(idx[:, :-1], cache=cache)
    produced = drafted = accepted = passes = fallback = 0
    flops = 0.0
    while produced < max_new_tokens:
        pos = idx.size(1) - 1  # position of the last token
        n = min(gamma, T - pos, max_new_tokens - produced)
        if n < 1:  # past block_size: the full model over the cropped context
            logits = model.next_logits(idx, cache)
            idx = torch.cat((idx, sample_next(logits, temperature, top_k, generator)), dim=1)
            produced, fallback = produced + 1, fallback + 1
            continue
        # draft n tokens with the first E layers; their cache entries are the full model's for those layers
        token, states, drafts, draft_logits = idx[:, -1:], [], [], []
        for i in range(n):
            x = model.embed(token, pos + i)
            for l in range(E):
                x = blocks[l](x, cache[l])
            states.append(x)
            draft_logits.append(exit_logits(model, x)[0, -1])  # (V,)
            token = sample_next(draft_logits[-1][None], temperature, top_k, generator)  # (1, 1)
            drafts.append(token[0])
        # verify: layers E.. over the n drafted positions at once, from the draft's hidden states
        x = torch.cat(states, dim=1)  # (1, n, C)
        for l in range(E, L):
            x = blocks[l](x, cache[l])
        k, new = accept(torch.cat(drafts), torch.stack(draft_logits), exit_logits(model, x)[0], temperature, top_k,
                        generator)
        idx = torch.cat((idx, new[None]), dim=1)
        for cache_l in cache:  # roll back what was computed for rejected drafts
            cache_l.truncate(idx.size(1) - 1)
        attn = cost['attn_per_key'] * n * (pos + (n + 1) / 2)  # keys seen by the n positions, per layer
        flops += n * (L * cost['layer'] + 2 * cost['head']) + L * attn
        produced, drafted, accepted, passes = produced + new.numel(), drafted + n, accepted + k, passes + 1
    stats.update(drafted=drafted, accepted=accepted, verify_passes=passes, fallback_tokens=fallback,
                 acceptance_rate=accepted / max(1, drafted),
                 tokens_per_pass=(produced - fallback) / max(1, passes),
                 flops_per_token=flops / max(1, produced - fallback))
    return idx


DECODE = {'early_exit': early_exit_decode, 'speculative': speculative_decode}
