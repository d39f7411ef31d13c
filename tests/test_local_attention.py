import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from local_attention import (RollingKVCache, flex_attention, flex_window_attention, sliding_window_attention,
                             window_attention_reference)
from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig


def make(tiny_args, seed=0, **keys):
    torch.manual_seed(seed)
    return EfficientGPT(EfficientGPTConfig(**tiny_args, **keys)).eval()


def local(window=8, sinks=0, pos_emb='rope', global_layers='none'):
    return dict(enable_local_attention=True, local_attention_window=window, attention_sinks=sinks,
                pos_emb=pos_emb, global_layers=global_layers)


def qkv(T, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, T, 8, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_window_at_least_T_equals_full_causal_attention(tiny_args):
    q, k, v = qkv(20)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=20), full)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=64), full)
    # and the whole model with learned positions equals the baseline GPT with the same weights
    gpt = GPT(GPTConfig(**tiny_args)).eval()
    eff = make(tiny_args, **local(window=32, pos_emb='learned'))
    eff.load_state_dict(gpt.state_dict())
    x = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(eff(x, x)[0], gpt(x, x)[0])


@pytest.mark.parametrize('T,window,sinks', [(50, 8, 0), (64, 8, 0), (53, 7, 3), (40, 16, 0), (30, 1, 2)])
def test_blocked_attention_equals_band_masked_reference_forward_and_backward(T, window, sinks):
    fast_in, slow_in = qkv(T, requires_grad=True), qkv(T, requires_grad=True)
    fast = sliding_window_attention(*fast_in, window, sinks)
    slow = window_attention_reference(*slow_in, window, sinks)
    torch.testing.assert_close(fast, slow)
    grad = torch.randn_like(fast)
    fast.backward(grad)
    slow.backward(grad)
    for a, b in zip(fast_in, slow_in):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.skipif(flex_attention is None, reason='this torch has no FlexAttention')
def test_flex_attention_path_equals_band_masked_reference():
    # the CUDA path, run here in eager mode (slow, but the same mask)
    q, k, v = qkv(70)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # eager FlexAttention warns that it is meant to be compiled
        fast = flex_window_attention(q, k, v, 8, 2)
    torch.testing.assert_close(fast, window_attention_reference(q, k, v, 8, 2))


def test_band_reference_sees_exactly_the_window():
    # query t reads t-w+1 .. t and the sinks: check the convention on one-hot values
    T, w, s = 12, 3, 1
    q = torch.zeros(1, 1, T, 4)  # equal scores: the output is the mean of the visible values
    v = torch.eye(T).view(1, 1, T, T)
    y = window_attention_reference(q, torch.zeros(1, 1, T, 4), v, w, s)[0, 0]  # (T, T): row t = visibility
    for t in range(T):
        visible = {j for j in range(T) if y[t, j] > 0}
        assert visible == set(range(max(0, t - w + 1), t + 1)) | {0}


@pytest.mark.parametrize('sinks', [0, 2])
def test_rolling_cache_decode_equals_uncached_reference_past_block_size(tiny_args, sinks):
    model = make(tiny_args, **local(window=6, sinks=sinks))
    assert model.streams
    idx = torch.randint(0, 50, (2, 3))
    cache = model.new_cache(2)
    with torch.no_grad():
        for _ in range(70):  # block_size is 32: runs past it twice, with no re-prefill
            fast = model.next_logits(idx, cache)
            slow = model.next_logits(idx)  # whole context, absolute positions, windowed attention
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
            idx = torch.cat([idx, torch.multinomial(F.softmax(fast, -1), 1)], dim=1)
    assert cache[0].len == idx.size(1) - 1
    greedy = model.generate(idx[:1, :1], 60, temperature=0)
    assert torch.equal(greedy, model.generate(idx[:1, :1], 60, temperature=0, use_cache=False))


