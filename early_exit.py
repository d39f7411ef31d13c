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
  agreeing prefix (greedy) or use rejection sampling (temperature > 0), and truncate the caches. Its layers
  run as DecodeSteps: the same ops as their forward, without the module calls.
Both work inside block_size; past it they fall back to the full model over the cropped context, which
recomputes everything each step (GPT.next_logits), exactly as decode='full' does there.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from local_attention import LocalSelfAttention, RotarySelfAttention
from model import MLP, CausalSelfAttention, LayerNorm, attend, decode_tokens, sample_next, token_probs, weights_cost


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


# The exit losses' weight over training, a factor of early_exit_loss_weight by the fraction of training done:
# exits trained all along pull the trunk away from the last layer's own loss; later or fading ones pull less.
SCHEDULES = {
    'constant': lambda progress: 1.0,
    'decay': lambda progress: 1.0 - progress,  # full weight first, none at the end: the last layer settles
    'late': lambda progress: float(progress >= 0.7),  # the trunk trains for the last layer, then the exits learn it
    'rise': lambda progress: progress,  # LayerSkip's curriculum: exits weigh more as the model matures
}


class ExitHeads(nn.Module):
    """The early-exit loss and the learned exit classifiers, one per exit layer."""

    def __init__(self, config, plan):
        super().__init__()
        exits = [l for l, e in enumerate(plan.exit) if e]
        depth = sum(l + 1 for l in exits)
        self.weights = {l: config.early_exit_loss_weight * (l + 1) / depth for l in exits}
        self.classifiers = nn.ModuleDict({str(l): nn.Linear(config.n_embd + 2, 1) for l in exits})
        self.schedule, self.factor = SCHEDULES[config.exit_loss_schedule], SCHEDULES[config.exit_loss_schedule](0.0)
        self.detach, self.classifier_weight = config.exit_detach_trunk, config.exit_classifier_loss_weight

    def set_progress(self, fraction):
        self.factor = self.schedule(fraction)

    def losses(self, model, targets, logits):
        """{name: (weight, value)}: per exit, its cross-entropy and its classifier's loss."""
        if targets is None:
            return {}
        aux = {}
        final_choice = logits.argmax(dim=-1)  # (B, T)
        for l, w in self.weights.items():
            point = model.transformer.h[l].exit
            x, point.state = point.state, None
            logits_l = exit_logits(model, x.detach() if self.detach else x)  # (B, T, V)
            aux[f'exit{l + 1}_ce'] = (w * self.factor, F.cross_entropy(logits_l.flatten(0, 1), targets.flatten(), ignore_index=-1))
            # the classifier learns from detached features: it never changes what the model predicts
            score = self.classifiers[str(l)](exit_features(x, logits_l).detach()).squeeze(-1)  # (B, T)
            agree = (logits_l.argmax(dim=-1) == final_choice).float()
            aux[f'exit{l + 1}_clf'] = (self.classifier_weight, F.binary_cross_entropy_with_logits(score, agree))
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


def linear_flops(cost):
    """(fixed, per key, span) of a cost(keys) -> model.Cost that grows linearly in the keys attended up to a
    span (a local layer's window; unbounded for full attention), so the engines count FLOPs by arithmetic."""
    c0, c1, far = cost(0).flops, cost(1).flops, cost(1e9).flops
    return c0, c1 - c0, (far - c0) / (c1 - c0) if c1 > c0 else 0.0


class FlopCounter:
    """FLOPs the decode engines execute, from the modules' own costs read once: the trunk (run_trunk) and
    each layer after it per token, an exit head, a K/V propagation into one layer."""

    def __init__(self, model):
        blocks = model.transformer.h
        self.trunk = linear_flops(model.trunk_cost)
        self.layer = [linear_flops(block.cost) for block in blocks]
        self.head = model.head_cost().flops
        self.kv = weights_cost(blocks[-1].attn.c_attn.weight[blocks[-1].attn.n_embd:]).flops
        self.total = 0.0

    def add(self, layers, keys, tokens=1, trunk=True):
        """tokens tokens through the trunk (if trunk) and layers, each attending to about `keys` positions."""
        parts = [self.layer[l] for l in layers] + ([self.trunk] if trunk else [])
        self.total += tokens * sum(fixed + per_key * min(keys, span) for fixed, per_key, span in parts)


