"""TEAL, training-free activation sparsity on a dense model (efficient_modules.TEALMLP, teal_sparsify): the gathered
down-projection against its masked reference, calibration against held-out data, what converts and what is refused,
and the bench row and sample flag end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import efficient_modules
from checkpoint import model_checkpoint, save_checkpoint
from conftest import ROOT
from efficient_modules import (TEALMLP, TopKMLP, calibration_windows, set_teal_gather, teal_measured_sparsity,
                               teal_sparsify)
from model import GPT, MLP, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from tokenizer import char_meta

TINY = dict(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=50, dropout=0.0)


@pytest.mark.parametrize('bias', [True, False])
def test_gathered_path_equals_masked_path(bias):
    torch.manual_seed(0)
    m = TEALMLP(GPTConfig(**TINY, bias=bias), threshold=0.1, sparsity=0.5).eval()
    m.c_fc.weight.data.normal_(std=0.3)  # a spread of activations: each token keeps its own number of units
    x = torch.randn(3, 9, 32)
    if bias:
        m.c_fc.bias.data.zero_()
    x[1, 3] = 0  # a token that keeps no unit: an empty bag
    keep = m.gelu(m.c_fc(x)).abs() > m.threshold
    assert len(set(keep.sum(-1).flatten().tolist())) > 1 and keep[1, 3].sum() == 0
    gathered = m(x)
    m.use_gathered(False)
    torch.testing.assert_close(gathered, m(x))
    dense = MLP(GPTConfig(**TINY, bias=bias))
    dense.load_state_dict(m.state_dict())
    m.threshold = -1.0  # nothing dropped: the dense MLP
    torch.testing.assert_close(m(x), dense(x))


@pytest.mark.parametrize('sample', [None, 1000])
def test_calibration_hits_the_target_on_held_out_tokens(sample, monkeypatch):
    if sample:  # a large model's activations are sampled
        monkeypatch.setattr(efficient_modules, 'CALIBRATION_SAMPLE', sample)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    data = torch.randint(0, 50, (4000,)).numpy()
    for sparsity in (0.25, 0.5):
        sparse = GPT(GPTConfig(**TINY))
        sparse.load_state_dict(model.state_dict())
        thresholds = teal_sparsify(sparse, sparsity, calibration_windows(data[:2000], 32))
        assert len(thresholds) == 3 and all(isinstance(m, TEALMLP) for m in (b.mlp for b in sparse.transformer.h))
        held_out = calibration_windows(data[2000:], 32)
        assert teal_measured_sparsity(sparse, held_out) == pytest.approx([sparsity] * 3, abs=0.03)


def test_sparse_model_decodes_cached_as_its_reference_and_both_paths_agree():
    torch.manual_seed(0)
    model = EfficientGPT(EfficientGPTConfig(**TINY, enable_local_attention=True, local_attention_window=8))
    teal_sparsify(model.eval(), 0.5, torch.randint(0, 50, (4, 32)))
    prompt = torch.randint(0, 50, (2, 3))
    cached = model.generate(prompt, 20, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 20, temperature=0, use_cache=False))
    set_teal_gather(model, False)
    assert torch.equal(cached, model.generate(prompt, 20, temperature=0))
    # the cost counts the kept half of each down-projection when gathered
    masked = model.decode_cost(10).flops
    set_teal_gather(model, True)
    assert masked - model.decode_cost(10).flops == 3 * 0.5 * 2 * (4 * 32 * 32 + 32)  # c_proj: weight and bias


def test_only_dense_mlps_convert_and_bad_values_are_refused():
    torch.manual_seed(0)
    model = EfficientGPT(EfficientGPTConfig(**TINY, enable_sparse_activation=True, sparse_layers='0'))
    tokens = torch.randint(0, 50, (2, 32))
    assert len(teal_sparsify(model, 0.5, tokens)) == 2
    assert [type(b.mlp) for b in model.transformer.h] == [TopKMLP, TEALMLP, TEALMLP]
    topk = EfficientGPT(EfficientGPTConfig(**TINY, enable_sparse_activation=True))
    with pytest.raises(ValueError, match='needs dense MLPs'):
        teal_sparsify(topk, 0.5, tokens)
    for bad in (0, 1, 1.5, -0.2, True, '0.5'):
        with pytest.raises(ValueError, match=r'in \(0, 1\)'):
            teal_sparsify(GPT(GPTConfig(**TINY)), bad, tokens)


def run(script, *args):
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_bench_row_and_sample_flag(tmp_path):
    meta = char_meta(''.join(chr(65 + i) for i in range(50)))
    torch.manual_seed(0)
    path = str(tmp_path / 'dense.pt')
    save_checkpoint({**model_checkpoint(GPT(GPTConfig(**TINY)), meta), 'config': {'dataset': str(tmp_path)}}, path)
    for split in ('train', 'val'):
        (np.arange(400) * 7 % 50).astype(np.uint16).tofile(tmp_path / f'{split}.bin')
    (tmp_path / 'meta.json').write_text(json.dumps(meta))
    r = run('bench.py', f'--ckpt={path}', '--rows=teal', '--teal_sparsity=0.25,0.5', '--new_tokens=6', '--runs=1',
            '--batch=2', '--device=cpu', f'--val_data={tmp_path}', '--val_windows=2', f'--json={tmp_path}/b.json')
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / 'b.json').read_text())['rows']['teal']
    for level in (0.25, 0.5):
        out = row[f'sparsity {level}']
        assert out['b1_gathered_equals_masked_tokens'] and out['b2_gathered_equals_masked_tokens']
        assert len(out['thresholds']) == 3 and out['flops_per_token'] < row['dense_flops_per_token']
    r = run('bench.py', f'--ckpt={path}', '--rows=teal', '--teal_sparsity=0.5,x')
    assert r.returncode == 2 and '--teal_sparsity' in r.stderr
    r = run('sample.py', f'--ckpt={path}', '--teal_sparsity=0.5', '--start=AB', '--num_samples=1', '--max_new_tokens=5',
            '--temperature=0')
    assert r.returncode == 0 and r.stdout.startswith('AB'), r.stderr
    r = run('sample.py', f'--ckpt={path}', '--teal_sparsity=1.0')
    assert r.returncode == 2 and 'fraction of activations' in r.stderr