def test_prefill_longer_than_window_then_decode(tiny_args):
    model = make(tiny_args, **local(window=5, sinks=1))
    idx = torch.randint(0, 50, (1, 23))
    cache = model.new_cache(1)
    with torch.no_grad():
        torch.testing.assert_close(model.next_logits(idx, cache), model.next_logits(idx), atol=1e-5, rtol=1e-4)
        for chunk in (1, 4, 9, 1):  # multi-token updates (a speculative verify) after the ring has wrapped
            idx = torch.cat([idx, torch.randint(0, 50, (1, chunk))], dim=1)
            torch.testing.assert_close(model.next_logits(idx, cache), model.next_logits(idx), atol=1e-5, rtol=1e-4)


def test_learned_positions_crop_at_block_size_like_the_baseline(tiny_args):
    model = make(tiny_args, **local(window=6, pos_emb='learned', global_layers='1'))
    assert not model.streams and model.plan.attn == ('local', 'full')
    idx = torch.randint(0, 50, (1, 4))
    cache = model.new_cache(1)
    with torch.no_grad():
        for _ in range(45):
            fast = model.next_logits(idx, cache)
            torch.testing.assert_close(fast, model.next_logits(idx), atol=1e-5, rtol=1e-4)
            idx = torch.cat([idx, fast.argmax(-1, keepdim=True)], dim=1)


def test_rope_with_a_full_layer_does_not_stream(tiny_args):
    model = make(tiny_args, **local(window=6, global_layers='1'))
    assert model.plan.attn == ('local_rope', 'full_rope') and not model.streams
    out = model.generate(torch.tensor([[1]]), 40, temperature=0)
    assert torch.equal(out, model.generate(torch.tensor([[1]]), 40, temperature=0, use_cache=False))


def test_cache_size_stops_growing_at_the_window(tiny_args):
    w, s = 6, 2
    model = make(tiny_args, **local(window=w, sinks=s))
    cache = model.new_cache(1)
    per_position = 2 * tiny_args['n_embd'] * 4  # k and v of every head, float32
    idx = torch.tensor([[1]])
    sizes = []
    with torch.no_grad():
        for _ in range(40):
            idx = torch.cat([idx, model.next_logits(idx, cache).argmax(-1, keepdim=True)], dim=1)
            sizes.append(cache[0].nbytes)
    assert sizes[:s + w] == [(t + 1) * per_position for t in range(s + w)]
    assert set(sizes[s + w - 1:]) == {(s + w) * per_position}
    assert all(c.k.shape[2] == s + w for c in cache)


def test_truncate_round_trip(tiny_args):
    model = make(tiny_args, **local(window=6, sinks=1))
    idx = torch.randint(0, 50, (1, 30))
    cache = model.new_cache(1, rollback=4)
    with torch.no_grad():
        model(idx[:, :20], cache=cache)
        first = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(20, 30)]  # the ring wraps
        for c in cache:
            c.truncate(25)  # take back 5 positions: the rollback margin plus one
        again = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(25, 30)]
        torch.testing.assert_close(torch.cat(again), torch.cat(first[5:]))
        with pytest.raises(ValueError, match='roll back'):
            cache[0].truncate(20)
        for c in cache:
            c.truncate(0)  # back to the start is a reset
        torch.testing.assert_close(model(idx, cache=cache)[0], model(idx)[0])


def test_rolling_cache_holds_sinks_and_last_window():
    cache = RollingKVCache(1, 1, window=3, head_size=1, sinks=2)
    k = torch.arange(10.0).view(1, 1, 10, 1)
    cache.update(k[:, :, :7], k[:, :, :7])  # prefill longer than the ring
    cache.update(k[:, :, 7:8], k[:, :, 7:8])
    assert sorted(cache.slot_pos.tolist()) == [0, 1, 5, 6, 7]
    assert sorted(cache.k.flatten().tolist()) == [0.0, 1.0, 5.0, 6.0, 7.0]
    assert cache.len == 8


@pytest.mark.parametrize('keys', [local(window=4), local(window=4, sinks=2), local(window=4, pos_emb='learned'),
                                  local(window=4, global_layers='1'), dict(pos_emb='rope')])
