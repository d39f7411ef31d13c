"""Mixture-of-Depths (efficient_modules.MixtureOfDepths): capacity 1 is the dense block, training runs only the
top-k tokens, decode routes causally and skipped tokens write no K/V, the cached decode equals the uncached
reference path, and old checkpoints that carry enable_adaptive_compute still build ACT."""

import math

import numpy as np
import pytest
import torch

from efficient_modules import MixtureOfDepths, Ponder, RoutedKVCache, set_mod_routing
from model_efficient import EfficientGPT, EfficientGPTConfig

MOD = dict(adaptive_compute='mod', mod_layers='1,3', mod_capacity=0.5)


def make(tiny_args, seed=0, **keys):
    torch.manual_seed(seed)
    model = EfficientGPT(EfficientGPTConfig(**{**tiny_args, 'n_layer': 4, **keys})).eval()
    for p in model.parameters():  # random, larger weights: every path (and every leak) shows in the logits
        p.data.normal_(0, 0.2)
    return model


def routed(model):
    return [b for b in model.transformer.h if isinstance(b, MixtureOfDepths)]


def balanced(model, x=None):
    """Router biases at minus the median logit, layer by layer: about half of the tokens run each routed layer,
    so that both cases (and rows holding different counts) occur everywhere."""
    x = torch.randint(0, 50, (4, 32)) if x is None else x
    with torch.no_grad():
        for layer in routed(model):
            model(x)
            layer.router.bias -= layer.logits.median()
    return model


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_capacity_one_equals_the_dense_block(tiny_args, pos_emb):
    """Every token runs: with the router weight applied the layer is x + w·(block(x) - x), and with the router
    saturated (w = 1 exactly) the model is the dense one with the same weights, in training and in eval."""
    dense = make(tiny_args, pos_emb=pos_emb)
    mod = make(tiny_args, pos_emb=pos_emb, **{**MOD, 'mod_capacity': 1.0})
    state = dense.state_dict()
    for i in (1, 3):  # a routed layer's block sits inside its MixtureOfDepths
        state = {k.replace(f'h.{i}.', f'h.{i}.block.', 1): v for k, v in state.items()}
    missing, unexpected = mod.load_state_dict(state, strict=False)
    assert not unexpected and all('router' in k for k in missing)
    x = torch.randint(0, 50, (2, 32))
    h = dense.embed(x)
    for i in (1, 3):
        layer, block = mod.transformer.h[i], dense.transformer.h[i]
        w = torch.sigmoid(layer.router(h))
        torch.testing.assert_close(layer(h), h + w * (block(h) - h))
        assert layer.chosen.all()
    for layer in routed(mod):
        layer.router.weight.data.zero_()
        layer.router.bias.data.fill_(30.0)  # sigmoid(30) is 1.0 in float32
    for mode in (True, False):
        torch.testing.assert_close(mod.train(mode)(x, x)[0], dense.train(mode)(x, x)[0])


def test_training_runs_only_the_top_k_tokens(tiny_args):
    model = make(tiny_args, **MOD).train()
    layer = model.transformer.h[1]
    shapes = []
    layer.block.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    x = torch.randn(3, 20, 32)
    y = layer(x)
    k = math.ceil(0.5 * 20)
    assert shapes == [(3, k, 32)]  # gather, block over k tokens, scatter
    top = layer.logits.topk(k, dim=-1).indices
    assert torch.equal(layer.chosen, torch.zeros(3, 20, dtype=torch.bool).scatter(1, top, True))
    assert torch.equal(y[~layer.chosen], x[~layer.chosen])  # the others pass unchanged
    assert not torch.equal(y[layer.chosen], x[layer.chosen])


def test_straight_through_runs_the_chosen_tokens_at_full_strength_and_the_router_still_learns(tiny_args):
    model = make(tiny_args, mod_router_scale='straight', **MOD).train()
    layer = model.transformer.h[1]
    x = torch.randn(2, 16, 32)
    y = layer(x)
    chosen = layer.chosen
    assert not torch.allclose(y[chosen], x[chosen])
    y.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    # the same weights with the sigmoid scale: the chosen tokens' updates are smaller by sigmoid(logit)
    layer.scale = torch.sigmoid
    y_sigmoid = layer(x)
    w = torch.sigmoid(layer.logits)[chosen][:, None]
    torch.testing.assert_close(y_sigmoid[chosen] - x[chosen], w * (y[chosen] - x[chosen]))