class EarlyExitDecoder:
    """Early-exit decoding state of a batch: the KV caches and one step per token (also used by evaluate.py
    to teacher-force text through exactly what generation runs). The trunk (the layers before an hourglass
    and its shortened layers, run once per group) runs for every token; tokens exit in the layers after it.
    The rows of a batch exit together, at the first exit layer where every row is confident, so that they
    keep one cache length."""

    def __init__(self, model, batch_size=1, criterion=None, threshold=None):
        c = model.config
        self.model, self.blocks, self.post = model, list(model.transformer.h), list(model.post)
        self.check = [CRITERIA[criterion or c.exit_criterion] if e else None for e in model.plan.exit]
        self.threshold = c.exit_threshold if threshold is None else threshold
        self.cache = model.new_cache(batch_size)
        self.flops = FlopCounter(model)
        self.depths, self.stepped, self.fallback = [], 0, 0  # layers run per call; step() calls; calls past block_size
        # per exit layer, the folded K/V weights of every layer after it (recomputed per decoder: weights may train)
        self.propagation = [folded_kv(self.blocks[l + 1:]) if e else None for l, e in enumerate(model.plan.exit)]

    def next_logits(self, idx):
        """Logits (B, V) of the token after idx (B, T), for model.decode_tokens: one new token goes through
        step(); a prompt of several tokens, and every step past block_size of a model that does not stream,
        run the full model (GPT.next_logits), which counts as every layer run."""
        inside = self.model.streams or idx.size(1) <= self.model.config.block_size
        if inside and idx.size(1) - self.cache[-1].len == 1:
            logits, depth = self.step(idx[:, -1:])
            self.stepped += 1
        else:
            logits, depth = self.model.next_logits(idx, self.cache), len(self.blocks)
            self.fallback += not inside
        self.depths.append(depth)
        return logits

    def step(self, token):
        """token (B, 1) at the next position -> (logits (B, V) for the token after it, layers run)."""
        m, pos = self.model, self.cache[-1].len  # the last cache counts every position in every layout
        x = m.run_trunk(m.embed(token, pos), self.cache)
        for l in self.post:
            x_prev, x = x, self.blocks[l](x, self.cache[l])
            if self.check[l] is None:
                continue
            confidence, logits = self.check[l](m, l, x, x_prev)
            if confidence.min().item() >= self.threshold:  # the one host sync of an exit layer
                self.propagate(x, l)
                self.count(l + 1, pos, checks=self.check[:l + 1])
                return (exit_logits(m, x) if logits is None else logits)[:, -1], l + 1
        self.count(len(self.blocks), pos, checks=self.check)
        return exit_logits(m, x)[:, -1], len(self.blocks)

    def count(self, depth, pos, checks):
        ran = self.post[:self.post.index(depth - 1) + 1]
        self.flops.add(ran, pos + 1)
        self.flops.total += self.flops.head * (1 + sum(c is not None for c in checks)) + \
            self.flops.kv * (len(self.blocks) - depth)

    def propagate(self, x, layer):
        """CALM's state propagation: the layers after `layer` are not run for this token, but later tokens
        attend to it there, so their caches get K/V computed from the exit state x (B, 1, C), each entering
        its cache as that layer's own would (rotated, where it uses rotary positions)."""
        w, b = self.propagation[layer]
        skipped = self.blocks[layer + 1:]
        attn = skipped[0].attn
        kv = F.linear(F.layer_norm(x, x.shape[-1:], eps=1e-5), w, b)  # (B, 1, skipped * 2C), LayerNorm's eps
        kv = kv.view(x.size(0), len(skipped), 2, attn.n_head, 1, attn.n_embd // attn.n_head)  # K, V (B, nh, 1, hs)
        for i, block in enumerate(skipped, start=layer + 1):
            block.attn.store(kv[:, i - layer - 1, 0], kv[:, i - layer - 1, 1], self.cache[i])


def exit_reference(model, idx, depths):
    """The oracle of EarlyExitDecoder: logits (B, T, V) of idx (B, T) when the token at position t leaves the
    stack after depths[t] layers, by one forward over the whole sequence. A layer a token skips passes its
    state through unchanged, so later tokens read K/V computed from its exit state there, which is what
    state propagation writes into the caches."""
    x = model.run_trunk(model.embed(idx), [None] * (len(model.transformer.h) + 1))
    depth = torch.tensor(depths, device=idx.device)[None, :, None]  # (1, T, 1)
    for l in model.post:
        x = torch.where(depth > l, model.transformer.h[l](x), x)
    return exit_logits(model, x)


def stream_early_exit(model, idx, max_new_tokens, choose, stats, criterion=None, threshold=None):
    """Yield each new token (B, 1) of idx (B, T) as it is chosen, with the number of layers that produced
    its distribution; fills stats at the end. The token loop is model.decode_tokens over the decoder.
    criterion and threshold override the config's decode-time settings."""
    dec = EarlyExitDecoder(model, idx.size(0), criterion, threshold)
    for token in decode_tokens(dec.next_logits, idx, max_new_tokens, choose):
        yield token, dec.depths[-1]
    depths = dec.depths
    stats.update(exit_layers=depths, mean_exit_layer=sum(depths) / max(1, len(depths)),
                 layers_run_fraction=sum(depths) / max(1, model.config.n_layer * len(depths)),
                 fallback_tokens=dec.fallback, flops_per_token=dec.flops.total / max(1, dec.stepped))


def early_exit_decode(model, idx, max_new_tokens, temperature, top_k, generator, stats, criterion=None,
                      threshold=None):
    choose = lambda logits: sample_next(logits, temperature, top_k, generator)  # noqa: E731
    tokens = stream_early_exit(model, idx, max_new_tokens, choose, stats, criterion, threshold)
    return torch.cat([idx, *(t for t, _ in tokens)], dim=1)


class DecodeSteps:
    """A model's embedding, layers and head as decode steps with few ops and no module calls where it can: at
    batch-1 decode of a small model the overhead of each op and each nn.Module call, not the arithmetic, is
    most of a step (128 dims, one thread: a layer over one token 150 us through its modules, 110 here). A
    pre-norm layer runs its norms, projections, attention (full, rotary, local) and MLP as functional ops on
    its own weights, the same ops as its forward, so its output equals the forward's bit for bit; any other
    attention, MLP or layer (value embeddings, top-k, MoE, MoD, pondering) runs its own module. In training
    mode (dropout) every step is the module's."""

    def __init__(self, model):
        t = model.transformer
        self.C = model.config.n_embd
        self.wte, self.wpe = t.wte.weight, t.wpe.weight if 'wpe' in t else None
        self.ln_f, self.lm_head = t.ln_f, model.lm_head
        self.plain_head = type(model.lm_head) is nn.Linear  # not a soft-capped head
        self.layers = [self.layer(block) for block in t.h]
        if model.training:  # dropout and layer dropout: every step is the module's own
            self.layers, self.embed, self.head = list(t.h), model.embed, lambda x: exit_logits(model, x)

    def embed(self, token, pos):
        """token (B, T) at positions pos .. pos+T-1 -> (B, T, C), as model.embed (a rotary model: no table)."""
        x = F.embedding(token, self.wte)
        return x if self.wpe is None else x + self.wpe[pos:pos + token.size(1)]

    def head(self, x):
        """Logits (B, T, V) of states (B, T, C), as exit_logits."""
        x = F.layer_norm(x, (self.C,), self.ln_f.weight, self.ln_f.bias, 1e-5)
        return F.linear(x, self.lm_head.weight) if self.plain_head else self.lm_head(x)

    def layer(self, block):
        """block as a function (x (B, T, C), cache) -> (B, T, C) over the T positions after the cached ones.
        Its weights are read once here: a module's attribute lookup costs about as much as a small op."""
        if not isinstance(getattr(block, 'ln_1', None), LayerNorm):  # a wrapped layer (MoD, pondering)
            return block
        C, attn, mlp = self.C, block.attn, block.mlp
        ln_1, ln_2 = (block.ln_1.weight, block.ln_1.bias), (block.ln_2.weight, block.ln_2.bias)
        nh, qkv, proj = attn.n_head, (attn.c_attn.weight, attn.c_attn.bias), (attn.c_proj.weight, attn.c_proj.bias)
        rotate = getattr(attn, 'rotate', None)  # rotary positions, the per-head qk norm, or nothing
        if not (type(attn) in (CausalSelfAttention, RotarySelfAttention, LocalSelfAttention)
                and type(attn.c_attn) is nn.Linear):
            qkv = None  # value embeddings' c_attn or another attention: the module's own forward
        if type(mlp) is MLP and isinstance(mlp.gelu, nn.GELU):
            fc, out = (mlp.c_fc.weight, mlp.c_fc.bias), (mlp.c_proj.weight, mlp.c_proj.bias)
            approximate = mlp.gelu.approximate
        else:
            fc = None  # top-k, MoE or another activation: the module's own forward

        def step(x, cache):
            B, T, _ = x.shape
            h = F.layer_norm(x, (C,), *ln_1, 1e-5)
            if qkv is None:
                x = x + attn(h, cache)
            else:  # q, k, v as views of one c_attn output (B, nh, T, hs), q and k positioned together
                q, k, v = qkv_heads = F.linear(h, *qkv).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
                if rotate is not None:
                    q, k = rotate.position(qkv_heads[:2], cache.len).unbind(0)
                kv = cache.update(k, v)  # (B, nh, S, hs) keys and values, and a rolling cache's (T, S) mask
                y = attend(q, *kv) if len(kv) == 2 else F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=kv[2])
                x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), *proj)
            h = F.layer_norm(x, (C,), *ln_2, 1e-5)
            if fc is None:
                return x + mlp(h)
            return x + F.linear(F.gelu(F.linear(h, *fc), approximate=approximate), *out)
        return step


