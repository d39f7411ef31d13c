import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from conftest import ROOT
from early_exit import DecodeSteps, EarlyExitDecoder, exit_logits
from model import token_probs
from evaluate import decode_consistent_loss, evaluate_loss
from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from test_train import tiny_data, train  # noqa: F401 (tiny_data is a fixture)
from tokenizer import char_meta, load_tokenizer


def make(tiny_args, seed=0, **kw):
    torch.manual_seed(seed)
    args = {**tiny_args, 'n_layer': 4, 'enable_early_exit': True, **kw}
    return EfficientGPT(EfficientGPTConfig(**args)).eval()


def briefly_trained(tiny_args, steps=60, **kw):
    """A tiny early-exit model trained on a repetitive sequence, so that its exits are confident and its
    drafts mostly agree with the full model, as on real text."""
    model = make(tiny_args, **kw).train()
    data = torch.tensor([i % 7 * 3 + i % 5 for i in range(2000)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    T = model.config.block_size
    for _ in range(steps):
        ix = torch.randint(len(data) - T - 1, (8,), generator=g)
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + T + 1] for i in ix])
        _, loss = model(x, y)
        loss = loss + sum(w * v for w, v in model.aux_losses().values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_off_by_default_and_exit_points_do_not_change_the_forward(tiny_args):
    assert EfficientGPTConfig().enable_early_exit is False
    gpt = GPT(GPTConfig(**{**tiny_args, 'n_layer': 4})).eval()
    model = make(tiny_args, layer_dropout=0.5)  # layer dropout acts in training only
    missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
    assert all(k.startswith('exit_heads.') for k in missing) and not unexpected
    x = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(model(x, x)[0], gpt(x, x)[0])
    assert set(model.aux_losses()) == {f'exit{d}_{kind}' for d in (1, 2, 3) for kind in ('ce', 'clf')}


def test_config_conflicts_are_clear_errors():
    for bad, words in (({'exit_criterion': 'vibes'}, 'exit_criterion'), ({'exit_layers': '-1'}, 'nothing could exit'),
                       ({'layer_dropout': 1.0}, 'layer_dropout'), ({'spec_exit_layer': 9}, 'spec_exit_layer')):
        with pytest.raises(ValueError, match=words):
            EfficientGPTConfig(n_layer=4, enable_early_exit=True, **bad)
    # with an hourglass a token exits only after it: here only the last layer is, so nothing could exit
    with pytest.raises(ValueError, match='after the hourglass'):
        EfficientGPTConfig(n_layer=4, enable_early_exit=True, enable_hierarchical=True, hierarchy_layers='1,2')
    assert EfficientGPTConfig(n_layer=4, enable_early_exit=True, enable_hierarchical=True, hierarchy_layers='1')


def test_threshold_above_one_is_the_full_model(tiny_args):
    model = make(tiny_args, exit_threshold=1.01, block_size=64)
    for criterion in ('max_prob', 'margin', 'saturation', 'learned'):
        model.config.exit_criterion = criterion
        idx = torch.tensor([[3, 1, 4]])
        stats = {}
        early = model.generate(idx, 100, temperature=0, decode='early_exit', stats=stats)  # crosses block_size
        assert torch.equal(early, model.generate(idx, 100, temperature=0))
        assert stats['mean_exit_layer'] == 4 and stats['fallback_tokens'] > 0
        a = model.generate(idx, 30, temperature=1.0, decode='early_exit', generator=torch.Generator().manual_seed(1))
        b = model.generate(idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
    data = np.random.default_rng(0).integers(0, 50, 500).astype(np.uint16)
    scored = decode_consistent_loss(model, data, 64, max_windows=3)
    assert scored['tokens'] == 3 * 64 and scored['mean_exit_layer'] == 4
    assert scored['loss'] == pytest.approx(evaluate_loss(model, data, 64, max_windows=3), rel=1e-5)


def test_exits_happen_and_skipped_layers_hold_kv_of_the_exit_state(tiny_args):
    model = make(tiny_args, exit_layers='1', exit_threshold=0.0)  # every token exits after layer 1 (0-based)
    tokens = torch.randint(0, 50, (1, 20))
    dec = EarlyExitDecoder(model)
    layers = [dec.step(tokens[:, t:t + 1])[1] for t in range(20)]
    assert layers == [2] * 20
    # reference: layers 0 and 1 are ordinary (causal over the sequence), their output is the exit state
    h = model.transformer.h
    with torch.no_grad():
        exit_state = h[1](h[0](model.embed(tokens)))  # (1, T, C)
        for m in (2, 3):  # skipped layers: K/V from ln_1 and the full c_attn of the exit state
            q, k, v = map(h[m].attn.heads, h[m].attn.c_attn(h[m].ln_1(exit_state)).split(32, dim=2))
            torch.testing.assert_close(dec.cache[m].k[:, :, :20], k)
            torch.testing.assert_close(dec.cache[m].v[:, :, :20], v)
        _, k0, _ = map(h[0].attn.heads, h[0].attn.c_attn(h[0].ln_1(model.embed(tokens))).split(32, dim=2))
        torch.testing.assert_close(dec.cache[0].k[:, :, :20], k0)
    assert all(c.len == 20 for c in dec.cache)


def test_early_exit_skips_layers_on_a_trained_model(tiny_args):
    model = briefly_trained(tiny_args, exit_criterion='margin', exit_threshold=0.5)
    stats = {}
    model.generate(torch.tensor([[0]]), 30, temperature=0, decode='early_exit', stats=stats)
    assert len(stats['exit_layers']) == 30 and stats['mean_exit_layer'] < 4
    full = {}
    model.config.exit_threshold = 2.0
    model.generate(torch.tensor([[0]]), 30, temperature=0, decode='early_exit', stats=full)
    assert stats['flops_per_token'] < full['flops_per_token']


@pytest.mark.parametrize('trained', [False, True])
def test_speculative_greedy_equals_full_greedy(tiny_args, trained):
    kw = dict(block_size=320, exit_layers='all')  # 300 tokens inside block_size; past it: next test
    model = briefly_trained(tiny_args, **kw) if trained else make(tiny_args, **kw)
    prompt = torch.tensor([[5, 2, 7, 1]]) if trained else torch.tensor([[5]])
    full = model.generate(prompt, 300, temperature=0)
    for draft_layers, draft_tokens in ((1, 1), (2, 3), (3, 6)):
        model.config.spec_exit_layer, model.config.spec_draft_tokens = draft_layers, draft_tokens
        stats = {}
        spec = model.generate(prompt, 300, temperature=0, decode='speculative', stats=stats)
        assert torch.equal(spec, full), (draft_layers, draft_tokens)
        assert stats['verify_passes'] <= 300 and 0 <= stats['acceptance_rate'] <= 1
    if trained:  # the drafts of a trained model mostly agree: several tokens per verification pass
        assert stats['tokens_per_pass'] > 2


@pytest.mark.parametrize('kw', [{}, dict(bias=False, mlp_act='gelu_tanh'), dict(mlp_act='relu2', logit_softcap=15.0),
                                dict(pos_emb='rope', enable_local_attention=True, local_attention_window=6),
                                dict(enable_local_attention=True, local_attention_window=4, attention_sinks=1),
                                dict(pos_emb='rope', qk_norm=True), dict(qk_norm=True),
                                dict(enable_sparse_activation=True, sparsity_ratio=0.25, sparse_layers='1'),
                                dict(enable_dynamic_routing=True, num_experts=3, experts_top_k=2, moe_layers='1'),
                                dict(enable_early_exit=False, adaptive_compute='mod', mod_layers='2', mod_capacity=0.5)])
def test_decode_steps_equal_the_modules_bit_for_bit(tiny_args, kw):
    """The speculative engine's steps (inlined layers, or the modules where a layer is not plain) against the
    modules' own forward: the same logits and the same cache contents, exactly, over 1 and several positions."""
    model = make(tiny_args, **kw)
    steps = DecodeSteps(model)
    x = torch.randint(0, 50, (2, 12))
    with torch.inference_mode():
        ref, fast = model.new_cache(2), model.new_cache(2)
        for a, b in ((0, 5), (5, 6), (6, 9)):  # a prefill, one token, a verification of three
            h, g = model.embed(x[:, a:b], a), steps.embed(x[:, a:b], a)
            assert torch.equal(h, g)
            for l, block in enumerate(model.transformer.h):
                h, g = block(h, ref[l]), steps.layers[l](g, fast[l])
                assert torch.equal(h, g), (kw, l)
            assert torch.equal(exit_logits(model, h), steps.head(g))
        for r, f in zip(ref, fast):
            assert r.len == f.len and torch.equal(r.k, f.k) and torch.equal(r.v, f.v)
    assert sum(layer is not block for layer, block in zip(steps.layers, model.transformer.h)) >= (3 if not kw else 1)
    assert list(DecodeSteps(model.train()).layers) == list(model.transformer.h)  # training: dropout, the modules'


def test_speculative_past_block_size_falls_back_to_the_cropped_full_path(tiny_args):
    model = make(tiny_args, spec_draft_tokens=3)
    prompt = torch.tensor([[1, 2]])
    stats = {}
    assert torch.equal(model.generate(prompt, 60, temperature=0, decode='speculative', stats=stats),
                       model.generate(prompt, 60, temperature=0))
    assert stats['fallback_tokens'] == 60 - 31


def test_speculative_sampling_preserves_the_distribution(tiny_args):
    """Two tokens sampled with speculation, 2500 times: the empirical joint frequencies of the 25 pairs
    must match the full model's p(a) p(b | a). Each cell's frequency is a binomial proportion with
    standard deviation sqrt(p (1 - p) / N); with 25 cells, 4.5 standard deviations is exceeded by chance
    with probability < 25 * 7e-6 < 1e-3 (the generator is seeded, so the test is deterministic), while a sampler that returned the draft's distribution instead
    misses by far more (checked below, so that the test has power)."""
    model = make({**tiny_args, 'vocab_size': 5}, spec_exit_layer=1, spec_draft_tokens=2)
    with torch.no_grad():
        for p in model.parameters():  # peaked, unlike a fresh init: draft and full model disagree
            p.normal_(0, 0.4)
    prompt, V, N, temperature = torch.tensor([[3, 1]]), 5, 2500, 1.3
    with torch.no_grad():
        p_a = token_probs(model.next_logits(prompt), temperature, None)[0]  # (V,)
        p_b = token_probs(model.next_logits(torch.cat([prompt.expand(V, 2), torch.arange(V)[:, None]], 1)),
                          temperature, None)  # (V, V): row a is p(b | a)
        expected = (p_a[:, None] * p_b).flatten()
        x = model.transformer.h[0](model.embed(prompt))
        q_a = token_probs(model.lm_head(model.transformer.ln_f(x))[0, -1], temperature, None)
    assert 0.5 * (p_a - q_a).abs().sum() > 0.1  # the draft is a different distribution (total variation)
    g = torch.Generator().manual_seed(0)
    counts, stats, rejected = torch.zeros(V * V), {}, 0
    for _ in range(N):
        out = model.generate(prompt, 2, temperature=temperature, decode='speculative', generator=g, stats=stats)
        counts[out[0, 2] * V + out[0, 3]] += 1
        rejected += stats['drafted'] - stats['accepted']
    freq = counts / N
    sigma = (expected * (1 - expected) / N).sqrt()
    assert ((freq - expected).abs() <= 4.5 * sigma + 1e-4).all()
    assert rejected > N / 10  # the residual distribution was exercised often


def every_exit_logits(model, emb):
    """Logits of every layer's output through the shared ln_f and lm_head: (n_layer, T, V) for emb (1, T, C)."""
    out, h = [], emb
    for block in model.transformer.h:
        h = block(h)
        out.append(model.lm_head(model.transformer.ln_f(h))[0])
    return torch.stack(out)


def test_causality_of_training_forward_and_exits(tiny_args):
    model = make(tiny_args)
    x = torch.randint(0, 50, (1, 24))
    y = x.clone()
    j = 13
    y[0, j] = (y[0, j] + 1) % 50
    a, b = model(x, x)[0], model(y, x)[0]
    torch.testing.assert_close(a[:, :j], b[:, :j])
    assert not torch.allclose(a[:, j:], b[:, j:])
    a, b = every_exit_logits(model, model.embed(x)), every_exit_logits(model, model.embed(y))
    torch.testing.assert_close(a[:, :j], b[:, :j])  # what every exit loss and classifier read at positions < j
    # gradient: nothing any exit (or the final layer) predicts before j depends on the input at j or later
    emb = model.embed(x).detach().requires_grad_()
    every_exit_logits(model, emb)[:, :j].logsumexp(-1).sum().backward()
    assert emb.grad[0, j:].abs().max() == 0 and emb.grad[0, :j].abs().max() > 0


def test_early_exit_decode_is_causal(tiny_args):
    model = make(tiny_args, exit_criterion='max_prob', exit_threshold=0.03)  # near uniform: mixed exit layers
    x = torch.randint(0, 50, (1, 30))
    y = x.clone()
    y[0, 17] = (y[0, 17] + 1) % 50
    a, b = EarlyExitDecoder(model), EarlyExitDecoder(model)
    la = [a.step(x[:, t:t + 1]) for t in range(30)]
    lb = [b.step(y[:, t:t + 1]) for t in range(30)]
    assert len({d for _, d in la}) > 1  # several exit layers occur
    for t in range(17):
        assert torch.equal(la[t][0], lb[t][0])
    assert not torch.equal(la[17][0], lb[17][0])


def test_layer_dropout_skips_layers_in_training_only(tiny_args):
    model = make(tiny_args, layer_dropout=0.9).train()
    x = torch.randint(0, 50, (8, 16))
    torch.manual_seed(0)
    a = model(x, x)[0]
    b = model(x, x)[0]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x, x)[0], model(x, x)[0])


