import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT
from tokenizer import char_meta, load_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--device=cpu',
        '--progress=False', '--eval_iters=2', '--log_interval=1', '--warmup_iters=2', '--lr_decay_iters=40']


@pytest.fixture
def tiny_data(tmp_path):
    """A char dataset folder made from a short text."""
    d = tmp_path / 'tiny'
    d.mkdir()
    meta = char_meta(TEXT)
    ids = np.array(load_tokenizer(meta).encode(TEXT), dtype=np.uint16)
    split = int(0.9 * len(ids))
    ids[:split].tofile(d / 'train.bin')
    ids[split:].tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps(meta))
    return d


def train(out_dir, data, *args, launcher=(sys.executable,), check=True, **kw):
    cmd = [*launcher, os.path.join(ROOT, 'train_efficient.py'), f'--dataset={data}', f'--out_dir={out_dir}', *TINY, *args]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_loss_falls(tmp_path, tiny_data):
    r = train(tmp_path / 'out', tiny_data, '--max_iters=40', '--eval_interval=20', '--final_eval_windows=-1')
    losses = [float(l.split('val loss ')[1].split(',')[0]) for l in r.stdout.splitlines() if l.startswith('step ')]
    assert losses[-1] < losses[0] - 0.5, r.stdout
    ckpt = load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))
    assert ckpt['iter_num'] == 40 and ckpt['config']['max_iters'] == 40 and 'final_val_loss' in ckpt


def test_resume_continues_exactly(tmp_path, tiny_data):
    common = ['--eval_interval=10', '--final_eval_windows=0', '--dropout=0.1']  # dropout: the RNG state must resume too
    train(tmp_path / 'straight', tiny_data, '--max_iters=20', *common)
    train(tmp_path / 'split', tiny_data, '--max_iters=10', *common)
    train(tmp_path / 'split', tiny_data, '--max_iters=20', '--init_from=resume', *common)
    a = load_checkpoint(str(tmp_path / 'straight' / 'ckpt.pt'))
    b = load_checkpoint(str(tmp_path / 'split' / 'ckpt.pt'))
    assert a['iter_num'] == b['iter_num'] == 20
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_efficient_model_type_trains(tmp_path, tiny_data):
    train(tmp_path / 'out', tiny_data, '--max_iters=4', '--eval_interval=2', '--model_type=efficient')
    assert load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))['model_type'] == 'efficient'


def test_unknown_key_is_an_error_with_suggestion(tmp_path, tiny_data):
    r = train(tmp_path / 'out', tiny_data, '--n_layr=3', check=False)
    assert r.returncode == 2 and 'n_layer' in r.stderr


def test_missing_data_is_a_clear_error(tmp_path):
    r = train(tmp_path / 'out', tmp_path / 'nothing_here', check=False)
    assert r.returncode == 2 and 'prepare_text.py' in r.stderr


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_data):
    out = tmp_path / 'out'
    train(out, tiny_data, '--max_iters=2', '--eval_interval=2', '--final_eval_windows=0')
    before = load_checkpoint(str(out / 'ckpt.pt'))
    r = train(out, tiny_data, '--init_from=resume', '--max_iters=50', '--learning_rate=1e12', '--grad_clip=0',
              '--decay_lr=False', '--eval_interval=1000', check=False)
    assert r.returncode == 1 and 'last good checkpoint' in r.stderr, r.stdout + r.stderr
    after = load_checkpoint(str(out / 'ckpt.pt'))
    assert after['iter_num'] == before['iter_num']


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': {'w': torch.ones(2)}, 'model_args': {}}, path)

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'model': {'w': torch.zeros(2)}, 'model_args': {}}, path)
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.ones(2))
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_ctrl_c_writes_checkpoint(tmp_path, tiny_data):
    cmd = [sys.executable, os.path.join(ROOT, 'train_efficient.py'), f'--dataset={tiny_data}',
           f'--out_dir={tmp_path}', *TINY, '--max_iters=100000', '--eval_interval=100000', '--final_eval_windows=0']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    for line in p.stdout:  # wait until training runs
        if line.startswith('step 0'):
            break
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert 'init_from=resume' in out
    assert load_checkpoint(str(tmp_path / 'ckpt.pt'))['iter_num'] >= 0


def test_ddp_on_cpu_with_gloo(tmp_path, tiny_data):
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    train(tmp_path / 'out', tiny_data, '--max_iters=3', '--eval_interval=3', '--gradient_accumulation_steps=2',
          launcher=launcher)
    assert load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))['iter_num'] == 3
