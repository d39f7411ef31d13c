"""GPT-2 weights from transformers (init_from='gpt2' or 'hf:<folder>'), offline: a tiny GPT-2 made here,
saved with save_pretrained, loads into GPT and into EfficientGPT with the logits transformers computes.
A trained checkpoint's weights start a new run (init_from='ckpt:<path>'), e.g. a dense model gaining exit heads."""

import os
import subprocess
import sys

import pytest
import torch

from checkpoint import (CheckpointError, from_checkpoint_weights, from_pretrained, load_checkpoint, model_checkpoint,
                        save_checkpoint)
from conftest import ROOT
from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from test_train import tiny_data, train  # noqa: F401 (tiny_data is a fixture)
from tokenizer import char_meta


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """A GPT-2 of 2 layers with random weights, saved as transformers saves GPT-2: (folder, model)."""
    transformers = pytest.importorskip('transformers')
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


def test_a_dense_checkpoint_gains_exit_heads(tmp_path, tiny_args):
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**tiny_args)).eval()
    meta = char_meta(''.join(chr(65 + i) for i in range(50)))
    path = str(tmp_path / 'dense.pt')
    save_checkpoint({**model_checkpoint(dense, meta), 'iter_num': 0, 'best_val_loss': 9.9}, path)
    model, got_meta = from_checkpoint_weights(path, 'efficient', enable_early_exit=True, dropout=0.1)
    assert got_meta == meta and model.config.dropout == 0.1
    assert any(k.startswith('exit_heads.') for k in model.state_dict())  # new, at their own initialisation
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():  # the final layer computes what the dense model computes
        torch.testing.assert_close(model.eval()(idx, idx)[0], dense(idx, idx)[0])
    with pytest.raises(CheckpointError, match="n_layer 2 -> 3: the checkpoint's own"):
        from_checkpoint_weights(path, 'efficient', n_layer=3)
    with pytest.raises(CheckpointError, match="pos_emb 'learned' -> 'rope'"):
        from_checkpoint_weights(path, 'efficient', pos_emb='rope')
    efficient = str(tmp_path / 'efficient.pt')
    save_checkpoint(model_checkpoint(EfficientGPT(EfficientGPTConfig(**tiny_args)), meta), efficient)
    with pytest.raises(CheckpointError, match="model_type='efficient'"):
        from_checkpoint_weights(efficient, 'gpt')


def test_training_adds_exit_heads_to_a_dense_checkpoint(tmp_path, tiny_data):
    train(tmp_path / 'dense', tiny_data, '--max_iters=2')
    source = tmp_path / 'dense' / 'ckpt.pt'
    train(tmp_path / 'exits', tiny_data, f'--init_from=ckpt:{source}', '--model_type=efficient',
          '--enable_early_exit=True', '--max_iters=2')
    ckpt = load_checkpoint(str(tmp_path / 'exits' / 'ckpt.pt'))
    assert ckpt['model_args']['enable_early_exit'] and ckpt['iter_num'] == 2
    r = train(tmp_path / 'bad', tiny_data, f'--init_from=ckpt:{source}', '--n_embd=64', check=False)
    assert r.returncode == 2 and "n_embd 32 -> 64: the checkpoint's own" in r.stderr
    other = tmp_path / 'other.pt'  # the same sizes over another vocabulary
    save_checkpoint({**load_checkpoint(str(source)), 'meta': {**ckpt['meta'], 'itos': ckpt['meta']['itos'][::-1]}},
                    str(other))
    r = train(tmp_path / 'bad', tiny_data, f'--init_from=ckpt:{other}', check=False)
    assert r.returncode == 2 and 'never remapped' in r.stderr