def test_router_learns_from_the_lm_loss_and_the_predictor_loss(tiny_args):
    model = make(tiny_args, **MOD).train()
    x = torch.randint(0, 50, (2, 16))
    _, loss = model(x, x)
    aux = model.aux_losses()
    assert set(aux) == {'mod_router'} and aux['mod_router'][0] == 0.1
    router = model.transformer.h[1].router.weight
    loss.backward(retain_graph=True)
    assert router.grad.abs().sum() > 0  # through the router weight w = sigmoid(logit)
    model.zero_grad()
    aux['mod_router'][1].backward()
    assert router.grad.abs().sum() > 0
    # the predictor's loss trains the routers only, not the residual stream they read
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if 'router' not in n)


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_decode_path_is_causal_by_perturbation(tiny_args, pos_emb):
    """Changing token j, fed through the cached decode token by token, changes no logits before j; the routing
    decisions before j stay too (the predictor sees only the token's own state)."""
    model = balanced(make(tiny_args, pos_emb=pos_emb, **MOD))
    T = 20
    x = torch.randint(0, 50, (1, T))

    def decode(idx):
        cache = model.new_cache(1)
        with torch.no_grad():
            logits = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(T)]
        return torch.cat(logits, dim=1), [c.routed[0][1:] for c in cache if isinstance(c, RoutedKVCache)]
    logits, went = decode(x)
    assert all(0 < r[-1] < T for r in went), went  # some tokens ran each routed layer, some skipped it
    for j in range(T):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 50
        logits2, went2 = decode(y)
        torch.testing.assert_close(logits2[:, :j], logits[:, :j], msg=f"position {j} changed earlier logits")
        assert all(a[:j] == b[:j] for a, b in zip(went, went2))
        assert not torch.allclose(logits2[:, j], logits[:, j])


