"""Pairs of mechanisms that the config accepts together: each pair stays causal, and its cached decode
gives the tokens of the uncached reference path (past block_size too). With early exit, its decode engine
matches its oracle and self-speculative decoding gives the full model's tokens."""

import pytest
import torch

from early_exit import EarlyExitDecoder, exit_reference
from model import decode_tokens
from model_efficient import EfficientGPT, EfficientGPTConfig

TINY = dict(n_layer=5, n_head=2, n_embd=32, block_size=24, vocab_size=50, dropout=0.0, bias=True)
MECHANISMS = {
    'local': dict(enable_local_attention=True, local_attention_window=6),
    'local_rope': dict(enable_local_attention=True, local_attention_window=6, pos_emb='rope'),
    'hourglass': dict(enable_hierarchical=True, hierarchy_factor=2, hierarchy_layers='1,2'),
    'act': dict(adaptive_compute='act', act_layers='2', max_pondering_steps=3),
    'mod': dict(adaptive_compute='mod', mod_layers='1,3', mod_capacity=0.5),
    'topk': dict(enable_sparse_activation=True, sparsity_ratio=0.25, sparse_layers='0,3'),
    'moe': dict(enable_dynamic_routing=True, num_experts=3, experts_top_k=2, moe_layers='1,2'),
    'early_exit': dict(enable_early_exit=True, exit_criterion='max_prob', exit_threshold=0.5),
}
PAIRS = [(a, b) for i, a in enumerate(MECHANISMS) for b in list(MECHANISMS)[i + 1:]
         if not MECHANISMS[a].keys() & MECHANISMS[b].keys()]  # local and local_rope are one mechanism


def build(a, b):
    torch.manual_seed(0)
    try:
        config = EfficientGPTConfig(**TINY, **MECHANISMS[a], **MECHANISMS[b])
    except ValueError as e:  # a combination the config rejects says so; nothing else may fail
        pytest.skip(f"rejected: {e}")
    return EfficientGPT(config).eval()


@pytest.mark.parametrize('a,b', PAIRS)
def test_pair_is_causal(a, b):
    model = build(a, b)
    x = torch.randint(0, 50, (1, 24))
    logits, _ = model(x, x)
    for j in (5, 11, 17):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 50
        torch.testing.assert_close(model(y, y)[0][:, :j], logits[:, :j], msg=f"position {j} leaks into earlier ones")


@pytest.mark.parametrize('a,b', PAIRS)
def test_pair_cached_decode_equals_reference(a, b):
    model = build(a, b)
    idx = torch.tensor([[7]])
    cached = model.generate(idx, 60, temperature=0)  # crosses block_size 24
    assert torch.equal(cached, model.generate(idx, 60, temperature=0, use_cache=False))


EXIT_PAIRS = [p for p in PAIRS if 'early_exit' in p]


@pytest.mark.parametrize('a,b', EXIT_PAIRS)
def test_pair_early_exit_decode_equals_its_oracle(a, b):
    model = build(a, b)
    # a threshold that half of the tokens pass at the first exit: every depth is exercised
    x = torch.randint(0, 50, (2, 24))
    first = model.post[0] if model.plan.exit[model.post[0]] else model.post[1]
    state = model.run_trunk(model.embed(x), [None] * 6)
    for l in model.post[:model.post.index(first) + 1]:
        state = model.transformer.h[l](state)
    threshold = model.lm_head(model.transformer.ln_f(state)).softmax(-1).amax(-1).max(0).values.median().item()
    dec, logits = EarlyExitDecoder(model, batch_size=2, threshold=threshold), []
    teacher = lambda out: logits.append(out) or x[:, len(logits):len(logits) + 1]  # noqa: E731 (feeds x itself)
    for _ in decode_tokens(dec.next_logits, x[:, :1], 23, teacher):
        pass
    assert 1 < len(set(dec.depths)), dec.depths  # tokens left at several depths
    torch.testing.assert_close(torch.stack(logits, dim=1), exit_reference(model, x[:, :-1], dec.depths))


@pytest.mark.parametrize('a,b', EXIT_PAIRS)
@pytest.mark.parametrize('batch', [1, 3])
def test_pair_speculative_equals_full(a, b, batch):
    model = build(a, b)
    idx = torch.arange(batch)[:, None] * 11 + 7
    n = 50 if model.streams else 23  # a streaming model speculates past block_size 24 too
    full = model.generate(idx, n, temperature=0)
    for draft_layers, draft_tokens in zip(range(model.post.start + 1, 5), (3, 5, 2, 4)):  # the draft ends after the trunk
        spec = model.generate(idx, n, temperature=0, decode='speculative', draft_layers=draft_layers,
                              draft_tokens=draft_tokens, draft_confidence=0.05 * draft_tokens)  # drafts stop early
        assert torch.equal(spec, full), (draft_layers, draft_tokens)
