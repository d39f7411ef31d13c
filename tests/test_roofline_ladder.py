"""The decode roofline's GEMV sweep reads what a decoded token reads, and the scaling ladder builds each
mechanism's model at every width from its recipe."""

import json
import os
import subprocess
import sys

import pytest

import bench_ladder
from bench_rows.roofline import gemv_sweeps, weight_matrices
from conftest import ROOT
from configurator import load_config_file
from model import GPT, Cost, GPTConfig, LayerNorm, module_cost


def test_gemv_sweep_reads_the_weights_a_decoded_token_reads(tiny_args):
    model = GPT(GPTConfig(**{**tiny_args, 'bias': False}))
    norms = sum((module_cost(m) for m in model.modules() if isinstance(m, LayerNorm)), Cost())
    _, read = gemv_sweeps(weight_matrices(model), sweeps=3)
    # the matrices plus the norms' vectors are the decode cost's bytes (the embedding row is a lookup)
    assert read / 3 + norms.weight_bytes == model.decode_cost(1).weight_bytes


@pytest.mark.parametrize('name', list(bench_ladder.MECHANISMS))
def test_ladder_builds_each_mechanism_at_every_width(name):
    cfg = dict(bench_ladder.DEFAULTS, n_layer=4)
    models = bench_ladder.rung(256, [name], cfg)
    dense, model = models['dense'], models[name]
    assert model.config.n_embd == dense.config.n_embd == 256 and model.config.n_head == 4
    recipe, changes = bench_ladder.MECHANISMS[name]
    settings = {**load_config_file(os.path.join(ROOT, 'config', recipe)), **changes}
    assert all(getattr(model.config, k) == v for k, v in settings.items() if hasattr(model.config, k))
    assert not model.training


def test_ladder_runs_and_reports(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench_ladder.py'), '--widths=64,128', '--mechanisms=topk,hourglass_k4',
                        '--n_layer=4', '--new_tokens=4', '--batch=2', '--runs=1', f'--json={tmp_path / "l.json"}'],
                       capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / 'l.json').read_text())
    assert list(results['rows']) == ['64', '128'] and list(results['rows']['64']) == ['1', '2']
    assert set(results['rows']['128']['2']) == {'dense', 'topk', 'hourglass_k4'}
    assert results['rows']['64']['1']['dense']['ratio']['median'] == 1.0
    assert '| topk |' in r.stdout and 'pays from' in r.stdout


@pytest.mark.parametrize('args,message', [(['--mechanisms=topk,nope'], 'nope'), (['--widths=100'], 'multiples of 64'),
                                          (['--widths=a'], 'comma list')])
def test_ladder_bad_arguments(args, message):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench_ladder.py'), *args], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr
