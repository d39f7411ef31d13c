import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from conftest import ROOT
from incremental_learning import (IncrementalLearner, ReplayBuffer, backward_transfer, estimate_fisher, ewc_penalty,
                                  forgetting)
from model import GPT, GPTConfig
from tokenizer import char_meta, load_tokenizer

# task A is lower case, task B upper case: a window's task shows in its letters
TEXTS = {'A': "the cat sat on the mat, and the dog lay by the door.\n" * 40,
         'B': "SHERLOCK HOLMES SAID THAT THE GAME WAS AFOOT.\n" * 40}
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--device=cpu',
        '--progress=False', '--eval_iters=2', '--log_interval=1', '--warmup_iters=2', '--lr_decay_iters=6',
        '--final_eval_windows=4']


@pytest.fixture
def tasks_dir(tmp_path):
    """A continual_char-like folder: A_train.bin, A_val.bin, B_... over one vocabulary, meta.json with tasks."""
    d = tmp_path / 'tasks'
    d.mkdir()
    meta = char_meta(''.join(TEXTS.values()))
    meta['tasks'] = {'A': 'lower', 'B': 'upper'}
    tok = load_tokenizer(meta)
    for task, text in TEXTS.items():
        ids = np.array(tok.encode(text), dtype=np.uint16)
        split = int(0.8 * len(ids))
        ids[:split].tofile(d / f'{task}_train.bin')
        ids[split:].tofile(d / f'{task}_val.bin')
    (d / 'meta.json').write_text(json.dumps(meta))
    return d


def settings(**kw):
    c = dict(incremental_tasks='A,B', iters_per_task=5, first_stage_iters=0, block_size=16, batch_size=12, seed=0, final_eval_windows=4,
             ewc_lambda=0.0, ewc_gamma=1.0, ewc_mode='online', importance='fisher', fisher_batches=0,
             replay_buffer_size=0, replay_ratio=0.0, replay_balance='windows', adaptive_lr_strength=0.0, protect_fraction=0.0, protect_scale=0.0,
             stage_lr_schedule='rewarm', stage_lr_peak=1.0, min_lr=1e-4)
    c.update(kw)
    return c


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size, dropout=0.0, bias=True))


def task_of(row, meta):
    text = ''.join(meta['itos'][i] for i in row.tolist())
    return 'B' if any(c.isupper() for c in text) else 'A'


def train_steps(tasks_dir, **kw):
    """train_efficient.py's loop in miniature: the parameters after every step."""
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    learner = IncrementalLearner(str(tasks_dir), meta, settings(**kw))
    model = tiny_model(meta['vocab_size'])
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    batches = torch.Generator().manual_seed(0)
    history = []
    for it in range(learner.max_iters):
        x, y = learner.train_batch(batches)
        _, loss = model(x, y)
        loss = loss + sum(w * v for w, v in learner.aux_losses(model).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with learner.scaled_update(model):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learner.after_step(model, it + 1)
        history.append([p.detach().clone() for p in model.parameters()])
    return history, learner


def test_neutral_settings_equal_naive_step_for_step(tasks_dir):
    naive, _ = train_steps(tasks_dir)
    # a Fisher, an EWC penalty of weight 0 and a filled replay buffer that is never sampled change nothing
    neutral, learner = train_steps(tasks_dir, fisher_batches=2, ewc_lambda=0.0, replay_buffer_size=32, replay_ratio=0.0)
    assert learner.importance is not None and learner.buffer.seen > 0
    for step, (a, b) in enumerate(zip(naive, neutral)):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), f"step {step + 1}"
    # and EWC with lambda > 0 does change training after the first task (the test can fail)
    ewc, _ = train_steps(tasks_dir, fisher_batches=2, ewc_lambda=1e4)
    assert all(torch.equal(p, q) for p, q in zip(naive[4], ewc[4]))
    assert not all(torch.equal(p, q) for p, q in zip(naive[-1], ewc[-1]))


