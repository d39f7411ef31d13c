"""Top-k sparse MLP and mixture-of-experts MLP: each fast path against its reference, the neutral settings
against the dense MLP, the router losses on hand-made routings, causality, and DDP with idle experts.
Run as a script under torchrun, this file is the DDP worker of test_moe_ddp_with_an_idle_expert."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import model_checkpoint, save_checkpoint
from conftest import ROOT
from efficient_modules import MoEMLP, TopKMLP, set_topk_gather
from model import GPT, GPTConfig, MLP
from model_efficient import EfficientGPT, EfficientGPTConfig, LayerPlan
from test_train import tiny_data, train  # noqa: F401 (tiny_data is a fixture)
from tokenizer import char_meta

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50, dropout=0.0, bias=True)


def cfg(**kw):
    return EfficientGPTConfig(**{**TINY, **kw})


def built(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(cfg(**kw))


def dense_like(module):
    """A dense MLP holding the same weights as a TopKMLP (or as expert 0 of a MoEMLP)."""
    mlp = MLP(cfg())
    mlp.load_state_dict((module.experts[0] if isinstance(module, MoEMLP) else module).state_dict())
    return mlp


def test_topk_with_every_unit_kept_equals_dense():
    sparse = built(TopKMLP, sparsity_ratio=1.0)
    dense = dense_like(sparse)
    x = torch.randn(2, 7, 32)
    for mode in (True, False):  # masked (training) and gathered (inference) paths
        sparse.train(mode)
        torch.testing.assert_close(sparse(x), dense(x))


def test_gathered_path_equals_masked_path():
    m = built(TopKMLP, bias=False).eval()
    m.c_fc.weight.data.normal_(std=0.3)  # a spread of activations: many of the top units differ by token
    x = torch.randn(3, 9, 32)
    torch.testing.assert_close(m.forward_gathered(x), m.forward_masked(x))
    # the masked path keeps exactly k units, the largest GELU outputs
    h = m.gelu(m.c_fc(x))
    vals, _ = m.top_units(x)
    assert m.k == round(0.1 * 128) and vals.shape[-1] == m.k
    torch.testing.assert_close(vals.sort(-1).values, h.topk(m.k, -1).values.sort(-1).values)
    # the gathered rows follow weight updates made after they were first built (optimizer steps, loading)
    m.forward_gathered(x)
    with torch.no_grad():
        m.c_proj.weight.mul_(-2.0)
    torch.testing.assert_close(m.forward_gathered(x), m.forward_masked(x))
    # set_topk_gather picks the path forward runs at inference; the cost follows it: k of the 128 rows read
    gathered = m.cost()
    set_topk_gather(m, False)
    assert m.cost().flops == 2 * 2 * 32 * 128 > gathered.flops == 2 * 32 * 128 + 2 * m.k * 32
    assert gathered.weight_bytes == 4 * (32 * 128 + m.k * 32) < m.cost().weight_bytes == 4 * 2 * 32 * 128


def test_topk_gradient_flows_through_kept_units_only():
    m = built(TopKMLP).train()
    x = torch.randn(1, 1, 32)
    m(x).sum().backward()
    _, idx = m.top_units(x)
    rows_with_grad = m.c_fc.weight.grad.abs().sum(1).nonzero().flatten()
    assert sorted(rows_with_grad.tolist()) == sorted(idx.flatten().tolist())


def test_dense_checkpoint_loads_into_topk_model():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**TINY)).eval()
    eff = EfficientGPT(cfg(enable_sparse_activation=True, sparsity_ratio=1.0)).eval()
    eff.load_state_dict(gpt.state_dict())
    x = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(eff(x, x)[0], gpt(x, x)[0])


def test_moe_with_one_expert_equals_dense():
    moe = built(MoEMLP, num_experts=1)
    dense = dense_like(moe)
    x = torch.randn(2, 7, 32)
    for mode in (True, False):
        moe.train(mode)
        torch.testing.assert_close(moe(x), dense(x))


def all_experts_reference(moe, x):
    """Every expert on every token, mixed by the router's weights (zero for the experts not chosen)."""
    B, T, C = x.shape
    x = x.reshape(B * T, C)
    _, _, weights, experts = moe.route(x)
    mix = torch.zeros(B * T, moe.num_experts).scatter(1, experts, weights)  # (N, E)
    return sum(mix[:, [e]] * expert(x) for e, expert in enumerate(moe.experts)).view(B, T, C)