@pytest.mark.parametrize('pos_emb,scale', [('learned', 'sigmoid'), ('rope', 'sigmoid'), ('rope', 'straight')])
@pytest.mark.parametrize('prompt_len', [1, 6])
def test_cached_decode_equals_the_uncached_reference(tiny_args, pos_emb, scale, prompt_len):
    """A prompt prefill, then one token at a time, through the RoutedKVCache (rows holding different counts) gives
    at every position the logits of the uncached forward, which routes with the same causal decisions."""
    model = balanced(make(tiny_args, pos_emb=pos_emb, mod_router_scale=scale, **MOD))
    x = torch.randint(0, 50, (3, 31))
    full, _ = model(x, x)
    reference = [layer.chosen for layer in routed(model)]
    assert all(len(set(c.sum(1).tolist())) > 1 for c in reference)  # the rows' counts differ
    cache = model.new_cache(3)
    with torch.no_grad():
        prompt = x[:, :prompt_len].contiguous()
        steps = [model(prompt, prompt, cache=cache)[0]]
        steps += [model(x[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, 31)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    for layer_cache, chosen in zip([c for c in cache if isinstance(c, RoutedKVCache)], reference):
        assert [r[1:] for r in layer_cache.routed] == torch.cumsum(chosen, 1).tolist()


@pytest.mark.parametrize('pos_emb', ['learned', 'rope'])
def test_cached_generate_equals_reference_past_block_size(tiny_args, pos_emb):
    model = balanced(make(tiny_args, pos_emb=pos_emb, **MOD))
    idx = torch.tensor([[3], [7], [11]])
    assert torch.equal(model.generate(idx, 70, temperature=0), model.generate(idx, 70, temperature=0, use_cache=False))


def test_skipped_tokens_run_nothing_and_write_no_kv(tiny_args):
    model = balanced(make(tiny_args, **MOD))
    layer = model.transformer.h[1]
    calls = []
    layer.block.register_forward_hook(lambda m, i, o: calls.append(1))
    layer.reset_counts()
    cache = model.new_cache(1)
    went = []
    with torch.no_grad():
        for t in range(24):
            model(torch.randint(0, 50, (1, 1)), cache=cache)
            went.append(bool(layer.chosen.item()))
    assert 0 < sum(went) < 24 and len(calls) == sum(went)
    assert cache[1].routed[0][-1] == sum(went) and cache[1].len == cache[0].len == 24
    assert cache[1].nbytes == cache[0].nbytes * sum(went) / 24  # K/V of the routed tokens only
    assert layer.fraction_run() == sum(went) / 24
    f = sum(went) / 24  # the cost model counts the measured fraction: the router, then f of the block over f·keys
    expected = layer.block.cost(12 * f).flops * f + 2 * (32 + 1)
    assert abs(layer.cost(12).flops - expected) < 1e-9 * expected and layer.cost(12).flops < model.transformer.h[0].cost(12).flops


def test_truncated_cache_continues_like_the_full_forward(tiny_args):
    model = balanced(make(tiny_args, **MOD))
    x = torch.randint(0, 50, (2, 20))
    full, _ = model(x, x)
    for n in (7, 12):
        cache = model.new_cache(2)
        with torch.no_grad():
            model(torch.randint(0, 50, (2, 14)), cache=cache)
            model.truncate_cache(cache, 0)
            model(x[:, :n].contiguous(), cache=cache)
            model(torch.randint(0, 50, (2, 4)), cache=cache)  # rolled back below
            model.truncate_cache(cache, n)
            steps = [model(x[:, t:t + 1], cache=cache)[0] for t in range(n, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full[:, n:], atol=1e-5, rtol=1e-4)


def test_teacher_forced_decode_loss_equals_the_eval_forward(tiny_args):
    """Outside training the forward routes as decode does, so the decode-consistent loss is the eval loss, and
    top-k routing (training's semantics) gives another."""
    from evaluate import evaluate_loss, teacher_forced_decode_loss
    model = balanced(make(tiny_args, **MOD))
    data = np.random.default_rng(0).integers(0, 50, 200).astype(np.uint16)
    loss, n = teacher_forced_decode_loss(model, data, 32, batch_size=4)
    assert n == 6 * 32 and abs(loss - evaluate_loss(model, data, 32, batch_size=4)) < 1e-4
    set_mod_routing(model, True)
    assert abs(loss - evaluate_loss(model, data, 32, batch_size=4)) > 1e-4
    assert all(layer.chosen.sum(1).eq(16).all() for layer in routed(model))


def test_old_checkpoints_with_the_act_flag_build_act(tiny_args):
    from dataclasses import asdict

    from checkpoint import build_model
    config = EfficientGPTConfig(**tiny_args, enable_adaptive_compute=True, act_layers='1')
    assert config.adaptive_compute == 'act' and 'enable_adaptive_compute' not in asdict(config)
    model = build_model('efficient', {**tiny_args, 'enable_adaptive_compute': True, 'act_layers': '1'})
    assert isinstance(model.transformer.h[1], Ponder)
    assert EfficientGPTConfig(**tiny_args, enable_adaptive_compute=False).adaptive_compute == 'none'


def test_default_routes_every_other_layer(tiny_args):
    model = EfficientGPT(EfficientGPTConfig(**{**tiny_args, 'n_layer': 6}, adaptive_compute='mod'))
    assert [isinstance(b, MixtureOfDepths) for b in model.transformer.h] == [False, True] * 3
    assert model.plan.attn == ('full', 'routed') * 3


@pytest.mark.parametrize('bad', [dict(adaptive_compute='mod', mod_capacity=0.0), dict(mod_capacity=1.5),
                                 dict(adaptive_compute='yes'), dict(adaptive_compute='mod', mod_layers='none'),
                                 dict(adaptive_compute='mod', mod_router_loss_weight=-1.0),
                                 dict(adaptive_compute='mod', enable_early_exit=True),
                                 dict(adaptive_compute='mod', enable_local_attention=True)])
def test_bad_config_is_rejected(tiny_args, bad):
    with pytest.raises(ValueError):
        EfficientGPTConfig(**{**tiny_args, 'n_layer': 4, **bad})


def test_routed_layers_may_be_the_global_layers_of_a_local_model(tiny_args):
    model = balanced(make(tiny_args, enable_local_attention=True, local_attention_window=5, global_layers='1,3', **MOD))
    assert model.plan.attn == ('local', 'routed', 'local', 'routed')
    idx = torch.tensor([[3], [7]])
    assert torch.equal(model.generate(idx, 40, temperature=0), model.generate(idx, 40, temperature=0, use_cache=False))


def test_bench_row_against_a_baseline(tmp_path, tiny_args):
    import json

    from checkpoint import model_checkpoint, save_checkpoint
    from model import GPT, GPTConfig
    from test_sample_bench import run
    meta = {'tokenizer': 'char', 'vocab_size': 50, 'itos': [chr(65 + i) for i in range(50)]}
    for name, model in (('base', GPT(GPTConfig(**{**tiny_args, 'n_layer': 4}))), ('mod', balanced(make(tiny_args, **MOD)))):
        save_checkpoint({**model_checkpoint(model, meta), 'iter_num': 0}, str(tmp_path / name / 'ckpt.pt'))
    (np.arange(200) % 50).astype(np.uint16).tofile(tmp_path / 'val.bin')
    r = run('bench.py', f'--ckpt={tmp_path / "mod" / "ckpt.pt"}', f'--baseline={tmp_path / "base" / "ckpt.pt"}',
            '--rows=mixture_of_depths', '--new_tokens=20', '--runs=1', '--batch=2', '--train_batch=2',
            '--device=cpu', f'--val_data={tmp_path}', '--val_windows=3', '--json=b.json', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / 'b.json').read_text())['rows']['mixture_of_depths']
    assert row['tokens_scored'] == 3 * 32 and row['routed_layers'] == '1,3'
    assert abs(row['decode_consistent_val_loss'] - row['forward_val_loss']) < 1e-4
    assert all(0 <= a <= 1 for a in row['predictor_agrees_with_top_k_by_layer'])
    assert len(row['baseline_loss_of_tokens_run_by_layer']) == len(row['baseline_loss_of_tokens_skipped_by_layer']) == 2
    assert 0 < row['layer_steps_run_per_token'] < 4 and 0 < row['decode_fraction_run'] <= 1
    for key in ('b1_vs_baseline', 'b2_vs_baseline', 'train_step_vs_baseline'):
        assert row[key]['median'] > 0