def test_ddp_trains_with_early_exit(tmp_path, tiny_data):
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    r = train(tmp_path / 'out', tiny_data, '--max_iters=3', '--eval_interval=3', '--gradient_accumulation_steps=2',
              '--model_type=efficient', '--enable_early_exit=True', '--layer_dropout=0.2', launcher=launcher)
    ckpt = load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))
    assert ckpt['iter_num'] == 3 and any(k.startswith('exit_heads.') for k in ckpt['model'])
    assert 'exit1_ce' in r.stdout, r.stdout


def run(script, *args, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # one thread, like the test process: bit-identical logits
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def checkpoints(tmp_path, tiny_args):
    """A tiny early-exit model and a baseline GPT saved as checkpoints of a char vocabulary."""
    meta = char_meta("abcdefgh\n ")
    args = {**tiny_args, 'vocab_size': meta['vocab_size'], 'block_size': 64}
    model = make(args, exit_criterion='max_prob', exit_threshold=0.11)  # near uniform: mixed exit layers
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(**args)).eval()
    for name, m in (('ee', model), ('base', gpt)):
        save_checkpoint({**model_checkpoint(m, meta), 'iter_num': 0, 'best_val_loss': 9.9}, str(tmp_path / name / 'ckpt.pt'))
    (np.arange(300) % meta['vocab_size']).astype(np.uint16).tofile(tmp_path / 'val.bin')
    return model, load_tokenizer(meta)