def greedy_accept(drafts, draft_logits, logits, temperature, top_k, generator):
    """Keep the drafts the full model would have chosen, then its own choice at the first mismatch, as far as
    every row agrees. drafts (B, n), logits (B, n, V) -> (drafts kept, tokens to append (B, kept [+ 1]))"""
    choice = logits.argmax(dim=-1)  # (B, n)
    k = int((choice == drafts).cumprod(dim=1).sum(dim=1).min())
    return k, torch.cat((drafts[:, :k], choice[:, k:k + 1]), dim=1)


def rejection_accept(drafts, draft_logits, logits, temperature, top_k, generator):
    """Speculative sampling (Leviathan et al. 2023), per row: accept draft i with probability min(1, p_i/q_i);
    at the first rejection draw from max(0, p - q) normalised, so the tokens are distributed exactly as the
    full model's samples. The batch keeps the drafts every row accepted; at the next position a row that
    accepted further emits its (accepted, so exactly distributed) draft, the others their correction."""
    q = token_probs(draft_logits, temperature, top_k)  # (B, n, V) what the drafts were drawn from
    p = token_probs(logits, temperature, top_k)  # (B, n, V) the full model
    q_d, p_d = q.gather(2, drafts[..., None])[..., 0], p.gather(2, drafts[..., None])[..., 0]  # (B, n)
    u = torch.rand(drafts.shape, generator=generator, device=drafts.device)
    accepted = (u * q_d < p_d).cumprod(dim=1).sum(dim=1)  # (B,)
    k = int(accepted.min())
    if k == drafts.size(1):
        return k, drafts
    residual = (p[:, k] - q[:, k]).clamp(min=0)  # (B, V)
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p[:, k])  # p == q: nothing to correct
    correction = torch.multinomial(residual, 1, generator=generator)[:, 0]  # (B,)
    return k, torch.cat((drafts[:, :k], torch.where(accepted > k, drafts[:, k], correction)[:, None]), dim=1)


