"""GPT-2 weights from transformers (init_from='gpt2' or 'hf:<folder>'), offline: a tiny GPT-2 made here,
saved with save_pretrained, loads into GPT and into EfficientGPT with the logits transformers computes."""

import os
import subprocess
import sys

import pytest
import torch

from checkpoint import CheckpointError, from_pretrained
from conftest import ROOT

transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """A GPT-2 of 2 layers with random weights, saved as transformers saves GPT-2: (folder, model)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp('gpt2')
    model.save_pretrained(folder)
    return str(folder), model


@pytest.mark.parametrize('model_type', ['gpt', 'efficient'])
def test_logits_equal_the_transformers_model(tiny_gpt2, model_type):
    folder, hf = tiny_gpt2
    model, meta = from_pretrained(f'hf:{folder}', model_type)
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        ours, _ = model.eval()(idx, idx)
        torch.testing.assert_close(ours, hf(idx).logits, atol=1e-4, rtol=1e-4)
    assert meta == {'tokenizer': 'gpt2', 'vocab_size': 50257}


def test_mechanism_parameters_keep_their_init_and_the_context_can_shrink(tiny_gpt2):
    folder, hf = tiny_gpt2
    model, _ = from_pretrained(f'hf:{folder}', 'efficient', enable_early_exit=True, block_size=32)
    assert model.config.block_size == 32 and any(k.startswith('exit_heads.') for k in model.state_dict())
    torch.testing.assert_close(model.transformer.h[1].mlp.c_fc.weight, hf.transformer.h[1].mlp.c_fc.weight.t())
    with pytest.raises(CheckpointError, match='longer than'):
        from_pretrained(f'hf:{folder}', block_size=128)
    with pytest.raises(CheckpointError, match='could not load'):
        from_pretrained(f'hf:{folder}/nothing-here')


def test_sample_prints_text_from_pretrained_weights(tiny_gpt2, tmp_path):
    folder, _ = tiny_gpt2
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--init_from=hf:{folder}', '--start=Hello',
                        '--num_samples=1', '--max_new_tokens=8', '--temperature=0'], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('Hello') and len(r.stdout) > len('Hello\n---------------\n')


def test_training_continues_from_pretrained_weights(tiny_gpt2, tmp_path):
    folder, _ = tiny_gpt2
    cmd = [sys.executable, os.path.join(ROOT, 'train_efficient.py'), f'--init_from=hf:{folder}', '--dataset=shakespeare',
           '--block_size=32', '--batch_size=2', '--max_iters=2', '--eval_iters=1', '--final_eval_windows=1',
           '--device=cpu', f'--out_dir={tmp_path / "out"}', '--model_type=efficient', '--enable_early_exit=True']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-1000:]
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['n_layer'] == 2 and ckpt['model_args']['block_size'] == 32
    assert ckpt['config']['block_size'] == 32 and ckpt['model_args']['mlp_act'] == 'gelu_tanh'
    r = subprocess.run(cmd[:-2] + ['--n_layer=3', '--overwrite=True'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "GPT-2's own" in r.stderr
