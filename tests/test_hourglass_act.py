import pytest
import torch

from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from test_train import tiny_data, train  # noqa: F401 (fixture)

HOURGLASS = dict(enable_hierarchical=True, hierarchy_factor=3, hierarchy_layers='1,2')
ACT = dict(adaptive_compute='act', max_pondering_steps=3, act_layers='1,2', act_epsilon=0.05)


def make(tiny_args, seed=0, **keys):
    torch.manual_seed(seed)
    model = EfficientGPT(EfficientGPTConfig(**{**tiny_args, 'n_layer': 4, **keys})).eval()
    for p in model.parameters():  # random, larger weights: every path (and every leak) shows in the logits
        p.data.normal_(0, 0.2)
    return model


def spread_halting(model):
    """Halting biases that make tokens halt at different steps, so that every halting case runs."""
    for m in model.modules():
        if hasattr(m, 'halt'):
            m.halt.bias.data.fill_(0.0)
            m.halt.weight.data.normal_(0, 0.5)
    return model


VARIANTS = {'hourglass': HOURGLASS, 'hourglass_k2': {**HOURGLASS, 'hierarchy_factor': 2}, 'act': ACT,
            'hourglass_from_layer_0': {**HOURGLASS, 'hierarchy_layers': '0,1,2'},
            'both': {**HOURGLASS, **ACT, 'act_layers': '1,3'}}


@pytest.mark.parametrize('name', VARIANTS)
def test_causal_by_perturbation_at_every_position(tiny_args, name):
    model = spread_halting(make(tiny_args, **VARIANTS[name]))
    T = 20
    x = torch.randint(0, 50, (1, T))
    logits, _ = model(x, x)
    for j in range(T):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 50
        logits2, _ = model(y, y)
        torch.testing.assert_close(logits[:, :j], logits2[:, :j], msg=f"position {j} changed earlier logits")
        assert not torch.allclose(logits[:, j], logits2[:, j])


@pytest.mark.parametrize('name', VARIANTS)
def test_causal_by_gradient(tiny_args, name):
    model = spread_halting(make(tiny_args, **VARIANTS[name]))
    T = 20
    x = torch.randint(0, 50, (1, T))
    emb = model.transformer.wte(x).detach().requires_grad_(True)
    pos = model.transformer.wpe(torch.arange(T))
    out = model.transformer.ln_f(model.run_layers(emb + pos))  # (1, T, C)
    for t in range(T):
        grad, = torch.autograd.grad(out[0, t].sum(), emb, retain_graph=True)
        assert torch.all(grad[0, t + 1:] == 0), f"output {t} depends on a later token"
        assert grad[0, t].abs().max() > 0


def test_factor_one_equals_the_plain_stack(tiny_args):
    plain = make(tiny_args)
    hourglass = make(tiny_args, enable_hierarchical=True, hierarchy_factor=1, hierarchy_layers='1,2')
    hourglass.load_state_dict(plain.state_dict())  # same parameter names, none added at k = 1
    x = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(hourglass(x, x)[0], plain(x, x)[0])


def test_everything_off_equals_gpt(tiny_args):
    gpt = GPT(GPTConfig(**tiny_args)).eval()
    eff = EfficientGPT(EfficientGPTConfig(**tiny_args, hierarchy_layers='1', act_layers='all')).eval()
    eff.load_state_dict(gpt.state_dict())
    x = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(eff(x, x)[0], gpt(x, x)[0])


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('prompt_len', [1, 5, 7])  # with k = 3: the prompt ends inside a group and at its end
def test_decode_equals_full_sequence_forward(tiny_args, name, prompt_len):
    """Teacher-forced cached decode (a prompt prefill, then one token at a time) gives at every position
    the logits of one forward over the whole sequence; T = 31 is not a multiple of k."""
    model = spread_halting(make(tiny_args, **VARIANTS[name]))
    x = torch.randint(0, 50, (2, 31))
    full, _ = model(x, x)
    cache = model.new_cache(2)
    with torch.no_grad():
        prompt = x[:, :prompt_len].contiguous()
        steps = [model(prompt, prompt, cache=cache)[0]]  # targets: logits of every prompt position
        steps += [model(x[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, 31)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', VARIANTS)
def test_cached_generate_equals_reference_past_block_size(tiny_args, name):
    model = spread_halting(make(tiny_args, **VARIANTS[name]))
    idx = torch.tensor([[3], [7]])
    assert torch.equal(model.generate(idx, 70, temperature=0), model.generate(idx, 70, temperature=0, use_cache=False))


def test_shortened_layers_run_once_per_group(tiny_args):
    model = make(tiny_args, **HOURGLASS)
    calls = []
    model.transformer.h[1].register_forward_hook(lambda m, i, o: calls.append(o.size(1)))
    cache = model.new_cache(1)
    with torch.no_grad():
        for t in range(10):  # groups close at tokens 0, 3, 6, 9
            model(torch.tensor([[t]]), cache=cache)
    assert calls == [1, 1, 1, 1]
    assert cache[1].len == 4 and cache[0].len == 10


def test_one_ponder_step_equals_the_plain_block(tiny_args):
    model = make(tiny_args, **{**ACT, 'max_pondering_steps': 1})
    ponder = model.transformer.h[1]
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(ponder(x), ponder.block(x))
    assert torch.equal(ponder.steps, torch.ones(2, 16, dtype=torch.long))


def test_halting_weights_sum_to_one_and_cost_is_n_plus_r(tiny_args):
    model = spread_halting(make(tiny_args, **ACT))
    ponder = model.transformer.h[1]
    x = torch.randn(2, 16, 32)
    # a block that returns its input (its own residual branches removed) leaves every step's state at x,
    # so the output is (sum of the step weights) * x
    ponder.block.attn.c_proj.weight.data.zero_(), ponder.block.attn.c_proj.bias.data.zero_()
    ponder.block.mlp.c_proj.weight.data.zero_(), ponder.block.mlp.c_proj.bias.data.zero_()
    out = ponder(x)
    torch.testing.assert_close(out, x)
    steps = ponder.steps
    assert steps.min() >= 1 and steps.max() <= 3 and steps.unique().numel() > 1, steps
    cost = ponder.aux['ponder'][1]
    assert steps.float().mean() <= cost <= steps.float().mean() + 1


def test_training_stops_when_every_token_halted(tiny_args):
    model = make(tiny_args, **ACT)
    ponder = model.transformer.h[1]
    ponder.halt.bias.data.fill_(20.0)  # every token halts after its first step
    calls = []
    ponder.block.register_forward_hook(lambda m, i, o: calls.append(1))
    ponder(torch.randn(1, 8, 32))
    assert len(calls) == 1 and torch.equal(ponder.steps, torch.ones(1, 8, dtype=torch.long))


def test_act_decode_runs_fewer_steps_and_fills_skipped_caches(tiny_args):
    model = spread_halting(make(tiny_args, **ACT))
    cache = model.new_cache(1)
    x = torch.randint(0, 50, (1, 24))
    calls = []
    model.transformer.h[1].block.register_forward_hook(lambda m, i, o: calls.append(1))
    steps = []
    with torch.no_grad():
        for t in range(24):
            model(x[:, t:t + 1], cache=cache)
            steps.append(model.transformer.h[1].steps.item())
    assert len(calls) == sum(steps) < 3 * 24  # only the steps each token needed ran
    assert all(c.len == 24 for c in cache[1])  # every step's cache has every position


def test_ponder_aux_loss_reaches_the_training_loss(tiny_args):
    model = make(tiny_args, **ACT).train()
    x = torch.randint(0, 50, (2, 16))
    model(x, x)
    aux = model.aux_losses()
    assert set(aux) == {'ponder'} and aux['ponder'][0] == 0.01
    aux['ponder'][1].backward()
    assert model.transformer.h[1].halt.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('bad', [dict(enable_hierarchical=True, hierarchy_layers='2,3'),  # the last layer
                                 dict(enable_hierarchical=True, hierarchy_layers='0,2'),
                                 dict(enable_hierarchical=True),
                                 dict(hierarchy_factor=0), dict(max_pondering_steps=0), dict(act_epsilon=1.0)])
def test_bad_config_is_rejected(tiny_args, bad):
    with pytest.raises(ValueError):
        EfficientGPTConfig(**{**tiny_args, 'n_layer': 4, **bad})


def test_ddp_trains_hourglass_and_act(tmp_path, tiny_data):  # noqa: F811
    import sys
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    train(tmp_path / 'out', tiny_data, '--max_iters=3', '--eval_interval=3', '--gradient_accumulation_steps=2',
          '--model_type=efficient', '--n_layer=3', '--enable_hierarchical=True', '--hierarchy_layers=1',
          '--adaptive_compute=act', '--act_layers=1', launcher=launcher)


@pytest.mark.parametrize('name', ['act', 'hourglass'])
def test_teacher_forced_decode_loss_equals_forward_loss(tiny_args, name):
    """ACT's decode has the same semantics as its training forward (halted tokens give K/V from their
    final state in both), so the decode-consistent loss equals the fixed-window loss."""
    import numpy as np

    from evaluate import evaluate_loss, teacher_forced_decode_loss
    model = spread_halting(make(tiny_args, **VARIANTS[name]))
    data = np.random.default_rng(0).integers(0, 50, 200).astype(np.uint16)
    loss, n = teacher_forced_decode_loss(model, data, 32, batch_size=4)
    assert n == 6 * 32
    assert abs(loss - evaluate_loss(model, data, 32, batch_size=4)) < 1e-4


@pytest.mark.parametrize('name', VARIANTS)
def test_truncated_cache_continues_like_the_full_forward(tiny_args, name):
    """Roll the cache back to n (as speculative decoding does), then decode on: the logits are the full
    forward's, whether n falls inside a group or at its end."""
    model = spread_halting(make(tiny_args, **VARIANTS[name]))
    x = torch.randint(0, 50, (1, 20))
    full, _ = model(x, x)
    for n in (7, 9):
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.randint(0, 50, (1, 14)), cache=cache)  # positions n .. 13 are rolled back
            model.truncate_cache(cache, 0)
            model(x[:, :n].contiguous(), cache=cache)
            model(torch.randint(0, 50, (1, 3)), cache=cache)
            model.truncate_cache(cache, n)
            steps = [model(x[:, t:t + 1], cache=cache)[0] for t in range(n, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full[:, n:], atol=1e-5, rtol=1e-4)


def test_bench_rows_against_a_baseline(tmp_path, tiny_args):
    import json

    import numpy as np

    from checkpoint import model_checkpoint, save_checkpoint
    from test_sample_bench import run
    meta = {'tokenizer': 'char', 'vocab_size': 50, 'itos': [chr(65 + i) for i in range(50)]}
    for name, model in (('base', GPT(GPTConfig(**{**tiny_args, 'n_layer': 4}))),
                        ('eff', make(tiny_args, **VARIANTS['both']))):
        save_checkpoint({**model_checkpoint(model, meta), 'iter_num': 0}, str(tmp_path / name / 'ckpt.pt'))
    (np.arange(200) % 50).astype(np.uint16).tofile(tmp_path / 'val.bin')
    r = run('bench.py', f'--ckpt={tmp_path / "eff" / "ckpt.pt"}', f'--baseline={tmp_path / "base" / "ckpt.pt"}',
            '--rows=against_baseline,hourglass,pondering', '--new_tokens=20', '--runs=1', '--batch=2',
            '--train_batch=2', '--device=cpu', f'--val_data={tmp_path}', '--val_windows=3', '--json=b.json',
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / 'b.json').read_text())['rows']
    assert rows['against_baseline']['train_speedup']['median'] > 0
    assert rows['hourglass']['shortened_runs_per_token'] == 7 / 20  # groups close at tokens 0, 3, .., 18
    assert 0 < rows['hourglass']['executed_flops_per_token'] != rows['hourglass']['dense_flops_per_token']
    act = rows['pondering']
    assert act['tokens_scored'] == 3 * 32 and abs(act['decode_consistent_val_loss'] - act['forward_val_loss']) < 1e-4
    assert abs(sum(act['ponder_steps_fractions']) - 1) < 1e-3 and 1 <= act['mean_ponder_steps'] <= 3
    assert 'hard_tokens_mean_steps' in act and act['same_max_compute_layers'] == 4 + 2 * 2


@pytest.mark.parametrize('k', [2, 3])
def test_hourglass_with_rope_and_local_layers_streams_past_block_size(tiny_args, k):
    """Every layer local with rotary positions, the shortened ones too: generation continues past block_size
    with no re-prefill, the state moves its last groups to the front as it fills, and every step's logits
    equal the uncached forward over the whole context."""
    model = make(tiny_args, enable_hierarchical=True, hierarchy_factor=k, hierarchy_layers='1,2',
                 pos_emb='rope', enable_local_attention=True, local_attention_window=5)
    assert model.streams
    idx = torch.randint(0, 50, (2, 4))
    cache = model.new_cache(2)
    capacity = cache[-1].x.size(1)  # block_size 32, rounded up to whole groups
    with torch.no_grad():
        for _ in range(80):  # past block_size: the state shifts several times
            fast = model.next_logits(idx, cache)
            torch.testing.assert_close(fast, model.next_logits(idx), atol=1e-5, rtol=1e-4)
            idx = torch.cat([idx, fast.argmax(-1, keepdim=True)], dim=1)
    state = cache[-1]
    assert state.offset > 0 and state.x.size(1) == capacity and state.len == idx.size(1) - 1
    assert state.nbytes <= 2 * (capacity + k) * 2 * 32 * 4  # flat: at most the buffers, whatever the length


def test_hourglass_state_truncates_exactly_within_what_it_holds(tiny_args):
    model = make(tiny_args, **HOURGLASS)
    x = torch.randint(0, 50, (1, 30))
    cache = model.new_cache(1, rollback=4)
    with torch.no_grad():
        model(x[:, :20], cache=cache)
        model.truncate_cache(cache, 16)  # back into an open group: positions 15 .. 19 are held
        steps = [model(x[:, t:t + 1], cache=cache)[0] for t in range(16, 30)]
        full, _ = model(x, x)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 16:], atol=1e-5, rtol=1e-4)