def test_sample_show_compute_marks_each_character_with_its_exit_layer(tmp_path, checkpoints):
    model, tok = checkpoints
    r = run('sample.py', '--out_dir=ee', '--show_compute', '--start=ab', '--temperature=0', '--num_samples=1',
            '--max_new_tokens=40', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stats = {}
    idx = model.generate(torch.tensor([tok.encode('ab')]), 40, temperature=0, decode='early_exit', stats=stats)
    text = tok.decode(idx[0].tolist())
    body, tail = r.stdout.rsplit('\nmean exit layer ', 1)
    lines = body.split('\n')
    assert '\n'.join(lines[0::2]) == text  # text lines, each followed by its marks
    marks = ''.join(m.strip() for m in lines[1::2])
    assert [int(d) for d in marks] == [d for d, ch in zip(stats['exit_layers'], text[2:]) if ch != '\n']
    assert tail.startswith(f"{stats['mean_exit_layer']:.2f} of 4") and len(set(marks)) > 1
    r = run('sample.py', '--out_dir=base', '--show_compute', cwd=tmp_path)
    assert r.returncode == 2 and 'enable_early_exit' in r.stderr


def test_bench_early_exit_rows(tmp_path, checkpoints):
    r = run('bench.py', '--ckpt=ee/ckpt.pt', '--baseline=base/ckpt.pt', f'--val_data={tmp_path}', '--exit_windows=1',
            '--rows=exit_full,early_exit,speculative,speculative_batch,exit_costs', '--new_tokens=20', '--runs=1',
            '--batch=3', '--device=cpu', '--exit_sweep=max_prob:2,0.1;margin:0.05', '--spec_sweep=1:2,2:3', '--json=b.json',
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / 'b.json').read_text())['rows']
    sweep = rows['early_exit']
    assert sweep['tokens_scored'] == 64 and {'max_prob@2.0', 'max_prob@0.1', 'margin@0.05'} <= sweep.keys()
    assert sweep['max_prob@2.0']['val_loss'] == pytest.approx(sweep['full_val_loss'], rel=1e-5)
    assert sweep['max_prob@2.0']['gen_exit_layer'] == 4 and sweep['max_prob@0.1']['val_exit_layer'] < 4
    assert all(s['identical_tokens'] for row in ('speculative', 'speculative_batch') for s in rows[row].values())
    assert rows['speculative']['steps_full_vs_full']['identical_tokens'] and len(rows['speculative_batch']) == 2
    assert 'ratio' in rows['exit_full'] and rows['exit_costs']['check_learned_us'] > 0


def test_exit_loss_schedules_and_detached_trunk(tiny_args):
    model = make(tiny_args, exit_loss_schedule='decay').train()
    x = torch.randint(0, 50, (2, 16))
    model(x, x)
    assert model.aux_losses()['exit3_ce'][0] == pytest.approx(0.25)  # 0.5 * 3 / (1 + 2 + 3), all of it at the start
    model.set_progress(0.75)
    model(x, x)
    assert model.aux_losses()['exit3_ce'][0] == pytest.approx(0.25 * 0.25)
    # detached: the exit losses reach the shared head but no layer below the exits
    model = make(tiny_args, exit_detach_trunk=True).train()
    model(x, x)
    sum(v for k, (w, v) in model.aux_losses().items() if k.endswith('_ce')).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.transformer.h.parameters())