def test_fisher_is_nonnegative_with_the_parameters_shapes():
    model = tiny_model(20)
    batches = [torch.randint(20, (3, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fisher = estimate_fisher(model, batches, torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    assert fisher.keys() == params.keys()
    for n, f in fisher.items():
        assert f.shape == params[n].shape and (f >= 0).all(), n
    assert sum(f.sum() for f in fisher.values()) > 0
    assert model.training and all(p.grad is None for p in model.parameters())  # no trace left on the model


def test_batched_fisher_estimate_is_unbiased():
    """One backward of the summed sampled log-likelihood estimates the per-token Fisher Σ_y p(y)·g_y² without
    bias: the mean of many estimates approaches the exact value (computed label by label)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5, dropout=0.0, bias=True))
    x = torch.tensor([[1, 3, 0]])
    params = [p for p in model.parameters()]
    logits = model(x, x)[0][0]  # (T, V)
    exact = [torch.zeros_like(p) for p in params]
    for t in range(x.size(1)):
        log_p = torch.log_softmax(logits[t], -1)
        for y in range(5):
            grads = torch.autograd.grad(log_p[y], params, retain_graph=True)
            for e, g in zip(exact, grads):
                e += log_p[y].exp().detach() * g ** 2 / x.size(1)  # per token
    estimate = estimate_fisher(model, [x] * 500, torch.Generator().manual_seed(1))
    est, ex = torch.cat([f.flatten() for f in estimate.values()]), torch.cat([e.flatten() for e in exact])
    # over 500 draws the total's relative error has a spread of about 1% (measured over seeds), so 5% is ~5
    # standard errors; dropping the cross terms wrongly, or using (mean gradient)², is off by a factor ~T = 3
    assert torch.allclose(est.sum(), ex.sum(), rtol=0.05)
    assert torch.nn.functional.cosine_similarity(est, ex, dim=0) > 0.99


def test_penalty_is_zero_at_anchor_and_its_gradient_is_2_lambda_F_delta():
    model = tiny_model(20)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    assert ewc_penalty(model, anchor, fisher).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    lam = 3.0
    (lam * ewc_penalty(model, anchor, fisher)).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * lam * fisher[n] * (p.detach() - anchor[n]), atol=1e-6), n


def test_per_task_ewc_with_one_earlier_task_is_online_ewc(tasks_dir):
    online, _ = train_steps(tasks_dir, fisher_batches=2, ewc_lambda=1e3)
    per_task, learner = train_steps(tasks_dir, fisher_batches=2, ewc_lambda=1e3, ewc_mode='per_task')
    assert len(learner.terms) == 1
    for step, (a, b) in enumerate(zip(online, per_task)):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), f"step {step + 1}"
    # with two earlier stages they differ: a penalty at each stage's anchor, not the summed F at the latest
    online, online_learner = train_steps(tasks_dir, incremental_tasks='A,B,A', fisher_batches=2, ewc_lambda=1e3)
    per_task, learner = train_steps(tasks_dir, incremental_tasks='A,B,A', fisher_batches=2, ewc_lambda=1e3, ewc_mode='per_task')
    assert len(learner.terms) == 2 and len(online_learner.terms) == 1
    assert all(torch.equal(p, q) for p, q in zip(online[9], per_task[9])) and not torch.equal(online[-1][0], per_task[-1][0])
    for n, f in learner.importance.items():  # the summed importance (for adaptive lr) is the same in both
        assert torch.allclose(f, online_learner.importance[n])


@pytest.mark.parametrize('importance', ['fisher', 'mas', 'si'])
def test_protected_fraction_receives_no_update(tasks_dir, importance):
    history, learner = train_steps(tasks_dir, importance=importance, fisher_batches=2, protect_fraction=0.2)
    f = torch.cat([v.flatten() for v in learner.importance.values()])
    top = torch.zeros_like(f, dtype=torch.bool)
    top[f.topk(int(0.2 * len(f) + 0.5))[1]] = True
    after_a, final = (torch.cat([p.flatten() for p in history[i]]) for i in (4, -1))
    assert torch.equal(final[top], after_a[top])  # frozen through stage B, weight decay included
    assert (final[~top] != after_a[~top]).float().mean() > 0.5  # the rest learned B
    assert (f >= 0).all() and f.sum() > 0


def test_protect_scale_damps_the_protected_updates(tasks_dir):
    history, learner = train_steps(tasks_dir, fisher_batches=2, protect_fraction=0.2, protect_scale=0.1)
    scale = torch.cat([s.flatten() for s in learner.update_scale.values()])
    assert sorted(set(scale.tolist())) == pytest.approx([0.1, 1.0]) and (scale < 1).float().mean() == pytest.approx(0.2, abs=1e-3)


def test_synaptic_intelligence_integrates_the_loss_decrease(tasks_dir):
    """ω −= g·Δθ over a path of small gradient steps sums, per parameter, to the decrease of that parameter's
    share of a separable loss Σ c_i (θ_i − 1)²; Ω = ω / (Δθ² + ξ) is zero where the loss does not depend on θ_i."""
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    learner = IncrementalLearner(str(tasks_dir), meta, settings(importance='si', ewc_lambda=1.0))
    model = torch.nn.Linear(4, 1, bias=False)
    c = torch.tensor([0.0, 0.5, 1.0, 2.0])
    with torch.no_grad():
        model.weight.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002)  # small steps: the sum's error is Σ c·Δθ², second order
    for _ in range(500):
        (c * (model.weight[0] - 1) ** 2).sum().backward()
        with learner.scaled_update(model):
            optimizer.step()
        optimizer.zero_grad()
    w = model.weight.detach()[0]
    decrease = c * (1 - (w - 1) ** 2)  # each term's loss at the start (θ = 0) minus at the end
    assert torch.allclose(learner.si_omega['weight'][0], decrease, rtol=0.01)
    omega = learner.si_importance(model)['weight'][0]
    assert omega[0] == 0 and (omega[1:] > 0).all() and learner.si_omega is None  # a new path starts


def test_later_stages_learning_rate(tasks_dir):
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    schedule = lambda it: 1e-3 * (it + 1)  # the stage's own schedule, as train_efficient.get_lr
    rewarm = IncrementalLearner(str(tasks_dir), meta, settings(stage_lr_peak=0.5))
    constant = IncrementalLearner(str(tasks_dir), meta, settings(stage_lr_schedule='constant'))
    for it in range(5):  # stage A: the schedule itself in both
        assert rewarm.lr(it, schedule) == constant.lr(it, schedule) == schedule(it)
    for it in range(5, 10):  # stage B: half the distance above min_lr, or min_lr
        assert rewarm.lr(it, schedule) == pytest.approx(1e-4 + 0.5 * (schedule(it - 5) - 1e-4))
        assert constant.lr(it, schedule) == 1e-4


def test_a_longer_first_stage_stretches_its_schedule(tasks_dir):
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    learner = IncrementalLearner(str(tasks_dir), meta, settings(first_stage_iters=10))
    schedule = lambda it: 1e-3 * (it + 1)
    assert learner.max_iters == 15 and learner.ends == [10, 15]
    assert [learner.lr(2 * k, schedule) for k in range(5)] == [schedule(k) for k in range(5)]  # twice as slow
    assert [learner.lr(10 + k, schedule) for k in range(5)] == pytest.approx([schedule(k) for k in range(5)])  # B: its own
    history, learner = train_steps(tasks_dir, first_stage_iters=10)
    assert len(history) == 15 and len(learner.R) == 2 and learner.stage == 1


def test_experiment_joint_run_has_the_sequences_total_steps():
    import incremental_experiment as exp
    extra = ['--iters_per_task=3', '--lr_decay_iters=3', '--first_stage_iters=12']
    cmd = exp.command(dict(incremental_tasks='A+B', stages=2), extra, 'out')
    assert '--iters_per_task=15' in cmd and '--lr_decay_iters=15' in cmd
    assert cmd.index('--first_stage_iters=0') > cmd.index('--first_stage_iters=12')  # the joint run's one stage


def test_reservoir_keeps_every_item_with_equal_probability():
    """Offer items 0..n-1 in order to a reservoir of size k, over many independent trials: each item must be
    kept in a fraction k/n = 0.2 of them. With 2000 trials the standard error of one item's frequency is
    sqrt(0.2·0.8/2000) = 0.0089; the 0.045 tolerance is 5 standard errors, which 50 items exceed by chance
    with probability < 1e-4 (the seeds are fixed anyway). First and last items are compared too: the
    classic bug, keeping the first k or always the newest, moves them far apart."""
    n, k, trials = 50, 10, 2000
    counts = torch.zeros(n)
    for trial in range(trials):
        buffer = ReplayBuffer(k, 1, seed=trial)
        buffer.add(torch.arange(n).view(n, 1), task=0)
        assert buffer.seen == n and len(set(buffer.windows.flatten().tolist())) == k
        counts[buffer.windows.flatten()] += 1
    freq = counts / trials
    assert (freq - k / n).abs().max() < 0.045, freq
    assert abs(freq[:k].mean() - freq[-k:].mean()) < 0.03


@pytest.mark.parametrize('balance, share_of_task_0', [('windows', 0.75), ('tasks', 0.5)])
def test_replay_draws_over_windows_or_gives_each_task_an_equal_share(balance, share_of_task_0):
    # the buffer holds 3 windows of task 0 for each of task 1; task 2 is being trained and is never replayed
    buffer = ReplayBuffer(100, 1, seed=0, balance=balance)
    buffer.add(torch.zeros(60, 1, dtype=torch.int64), task=0)
    buffer.add(torch.ones(20, 1, dtype=torch.int64), task=1)
    buffer.add(torch.full((20, 1), 2), task=2)
    drawn = buffer.sample(20000, [2], torch.Generator().manual_seed(0)).flatten()
    assert len(drawn) == 20000 and set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - share_of_task_0) < 0.015  # over 4 standard errors


def test_replay_state_round_trips():
    a = ReplayBuffer(4, 3, seed=0)
    a.add(torch.arange(30).view(10, 3), task=0)
    b = ReplayBuffer(4, 3, seed=99)
    b.load_state_dict(a.state_dict())
    more = torch.arange(30, 60).view(10, 3)
    a.add(more, task=1)
    b.add(more, task=1)
    assert torch.equal(a.windows, b.windows) and torch.equal(a.tasks, b.tasks) and a.seen == b.seen == 20


@pytest.mark.parametrize('ratio, expected', [(0.25, 3), (0.5, 6)])
def test_training_batch_holds_the_replay_fraction(tasks_dir, ratio, expected):
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    learner = IncrementalLearner(str(tasks_dir), meta, settings(replay_buffer_size=64, replay_ratio=ratio))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # stage A: nothing earlier to replay
        x, _ = learner.train_batch(g)
        assert [task_of(r, meta) for r in x] == ['A'] * 12
    learner.after_step(tiny_model(meta['vocab_size']), learner.iters_per_task)  # end of stage A
    for _ in range(5):
        x, y = learner.train_batch(g)
        assert x.shape == y.shape == (12, 16) and torch.equal(x[:, 1:], y[:, :-1])
        assert [task_of(r, meta) for r in x] == ['B'] * (12 - expected) + ['A'] * expected
        assert [task_of(r, meta) for r in learner.get_batch('val', g)[0]] == ['B'] * 12  # estimates: no replay
    assert set(learner.buffer.tasks.tolist()) == {0, 1}  # B's windows joined the buffer, for a task C


@pytest.mark.parametrize('ratio', [0.01, 0.125, 0.6])
def test_a_fractional_replay_share_is_exact_in_expectation(tasks_dir, ratio):
    """0.125 of 12 windows is 1.5: one or two replayed windows per batch, 1.5 on average; 0.01 is 0.12."""
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    learner = IncrementalLearner(str(tasks_dir), meta, settings(replay_buffer_size=64, replay_ratio=ratio))
    g = torch.Generator().manual_seed(0)
    assert learner.replay_count(g) == 0  # stage A: nothing earlier to replay, and no draw
    for _ in range(5):  # A's windows fill the buffer
        learner.train_batch(g)
    learner.after_step(tiny_model(meta['vocab_size']), learner.iters_per_task)
    counts = [int(sum(task_of(r, meta) == 'A' for r in learner.train_batch(g)[0])) for _ in range(800)]
    whole = int(ratio * 12)
    assert set(counts) == {whole, whole + 1}
    assert abs(sum(counts) / len(counts) - ratio * 12) < 0.05


def test_joint_stage_mixes_tasks_in_equal_shares(tasks_dir):
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    learner = IncrementalLearner(str(tasks_dir), meta, settings(incremental_tasks='A+B'))
    x, _ = learner.train_batch(torch.Generator().manual_seed(0))
    assert [task_of(r, meta) for r in x] == ['A'] * 6 + ['B'] * 6
    assert learner.max_iters == 5 and learner.tasks == ['A', 'B']


def test_settings_are_validated(tasks_dir):
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    for bad, message in [(dict(incremental_tasks='A,Z'), 'names Z'), (dict(replay_ratio=0.5), 'replay_buffer_size'),
                         (dict(replay_balance='task'), 'replay_balance'),
                         (dict(ewc_lambda=1.0), 'fisher_batches'), (dict(ewc_gamma=2.0), 'ewc_gamma')]:
        with pytest.raises(ValueError, match=message):
            IncrementalLearner(str(tasks_dir), meta, settings(**bad))


def test_forgetting_and_backward_transfer():
    R = [[1.0, 3.0, 4.0],
         [1.5, 1.2, 4.0],
         [1.4, 2.0, 1.1]]
    # A: final 1.4, best earlier 1.0 -> 0.4; B: final 2.0, best earlier 1.2 -> 0.8
    assert forgetting(R, [0, 1, 2]) == pytest.approx({0: 0.4, 1: 0.8})
    assert backward_transfer(R, [0, 1, 2]) == pytest.approx(-0.6)
    assert forgetting([[1.0, 1.2]], [0, 0]) == {} and backward_transfer([[1.0, 1.2]], [0, 0]) is None


# train_efficient.py runs


def train(out_dir, data, *args, check=True):
    cmd = [sys.executable, os.path.join(ROOT, 'train_efficient.py'), f'--dataset={data}', f'--out_dir={out_dir}', *TINY, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_resume_mid_sequence_equals_an_uninterrupted_run(tmp_path, tasks_dir):
    # every mechanism on, on the efficient model type (the in-process tests above use the baseline GPT);
    # dropout: the torch RNG must resume too
    common = ['--incremental_tasks=A,B,A', '--importance=si', '--ewc_mode=per_task', '--ewc_lambda=10',
              '--replay_buffer_size=32', '--replay_ratio=0.25', '--adaptive_lr_strength=1', '--protect_fraction=0.1',
              '--stage_lr_peak=0.5', '--dropout=0.1', '--model_type=efficient', '--iters_per_task=40',
              '--lr_decay_iters=40', '--eval_interval=1000']
    train(tmp_path / 'straight', tasks_dir, *common)
    # Ctrl-C a few steps into stage B: the checkpoint then holds A's importance, the buffer, SI's path and A's R row
    cmd = [sys.executable, os.path.join(ROOT, 'train_efficient.py'), f'--dataset={tasks_dir}',
           f'--out_dir={tmp_path / "split"}', *TINY, *common]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in p.stdout:
        if line.startswith('iter 42:'):
            break
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and 'init_from=resume' in out, out
    stopped = load_checkpoint(str(tmp_path / 'split' / 'ckpt.pt'))
    assert 42 <= stopped['iter_num'] < 80 and stopped['incremental']['stage'] == 1 and stopped['incremental']['si_omega'], stopped['iter_num']
    r = train(tmp_path / 'split', tasks_dir, *common, '--init_from=resume')
    assert 'forgetting A' in r.stdout and 'ewc' in r.stdout
    a = load_checkpoint(str(tmp_path / 'straight' / 'ckpt.pt'))
    b = load_checkpoint(str(tmp_path / 'split' / 'ckpt.pt'))
    assert a['iter_num'] == b['iter_num'] == 120
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['incremental']['R'] == b['incremental']['R'] and len(a['incremental']['R']) == 3
    assert torch.equal(a['incremental']['buffer']['windows'], b['incremental']['buffer']['windows'])


def test_a_character_outside_the_checkpoint_vocabulary_is_named(tmp_path, tasks_dir):
    meta = json.loads((tasks_dir / 'meta.json').read_text())
    model = tiny_model(meta['vocab_size'])
    save_checkpoint({**model_checkpoint(model, meta), 'iter_num': 2, 'best_val_loss': 9.0}, str(tmp_path / 'out' / 'ckpt.pt'))
    new = tmp_path / 'new'
    new.mkdir()
    text = TEXTS['A'] + "café\n"
    meta = char_meta(text)
    meta['tasks'] = {'A': 'lower'}
    ids = np.array(load_tokenizer(meta).encode(text), dtype=np.uint16)
    for split in ('train', 'val'):
        ids.tofile(new / f'A_{split}.bin')
    (new / 'meta.json').write_text(json.dumps(meta))
    r = train(tmp_path / 'out', new, '--incremental_tasks=A', '--iters_per_task=4', '--init_from=resume', check=False)
    assert r.returncode == 2 and "outside the checkpoint's vocabulary" in r.stderr and "'é'" in r.stderr, r.stderr


def test_experiment_headline_has_each_tasks_gap_to_joint(capsys):
    import incremental_experiment as exp
    stages = [('A',), ('B',), ('C',)]
    runs = exp.plan(['naive', 'ewc', 'joint'], stages, exp.SETTINGS, '')
    assert list(runs) == ['naive', 'ewc', 'joint A+B', 'joint']
    assert runs['joint A+B'][1] == dict(incremental_tasks='A+B', stages=2)
    results = {'naive': dict(R=[[1.0, 3.0, 4.0], [1.4, 1.2, 4.0], [1.5, 1.6, 1.0]], diagnostics=[], seconds=1.0),
               'ewc': dict(R=[[1.0, 3.0, 4.0], [1.1, 1.26, 4.0], [1.2, 1.3, 1.1]], diagnostics=[], seconds=None),
               'joint A+B': dict(R=[[1.05, 1.2]], diagnostics=[], seconds=2.0),
               'joint': dict(R=[[1.1, 1.25, 1.0]], diagnostics=[], seconds=3.0)}
    headline, details = exp.summarize(results, runs, stages)
    ab, abc = headline['A -> B'], headline['A -> B -> C']
    assert ab['ewc']['loss'] == {'A': 1.1, 'B': 1.26} and ab['ewc']['gap_to_joint'] == pytest.approx({'A': 1.1 / 1.05 - 1, 'B': 0.05})
    assert ab['naive']['forgetting'] == pytest.approx({'A': 0.4}) and ab['naive']['backward_transfer'] == pytest.approx(-0.4)
    assert abc['ewc']['gap_to_joint'] == pytest.approx({'A': 0.1 / 1.1, 'B': 0.05 / 1.25, 'C': 0.1})
    assert abc['ewc']['worst_gap'] == pytest.approx(0.1) and abc['joint']['worst_gap'] == 0.0
    assert abc['ewc']['forgetting'] == pytest.approx({'A': 0.2, 'B': 0.04})
    assert details['ewc']['forgetting_cut'] == pytest.approx({'A': 0.6, 'B': 0.9}) and details['ewc']['last_task_vs_naive'] == pytest.approx(0.1)
    exp.print_tables(results, runs, stages, headline, details)
    out = capsys.readouterr().out
    assert 'A -> B -> C' in out and '1.2000 ( +9.1%)' in out and 'closest to joint: ewc (worst gap +10.0%)' in out and 'cut A  60%' in out


def test_experiment_sweep_plans_a_run_per_value_of_the_methods_it_changes():
    import incremental_experiment as exp
    stages = [('A',), ('B',)]
    runs = exp.plan(['naive', 'replay', 'joint'], stages, exp.SETTINGS, 'replay_ratio=0.05,0.25')
    assert list(runs) == ['naive', 'replay replay_ratio=0.05', 'replay replay_ratio=0.25', 'joint']
    assert runs['replay replay_ratio=0.25'][1]['replay_ratio'] == 0.25
    runs = exp.plan(['naive', 'joint'], stages, exp.SETTINGS, 'stage_lr_peak=1,0.5')  # a train_efficient.py key
    assert list(runs) == ['naive stage_lr_peak=1', 'naive stage_lr_peak=0.5', 'joint']
    assert runs['naive stage_lr_peak=0.5'][1] == dict(incremental_tasks='A,B', stage_lr_peak='0.5')


def test_experiment_runs_in_parallel_as_in_sequence_and_reads_finished_runs_back(tmp_path, tasks_dir):
    def experiment(out_dir, *args):
        cmd = [sys.executable, os.path.join(ROOT, 'incremental_experiment.py'), '--tasks=A,B', '--methods=naive,ewc,joint',
               f'--out_dir={out_dir}', f'--json={out_dir / "r.json"}', *args,
               '--train_args=' + ' '.join([f'--dataset={tasks_dir}', *[a for a in TINY if a != '--progress=False'],
                                           '--iters_per_task=3', '--lr_decay_iters=3', '--eval_interval=1000'])]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout, json.loads((out_dir / 'r.json').read_text())

    out, figures = experiment(tmp_path / 'parallel', '--jobs=3', f'--plot={tmp_path / "r.png"}')
    assert 'A -> B' in out and ('plot written' in out or 'needs matplotlib' in out)
    runs = figures['runs']
    assert len(runs['naive']['R']) == 2 and len(runs['joint']['R']) == 1 and figures['jobs'] == 3
    assert 'iters_per_task=6' in runs['joint']['command']  # the same total steps as the sequence
    ewc = figures['headline']['A -> B']['ewc']
    assert set(ewc['gap_to_joint']) == {'A', 'B'} and ewc['worst_gap'] == max(ewc['gap_to_joint'].values())
    assert ewc['gap_to_joint']['B'] == pytest.approx(runs['ewc']['R'][1][1] / runs['joint']['R'][0][1] - 1)
    assert len(runs['ewc']['diagnostics']) == 1 and 'details, A -> B' in out
    # one at a time: the same numbers
    _, one_by_one = experiment(tmp_path / 'sequential', '--jobs=1')
    assert {k: v['R'] for k, v in one_by_one['runs'].items()} == {k: v['R'] for k, v in runs.items()}
    # again: nothing trained, the same figures read back
    again, figures_again = experiment(tmp_path / 'parallel', '--jobs=3')
    assert 'done in' not in again and figures_again['headline'] == figures['headline']


def test_incremental_keys_without_tasks_are_an_error(tmp_path, tasks_dir):
    r = train(tmp_path / 'out', tasks_dir, '--ewc_lambda=10', check=False)
    assert r.returncode == 2 and 'ewc_lambda: these keys need incremental_tasks' in r.stderr