@pytest.mark.parametrize('top_k', [1, 2])
@pytest.mark.parametrize('training', [True, False])
def test_moe_dispatch_equals_all_experts_reference(top_k, training):
    moe = built(MoEMLP, num_experts=4, experts_top_k=top_k).train(training)
    moe.router.weight.data.normal_(std=1.0)  # spread the tokens over the experts
    x = torch.randn(3, 11, 32)
    fast, slow = moe(x), all_experts_reference(moe, x)
    torch.testing.assert_close(fast, slow)
    assert sum(moe.expert_tokens) == 33 * top_k and sum(n > 0 for n in moe.expert_tokens) > 1
    assert sum(moe.expert_load()) == pytest.approx(1.0)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(moe.parameters()))
    slow_grads = torch.autograd.grad(slow.square().sum(), list(moe.parameters()))
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('top_k', [1, 2])
def test_moe_shared_choice_path_equals_reference(top_k):
    """At inference, when every token chose the same experts (batch-1 decode), they run without dispatch."""
    moe = built(MoEMLP, num_experts=4, experts_top_k=top_k).eval()
    moe.router.weight.data.normal_(std=1.0)
    for x in (torch.randn(1, 1, 32), torch.randn(1, 1, 32), torch.randn(4, 1, 32).abs()):
        if x.size(0) > 1:  # several tokens whose first choice is expert 2 (for top-1: one shared choice)
            moe.router.weight.data[2] = 1.0
        moe.reset_expert_load()
        torch.testing.assert_close(moe(x), all_experts_reference(moe, x))
        assert sum(moe.expert_tokens) == x.size(0) * top_k


def test_router_losses_on_hand_made_routings():
    moe = built(MoEMLP, num_experts=4)
    E = 4
    # uniform probabilities: P_i = 1/E, so E * sum_i f_i / E = 1 whatever the assignment; z = log(E)^2
    logits = torch.zeros(6, E)
    aux = moe.router_losses(logits, logits.softmax(-1), torch.zeros(6, 1, dtype=torch.long))
    assert aux['moe_balance'][1].item() == pytest.approx(1.0)
    assert aux['router_z'][1].item() == pytest.approx(math.log(E) ** 2)
    # two tokens, both routed to expert 0 with probabilities 0.7 and 0.5:
    # f = (1, 0, 0, 0), P_0 = 0.6, loss = 4 * 0.6 = 2.4
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]])
    aux = moe.router_losses(probs.log(), probs, torch.zeros(2, 1, dtype=torch.long))
    assert aux['moe_balance'][1].item() == pytest.approx(2.4)
    assert aux['router_z'][1].item() == pytest.approx(0.0, abs=1e-6)  # logsumexp of log-probs is 0
    # the forward stores them (with their weights) only while training
    moe.router.weight.data.zero_()
    moe.train()(torch.randn(1, 5, 32))
    (w_balance, balance), (w_z, z) = moe.aux['moe_balance'], moe.aux['router_z']
    assert (w_balance, w_z) == (0.01, 0.001) and balance.item() == pytest.approx(1.0)
    moe.eval()(torch.randn(1, 5, 32))
    assert moe.aux == {}


def test_config_validation_and_plan():
    plan = LayerPlan.from_config(cfg(n_layer=4, enable_sparse_activation=True, sparse_layers='0,1',
                                     enable_dynamic_routing=True, moe_layers='last:2'))
    assert plan.ffn == ('topk', 'topk', 'moe', 'moe')
    assert LayerPlan.from_config(cfg(sparse_layers='0', moe_layers='0')).ffn == ('dense', 'dense')
    bad = [dict(enable_sparse_activation=True, enable_dynamic_routing=True),  # both on every layer
           dict(sparsity_ratio=0.0), dict(sparsity_ratio=1.5), dict(num_experts=0), dict(experts_top_k=3),
           dict(num_experts=1, experts_top_k=2), dict(router_aux_loss_weight=-1.0), dict(moe_layers='7')]
    for kw in bad:
        with pytest.raises(ValueError):
            cfg(**kw)


def test_cost_counts_the_experts_that_run():
    C = 32
    assert MLP(cfg(bias=False)).cost().flops == 2 * 2 * C * 4 * C
    moe = built(MoEMLP, num_experts=4, experts_top_k=2, bias=False)
    assert moe.cost().flops == 2 * C * 4 + 2 * (2 * 2 * C * 4 * C)
    assert moe.cost().weight_bytes == 4 * (C * 4 + 2 * (2 * C * 4 * C))  # the router and two of the four experts


