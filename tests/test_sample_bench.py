import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import ROWS
from bench_rows import MECHANISM_ROWS
from bench_rows.protocol import time_pair
from checkpoint import model_checkpoint, save_checkpoint
from model import GPT, GPTConfig
from sample import stream_text
from tokenizer import char_meta, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
SEP = '\n---------------\n'


def run(script, *args, cwd):
    # one thread, like the test process (conftest), so that both compute bit-identical logits
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def tiny(tmp_path, tiny_args):
    """A tiny char-level GPT saved as an EfficientGPT checkpoint: (model, tokenizer, checkpoint path)."""
    meta = char_meta(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**tiny_args, 'vocab_size': meta['vocab_size']})).eval()
    path = str(tmp_path / 'out' / 'ckpt.pt')
    save_checkpoint({**model_checkpoint(model, meta), 'iter_num': 0, 'best_val_loss': 9.9}, path)
    return model, load_tokenizer(meta), path


def continuation(model, tok, start, n, **kw):
    idx = torch.tensor([tok.encode(start)])
    return start + tok.decode(model.generate(idx, n, **kw)[0, idx.size(1):].tolist())


def test_sample_greedy_streams_what_generate_returns(tiny, tmp_path):
    model, tok, path = tiny
    # 5 + 40 tokens: the stream runs past block_size 32
    r = run('sample.py', f'--ckpt={path}', '--start=First', '--temperature=0', '--num_samples=2',
            '--max_new_tokens=40', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = continuation(model, tok, 'First', 40, temperature=0)
    assert r.stdout == (expected + SEP) * 2


def test_sample_seeded_long_prompt_from_file(tiny, tmp_path):
    model, tok, _ = tiny
    (tmp_path / 'prompt.txt').write_text(TEXT)  # longer than block_size: next_logits crops it
    r = run('sample.py', '--out_dir=out', '--start=FILE:prompt.txt', '--temperature=0.8', '--top_k=5',
            '--seed=7', '--num_samples=2', '--max_new_tokens=10', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    torch.manual_seed(7)
    expected = [continuation(model, tok, TEXT, 10, temperature=0.8, top_k=5) for _ in range(2)]
    assert r.stdout == ''.join(e + SEP for e in expected)


def test_sample_errors_are_one_line_with_exit_code_2(tiny, tmp_path):
    _, _, path = tiny
    r = run('sample.py', f'--ckpt={path}', '--start=Fé!x', cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ''
    assert "'é'" in r.stderr and "'x'" in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    for ckpt in ('missing.pt', 'junk.pt'):
        r = run('sample.py', f'--ckpt={ckpt}', cwd=tmp_path)
        assert r.returncode == 2 and ckpt in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sample_nanogpt_checkpoint(tmp_path):
    itos = sorted(set(TEXT))
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=len(itos), dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    # what nanoGPT's train.py writes: a torch.compile'd state dict and the dataset's name
    ckpt = {'model': {'_orig_mod.' + k: v for k, v in model.state_dict().items()}, 'model_args': args,
            'iter_num': 100, 'best_val_loss': torch.tensor(1.5), 'config': {'dataset': 'x'}}
    torch.save(ckpt, tmp_path / 'nano.pt')
    (tmp_path / 'data' / 'x').mkdir(parents=True)
    with open(tmp_path / 'data' / 'x' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(itos), 'itos': dict(enumerate(itos)),
                     'stoi': {c: i for i, c in enumerate(itos)}}, f)
    r = run('sample.py', '--ckpt=nano.pt', '--data_root=data', '--start=hear', '--temperature=0',
            '--num_samples=1', '--max_new_tokens=20', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(char_meta(TEXT))
    assert r.stdout == continuation(model, tok, 'hear', 20, temperature=0) + SEP


def test_stream_text_holds_back_partial_utf8():
    tok = load_tokenizer({'tokenizer': 'gpt2'})
    text = "naïve café 🙂 日本語 ok"
    ids = tok.encode(text)
    assert any('\ufffd' in tok.decode([i]) for i in ids)  # some character really spans tokens
    pieces = list(stream_text(tok, ids))
    assert ''.join(pieces) == text and not any('\ufffd' in p for p in pieces)


def test_time_pair_warms_up_then_alternates():
    calls = []
    a = lambda: calls.append('a') or 'A'
    b = lambda: calls.append('b') or 'B'
    out_a, out_b, t = time_pair(a, b, runs=3, work=10, sync=lambda: None)
    assert (out_a, out_b) == ('A', 'B') and calls == ['a', 'b'] * 4
    assert all(len(t[k]['runs']) == 3 and t[k]['min'] <= t[k]['median'] <= t[k]['max'] for k in ('a', 'b', 'ratio'))


def test_bench_tiny_random_model_json(tmp_path):
    (np.arange(200) % 11).astype(np.uint16).tofile(tmp_path / 'val.bin')
    r = run('bench.py', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--vocab_size=11',
            '--new_tokens=20', '--runs=1', '--batch=2', '--device=cpu', f'--val_data={tmp_path}',
            '--val_windows=2', '--json=bench.json', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / 'bench.json').read_text())
    for key in ('device', 'dtype', 'threads', 'torch', 'compile', 'params', 'block_size', 'new_tokens', 'batch'):
        assert key in report['setup'], key
    # every generic row, and no mechanism's row: they need a mechanism checkpoint or --baseline
    assert list(report['rows']) == [r for r in ROWS if r not in {f.__name__ for f in MECHANISM_ROWS}]
    for row in ('decode', 'decode_batch', 'past_block'):
        figures = report['rows'][row]
        assert figures['identical_tokens'] is True
        assert {'median', 'min', 'max'} <= figures['cached_tok_s'].keys() and 'ratio' in figures
    assert report['rows']['past_block']['new_tokens'] == 64
    assert report['rows']['compute']['kv_cache_positions'] == 20 and report['rows']['compute']['kv_cache_bytes'] > 0
    assert report['rows']['val_loss']['windows'] == 2
    roof = report['rows']['roofline']  # the share of the GEMV read speed that decode reaches, from the same bytes
    assert roof['weight_bytes_per_token'] == report['rows']['compute']['weight_bytes_per_token']
    assert roof['roofline_fraction'] == pytest.approx(roof['decode_tok_s'] / roof['roofline_tok_s'])
    assert report['rows']['memory']['peak_rss_bytes'] > 0
    profile = report['rows']['decode_profile']  # the time inside ops is part of the wall time of the same run
    assert 0 < profile['aten_us_per_token'] < profile['wall_us_per_token'] and profile['aten_ops_per_token'] > 20
    assert 'identical_tokens' in r.stdout and 'threads' in r.stdout


def test_bench_checkpoint_selected_rows(tiny, tmp_path):
    _, _, path = tiny
    r = run('bench.py', f'--ckpt={path}', '--rows=decode,compute', '--new_tokens=5', '--runs=1',
            '--device=cpu', '--json=b.json', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(json.loads((tmp_path / 'b.json').read_text())['rows']) == ['decode', 'compute']
    r = run('bench.py', '--rows=decode,nope', cwd=tmp_path)
    assert r.returncode == 2 and 'nope' in r.stderr


def test_sample_interactive_continues_each_prompt_until_end_of_input(tiny, tmp_path):
    model, tok, path = tiny
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(REPO / 'sample.py'), f'--ckpt={path}', '--interactive', '--temperature=0',
                        '--num_samples=1', '--max_new_tokens=12'], input='First\nhear\n', capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    for prompt in ('First', 'hear'):  # each typed prompt, then its continuation as it streamed
        assert continuation(model, tok, prompt, 12, temperature=0) + SEP in r.stdout
    assert r.stdout.count(SEP) == 2 and 'Ctrl-D' in r.stdout


def test_sample_rejects_values_torch_would_choke_on(tiny, tmp_path):
    _, _, path = tiny
    for arg in ('--temperature=-1', '--temperature=nan', '--temperature=1e-45', '--top_k=-3', '--num_samples=0'):
        r = run('sample.py', f'--ckpt={path}', arg, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith('error: ') and len(r.stderr.splitlines()) == 1, (arg, r.stderr)