def speculative_decode(model, idx, max_new_tokens, temperature, top_k, generator, stats, draft_layers=None,
                       draft_tokens=None, draft_confidence=0.0):
    """Self-speculative decoding of a batch: draft with the trunk and the first layers after it, verify with
    the rest in one pass, keep what the full model would have produced. draft_layers (counted from layer 0,
    the trunk included) and draft_tokens override the config's spec_exit_layer and spec_draft_tokens.
    draft_confidence: stop drafting early when the draft's top probability falls below it (Kangaroo): a
    token the draft is unsure of is likely rejected, and every draft after it with it."""
    c = model.config
    L, T, gamma = c.n_layer, c.block_size, draft_tokens or c.spec_draft_tokens
    E = draft_layers or c.spec_exit_layer or L // 2
    if not model.post.start < E < L:
        raise ValueError(f"draft_layers={E}: the draft must end after the trunk's {model.post.start} layers and "
                         f"before the last of {L}")
    steps, drafting = DecodeSteps(model), range(model.post.start, E)
    layers = steps.layers
    cache, flops = model.new_cache(idx.size(0), rollback=gamma), FlopCounter(model)
    accept = greedy_accept if temperature == 0 else rejection_accept
    # invariant: every layer's cache holds positions 0 .. idx.size(1) - 2; the last token is not yet fed
    if 1 < idx.size(1) and (model.streams or idx.size(1) <= T):
        model(idx[:, :-1], cache=cache)
    produced = drafted = accepted = passes = fallback = 0
    while produced < max_new_tokens:
        pos = idx.size(1) - 1  # position of the last token
        n = min(gamma, max_new_tokens - produced, gamma if model.streams else T - pos)
        if n < 1:  # past block_size of a model that does not stream: the full model over the cropped context
            logits = model.next_logits(idx, cache)
            idx = torch.cat((idx, sample_next(logits, temperature, top_k, generator)), dim=1)
            produced, fallback = produced + 1, fallback + 1
            continue
        # draft n tokens with the trunk and the drafting layers; their cache entries are the full model's
        token, states, drafts, draft_logits = idx[:, -1:], [], [], []
        for i in range(n):
            x = model.run_trunk(steps.embed(token, pos + i), cache)
            for l in drafting:
                x = layers[l](x, cache[l])
            states.append(x)
            draft_logits.append(steps.head(x)[:, -1])  # (B, V)
            token = sample_next(draft_logits[-1], temperature, top_k, generator)  # (B, 1)
            drafts.append(token)
            if draft_confidence and draft_logits[-1].softmax(dim=-1).amax(dim=-1).min().item() < draft_confidence:
                break
        n = len(drafts)
        # verify: the layers after the draft over the n drafted positions at once, from the draft's states
        x = torch.cat(states, dim=1)  # (B, n, C)
        for l in range(E, L):
            x = layers[l](x, cache[l])
        k, new = accept(torch.cat(drafts, dim=1), torch.stack(draft_logits, dim=1), steps.head(x), temperature,
                        top_k, generator)
        idx = torch.cat((idx, new), dim=1)
        model.truncate_cache(cache, idx.size(1) - 1)  # roll back what was computed for rejected drafts
        flops.add(drafting, pos + (n + 1) / 2, tokens=n)
        flops.add(range(E, L), pos + (n + 1) / 2, tokens=n, trunk=False)
        flops.total += 2 * n * flops.head
        produced, drafted, accepted, passes = produced + new.size(1), drafted + n, accepted + k, passes + 1
    stats.update(drafted=drafted, accepted=accepted, verify_passes=passes, fallback_tokens=fallback,
                 acceptance_rate=accepted / max(1, drafted),
                 tokens_per_pass=(produced - fallback) / max(1, passes),
                 flops_per_token=flops.total / max(1, produced - fallback))
    return idx


DECODE = {'early_exit': early_exit_decode, 'speculative': speculative_decode}