@pytest.mark.parametrize('kw', [
    dict(enable_sparse_activation=True),
    dict(enable_dynamic_routing=True, num_experts=4, experts_top_k=1),
    dict(enable_dynamic_routing=True, num_experts=4, experts_top_k=2, sparse_layers='0', moe_layers='1',
         enable_sparse_activation=True),
])
@pytest.mark.parametrize('training', [True, False])
def test_causality(kw, training):
    model = built(EfficientGPT, **kw).train(training)
    for m in model.modules():
        if isinstance(m, MoEMLP):
            m.router.weight.data.normal_(std=1.0)
    x = torch.randint(0, 50, (1, 20))
    j = 12
    # perturbation: changing token j leaves the logits before j unchanged
    y = x.clone()
    y[0, j] = (y[0, j] + 1) % 50
    a, b = model(x, x)[0], model(y, y)[0]
    torch.testing.assert_close(a[:, :j], b[:, :j])
    assert not torch.allclose(a[:, j:], b[:, j:])
    # gradient: the logits at position j - 1 depend on no input embedding after it
    seen = {}
    hook = model.transformer.drop.register_forward_hook(lambda m, i, out: seen.setdefault('x', out).retain_grad())
    model(x, x)[0][0, j - 1].sum().backward()
    hook.remove()
    g = seen['x'].grad[0].abs().sum(-1)  # (T,)
    assert torch.all(g[j:] == 0) and torch.all(g[:j] > 0)


def test_training_with_topk_and_moe_layers(tmp_path, tiny_data):
    r = train(tmp_path / 'out', tiny_data, '--max_iters=4', '--eval_interval=4', '--model_type=efficient',
              '--enable_sparse_activation=True', '--sparse_layers=0', '--enable_dynamic_routing=True',
              '--moe_layers=1', '--experts_top_k=2')
    assert 'moe_balance' in r.stdout and 'router_z' in r.stdout


def test_bench_rows_for_topk_and_moe(tmp_path):
    """bench.py's sparse rows on tiny checkpoints: both top-k paths decode the same tokens, the FLOPs counts
    follow the executed work, and MoE reports its expert load."""
    meta = char_meta(''.join(chr(65 + i) for i in range(50)))
    paths = {}
    for name, kw in [('base', {}), ('topk', dict(enable_sparse_activation=True)),
                     ('moe', dict(enable_dynamic_routing=True, experts_top_k=2))]:
        model = EfficientGPT(cfg(bias=False, **kw)) if kw else GPT(GPTConfig(**{**TINY, 'bias': False}))
        paths[name] = str(tmp_path / f'{name}.pt')
        save_checkpoint({**model_checkpoint(model, meta), 'iter_num': 0, 'best_val_loss': 9.9}, paths[name])
    (np.arange(200) % 50).astype(np.uint16).tofile(tmp_path / 'val.bin')
    rows = {}
    for name in ('topk', 'moe'):
        cmd = [sys.executable, os.path.join(ROOT, 'bench.py'), f'--ckpt={paths[name]}', f"--baseline={paths['base']}",
               '--rows=sparse_decode,sparse_compute,sparse_quality,mlp_micro', '--new_tokens=6', '--runs=1',
               '--batch=2', '--device=cpu', f'--val_data={tmp_path}', '--val_windows=2',
               f'--json={tmp_path}/{name}.json']
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        rows[name] = json.loads((tmp_path / f'{name}.json').read_text())['rows']
    topk, moe = rows['topk'], rows['moe']
    assert all(topk['sparse_decode'][f'b{B}_gathered_equals_masked_tokens'] for B in (1, 2))
    flops = topk['sparse_compute']
    assert flops['gathered_flops_per_token'] < flops['masked_flops_per_token'] == flops['baseline_flops_per_token']
    assert set(topk['mlp_micro']) >= {'d128_gathered_vs_dense', 'd384_gathered_vs_dense', 'd768_gathered_vs_dense'}
    flops = moe['sparse_compute']
    C, L, E = 32, 2, 4
    # top-2: two experts' MLPs and the router per layer, against the baseline's one MLP
    assert flops['executed_flops_per_token'] == flops['baseline_flops_per_token'] + L * (2 * 2 * C * 4 * C + 2 * C * E)
    assert len(moe['sparse_compute']['decode_expert_load_per_layer']) == L
    assert moe['sparse_quality']['windows'] == 2 and 'mlp_micro' not in moe


def ddp_worker():
    """Each rank routes its own tokens: rank 1's tokens avoid expert 3 entirely. Two steps must run (DDP
    raises at the next forward when a parameter got no gradient) and leave identical weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    moe = built(MoEMLP, seed=0, num_experts=4, experts_top_k=1)
    with torch.no_grad():
        moe.router.weight[3] = -1.0  # large logit for negative inputs, very small for positive ones
    model = DDP(moe)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x = torch.randn(2, 8, 32, generator=g).abs() * (1 if rank else -1)
        loss = model(x).square().mean() + sum(w * v for w, v in moe.aux.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (moe.expert_tokens[3] == 0) == (rank == 1), moe.expert_tokens
    flat = torch.cat([p.detach().flatten() for p in moe.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort in interpreter teardown under load (see the end of train_efficient.py)


def test_moe_ddp_with_an_idle_expert():
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', __file__]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


if __name__ == '__main__':
    ddp_worker()
