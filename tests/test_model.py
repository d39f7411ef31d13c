import torch

from model import GPT, GPTConfig, KVCache, sample_next
from model_efficient import EfficientGPT, EfficientGPTConfig, expand_layers


def make_gpt(args, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**args)).eval()


def test_cached_and_reference_generate_agree_past_block_size(tiny_args):
    model = make_gpt(tiny_args)
    idx = torch.tensor([[3]])
    cached = model.generate(idx, 300, temperature=0)
    reference = model.generate(idx, 300, temperature=0, use_cache=False)
    assert cached.shape == (1, 301)
    assert torch.equal(cached, reference)


def test_cached_logits_match_reference_at_every_step(tiny_args):
    model = make_gpt(tiny_args)
    idx = torch.randint(0, 50, (2, 5))
    cache = model.new_cache(2)
    with torch.no_grad():
        for _ in range(80):  # crosses block_size 32 twice
            fast = model.next_logits(idx, cache)
            slow = model.next_logits(idx)
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
            idx = torch.cat([idx, sample_next(fast, temperature=1.0)], dim=1)


def test_forward_returns_last_position_without_targets(tiny_args):
    model = make_gpt(tiny_args)
    x = torch.randint(0, 50, (2, 10))
    logits, loss = model(x)
    assert logits.shape == (2, 1, 50) and loss is None
    full, loss = model(x, x)
    assert full.shape == (2, 10, 50) and loss.ndim == 0
    torch.testing.assert_close(full[:, -1:], logits)


def test_gpt_is_causal(tiny_args):
    model = make_gpt(tiny_args)
    x = torch.randint(0, 50, (1, 20))
    logits, _ = model(x, x)
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 50
    logits2, _ = model(y, y)
    torch.testing.assert_close(logits[:, :12], logits2[:, :12])
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


def test_efficient_with_nothing_enabled_equals_gpt(tiny_args):
    gpt = make_gpt(tiny_args)
    eff = EfficientGPT(EfficientGPTConfig(**tiny_args)).eval()
    eff.load_state_dict(gpt.state_dict())
    x = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(eff(x, x)[0], gpt(x, x)[0])
    assert torch.equal(eff.generate(x[:1, :1], 40, temperature=0), gpt.generate(x[:1, :1], 40, temperature=0))


def test_kv_cache_truncate_and_bytes():
    cache = KVCache(1, 2, 8, 4)
    k = torch.randn(1, 2, 5, 4)
    cache.update(k, k)
    assert cache.nbytes == 2 * 5 * 2 * 4 * 4
    cache.truncate(3)
    k2, _ = cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert k2.shape[2] == 4
    torch.testing.assert_close(k2[:, :, :3], k[:, :, :3])


def test_greedy_and_top_k_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}


def test_expand_layers():
    assert expand_layers('all', 3) == (True, True, True)
    assert expand_layers('none', 3) == (False, False, False)
    assert expand_layers('every:2', 6) == (False, True, False, True, False, True)
    assert expand_layers('last:2', 4) == (False, False, True, True)
    assert expand_layers('0,-1', 4) == (True, False, False, True)
    for bad in ('9', 'every:x', 'sometimes'):
        try:
            expand_layers(bad, 4)
        except ValueError as e:
            assert repr(bad) in str(e)
        else:
            raise AssertionError(f"{bad} accepted")
