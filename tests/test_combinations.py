"""Pairs of mechanisms that the config accepts together: each pair stays causal, and its cached decode
gives the tokens of the uncached reference path (past block_size too)."""

import pytest
import torch

from model_efficient import EfficientGPT, EfficientGPTConfig

TINY = dict(n_layer=4, n_head=2, n_embd=32, block_size=24, vocab_size=50, dropout=0.0, bias=True)
MECHANISMS = {
    'local': dict(enable_local_attention=True, local_attention_window=6),
    'local_rope': dict(enable_local_attention=True, local_attention_window=6, pos_emb='rope'),
    'hourglass': dict(enable_hierarchical=True, hierarchy_factor=2, hierarchy_layers='1,2'),
    'act': dict(enable_adaptive_compute=True, act_layers='2', max_pondering_steps=3),
    'topk': dict(enable_sparse_activation=True, sparsity_ratio=0.25, sparse_layers='0,3'),
    'moe': dict(enable_dynamic_routing=True, num_experts=3, experts_top_k=2, moe_layers='1,2'),
    'early_exit': dict(enable_early_exit=True, exit_layers='1', exit_threshold=0.5),
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


@pytest.mark.parametrize('a,b', [p for p in PAIRS if 'early_exit' in p])
def test_pair_speculative_equals_full(a, b):
    model = build(a, b)
    idx = torch.tensor([[7]])
    full = model.generate(idx, 23, temperature=0)  # speculative decoding stays inside block_size
    assert torch.equal(model.generate(idx, 23, temperature=0, decode='speculative'), full)