def test_causality_perturbation_and_gradient(tiny_args, keys):
    model = make(tiny_args, **keys)
    x = torch.randint(0, 50, (1, 30))
    j = 17
    y = x.clone()
    y[0, j] = (y[0, j] + 1) % 50
    a, b = model(x, x)[0], model(y, y)[0]
    torch.testing.assert_close(a[:, :j], b[:, :j])
    assert not torch.allclose(a[:, j:], b[:, j:])
    emb = model.transformer.wte(x).detach().requires_grad_(True)  # gradient of an early position's logits
    h = emb
    for block in model.transformer.h:
        h = block(h)
    model.lm_head(model.transformer.ln_f(h))[0, j - 1].sum().backward()
    assert emb.grad[0, j:].abs().max() == 0 and emb.grad[0, :j].abs().max() > 0


def test_window_limits_the_receptive_field_and_sinks_extend_it(tiny_args):
    # 2 layers, w=4: position t depends on t-6 .. t only, plus position 0 when it is a sink
    x = torch.randint(0, 50, (1, 30))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 50
    plain = make(tiny_args, **local(window=4))
    torch.testing.assert_close(plain(x, x)[0][:, 7:], plain(y, y)[0][:, 7:])
    sinks = make(tiny_args, **local(window=4, sinks=1))
    assert not torch.allclose(sinks(x, x)[0][:, 29], sinks(y, y)[0][:, 29])


def test_rope_window_equals_rope_full_attention_when_T_fits(tiny_args):
    full = make(tiny_args, pos_emb='rope')
    windowed = make(tiny_args, **local(window=32))
    windowed.load_state_dict(full.state_dict())
    x = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(windowed(x, x)[0], full(x, x)[0])


def test_rope_drops_position_table_and_weights_round_trip(tiny_args):
    model = make(tiny_args, **local(window=8))
    gpt = GPT(GPTConfig(**tiny_args))
    assert 'transformer.wpe.weight' not in model.state_dict()
    assert model.get_num_params() == gpt.get_num_params()  # rope adds no parameters; wpe is not counted
    assert model.get_num_params(non_embedding=False) == gpt.get_num_params(non_embedding=False) - 32 * 32
    again = make(tiny_args, seed=1, **local(window=8))
    again.load_state_dict(model.state_dict())
    x = torch.randint(0, 50, (1, 20))
    torch.testing.assert_close(again(x)[0], model(x)[0])


@pytest.mark.parametrize('keys,message', [
    (dict(pos_emb='alibi'), 'pos_emb'),
    (dict(enable_local_attention=True, local_attention_window=0), 'local_attention_window'),
    (dict(enable_local_attention=True, attention_sinks=-1), 'attention_sinks'),
    (dict(enable_local_attention=True, global_layers='7'), 'layer pattern'),
    (dict(attention_sinks=2), 'enable_local_attention'),
    (dict(pos_emb='rope', n_head=32), 'even head size'),
])
def test_config_rejects_bad_values(tiny_args, keys, message):
    with pytest.raises(ValueError, match=message):
        EfficientGPTConfig(**{**tiny_args, **keys})


def test_bench_rows_run_and_the_rolling_cache_stays_flat(tiny_args):
    from bench_rows import local as rows
    model = make(tiny_args, **local(window=4))
    b = SimpleNamespace(model=model, device='cpu', runs=1, sync=lambda: None, prompt=torch.tensor([[1]]),
                        long_T='16,24', long_window=4, stream_tokens=2000)
    steps = rows.local_train_step(b)
    assert steps['layer_T24_ratio']['median'] > 0 and steps['model_T16_ratio']['median'] > 0
    stream = rows.local_stream(b)
    assert stream['at_1000_kv_cache_bytes'] == stream['at_2000_kv_cache_bytes'] == 2 * 4 * 2 * 32 * 4
    assert rows.local_stream(SimpleNamespace(model=make(tiny_args))) is None  # not a streaming model
