"""
Bad inputs and failures of training. A bad input is one `error:` line and exit status 2 before any work
starts; a failure during training (a loss that is not finite, a full disk) is one line and exit status 1;
no failure, not even a SIGKILL in the middle of a save, leaves a checkpoint that cannot be loaded or
resumed or whose numbers are not finite.

docs/BAD_INPUTS.md is the table of every bad input below with what it prints, from real runs; regenerate it
with `python tests/test_robustness.py` after changing a message (a test checks that it is current).
"""

import io
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from conftest import ROOT  # first: it puts the repository on sys.path (also when this file runs as a script)
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tokenizer import char_meta, load_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
TASKS = {'A': "the cat sat on the mat, and the dog lay by the door.\n" * 20,
         'B': "SHERLOCK HOLMES SAID THAT THE GAME WAS AFOOT.\n" * 20}
MODEL = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16']
TINY = [*MODEL, '--batch_size=4', '--device=cpu', '--eval_iters=2', '--log_interval=1', '--warmup_iters=2',
        '--lr_decay_iters=40', '--progress=False']
RUN = [*TINY, '--max_iters=2', '--eval_interval=2', '--final_eval_windows=0']  # the checkpoint of BAD_INPUTS' folder
EXPLODE = ['--learning_rate=1e12', '--grad_clip=0', '--decay_lr=False']  # the first step makes the weights non-finite
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
DOC = os.path.join(ROOT, 'docs', 'BAD_INPUTS.md')

# Bad inputs of train_efficient.py, run in a folder that holds `tiny` (a char dataset of 3,240 train and
# 324 val tokens), `run` (a checkpoint of `--dataset=tiny --out_dir=run` + MODEL trained 2 iterations),
# `junk/ckpt.pt` (random bytes) and an empty `empty`.
BAD_INPUTS = [
    '--dataset=tiny --eval_interval=0',
    '--dataset=tiny --log_interval=0',
    '--dataset=tiny --eval_iters=0',
    '--dataset=tiny --final_eval_windows=-2',
    '--dataset=tiny --max_iters=-5',
    '--dataset=tiny --gradient_accumulation_steps=0',
    '--dataset=tiny --batch_size=0',
    '--dataset=tiny --batch_size=-1',
    '--dataset=tiny --batch_size=1.5',
    '--dataset=tiny --learning_rate=-1',
    '--dataset=tiny --warmup_iters=100 --lr_decay_iters=100',
    '--dataset=tiny --beta2=1.0',
    '--dataset=tiny --grad_clip=-1',
    '--dataset=tiny --block_size=0',
    '--dataset=tiny --block_size=400',
    '--dataset=tiny --n_layer=0',
    '--dataset=tiny --n_head=3',
    '--dataset=tiny --dropout=1.0',
    '--dataset=tiny --model_type=bert',
    '--dataset=tiny --init_from=pretrained',
    '--dataset=tiny --device=tpu',
    '--dataset=tiny --device=cuda:99',
    '--dataset=tiny --dtype=float64',
    '--dataset=tiny --n_layr=3',
    '--dataset=tiny --enable_local_attention=True',
    '--dataset=tiny --model_type=efficient --enable_local_attention=True --global_layers=every:0',
    '--dataset=tiny --model_type=efficient --pos_emb=rope --n_embd=96 --n_head=32',
    '--dataset=tiny --model_type=efficient --enable_hierarchical=True --hierarchy_layers=3',
    '--dataset=tiny --ewc_lambda=1',
    '--dataset=tiny --incremental_tasks=A,B --iters_per_task=5',
    '--dataset=nothing_here',
    '--dataset=tiny --out_dir=run',
    '--dataset=tiny --out_dir=run --init_from=resume --n_layer=6 --n_embd=128 --n_head=4',
    '--dataset=tiny --out_dir=run --init_from=resume --block_size=32',
    '--dataset=tiny --out_dir=run --init_from=resume --model_type=efficient --bias=True',
    '--dataset=tiny --out_dir=run --init_from=resume --max_iters=1',
    '--dataset=tiny --out_dir=empty --init_from=resume',
    '--dataset=tiny --out_dir=junk --init_from=resume',
]
# each in a folder with the text file (a, b: the text to split)
PREPARE_INPUTS = [('two.txt', 'ab', '--out two --input two.txt'), ('none.txt', '', '--out none --input none.txt'),
                  ('ok.txt', TEXT, '--out half --input ok.txt --val_fraction=1.5')]

# train_efficient.py run in this process again and again (torch is imported once), for the bad inputs
RUN_IN_PROCESS = r'''
import contextlib, io, json, runpy, shlex, sys
sys.path.insert(0, sys.argv[1])
results = []
for args in json.loads(sys.argv[2]):
    sys.argv = ['train_efficient.py', *shlex.split(args)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv_script, run_name='__main__')
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue(), out.getvalue()])
print(json.dumps(results))
'''.replace('sys.argv_script', repr(os.path.join(ROOT, 'train_efficient.py')))


def write_dataset(d, texts=None):
    """A char dataset folder: train.bin, val.bin and meta.json from TEXT, or {task}_train.bin ... of texts."""
    os.makedirs(d, exist_ok=True)
    meta = char_meta(''.join((texts or {'': TEXT}).values()))
    if texts:
        meta['tasks'] = {t: t for t in texts}
    tok = load_tokenizer(meta)
    for name, text in (texts or {'': TEXT}).items():
        ids = np.array(tok.encode(text), dtype=np.uint16)
        split = int(0.9 * len(ids))
        prefix = f'{name}_' if name else ''
        ids[:split].tofile(os.path.join(d, f'{prefix}train.bin'))
        ids[split:].tofile(os.path.join(d, f'{prefix}val.bin'))
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump(meta, f)


def train(out_dir, data, *args, check=True, cwd=None):
    cmd = [sys.executable, os.path.join(ROOT, 'train_efficient.py'), f'--dataset={data}', f'--out_dir={out_dir}', *TINY, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=cwd)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def make_bad_input_folder(d):
    """The folder BAD_INPUTS run in (see above)."""
    write_dataset(os.path.join(d, 'tiny'))
    train('run', 'tiny', *RUN[len(TINY):], cwd=d)
    os.makedirs(os.path.join(d, 'junk'))
    with open(os.path.join(d, 'junk', 'ckpt.pt'), 'wb') as f:
        f.write(random.Random(0).randbytes(3000))
    os.makedirs(os.path.join(d, 'empty'))
    for name, text, _ in PREPARE_INPUTS:
        with open(os.path.join(d, name), 'w') as f:
            f.write(text)


def run_bad_inputs(d):
    """[(exit status, stderr)] of every entry of BAD_INPUTS, in folder d, in one process."""
    r = subprocess.run([sys.executable, '-c', RUN_IN_PROCESS, ROOT, json.dumps(BAD_INPUTS)], capture_output=True,
                       text=True, env=ENV, cwd=d, timeout=300)
    assert r.returncode == 0, r.stderr
    return [(code, err) for code, err, _ in json.loads(r.stdout.splitlines()[-1])]


def finite(ckpt):
    return all(torch.isfinite(t).all() for t in ckpt['model'].values()) and \
        all(np.isfinite(e['val_loss']) for e in ckpt['eval_history'])


@pytest.fixture(scope='module')
def bad_input_folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('bad_inputs'))
    make_bad_input_folder(d)
    return d


@pytest.fixture(scope='module')
def bad_input_results(bad_input_folder):
    """{args: (exit status, stderr)} of BAD_INPUTS."""
    return dict(zip(BAD_INPUTS, run_bad_inputs(bad_input_folder)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A dataset and a run trained 4 iterations, evaluated and written at 2 and 4: tests resume copies of it."""
    d = tmp_path_factory.mktemp('trained')
    write_dataset(str(d / 'tiny'))
    train(d / 'run', d / 'tiny', '--max_iters=4', '--eval_interval=2', '--final_eval_windows=0')
    return d


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained / 'run', tmp_path / 'run')
    return tmp_path / 'run'


@pytest.fixture(scope='module')
def resumed(trained, tmp_path_factory):
    """The trained run resumed to iteration 7 with eval_interval=2, dropout 0.1 and no other model key, with
    the default progress=True while its output goes to a pipe: (checkpoint, completed process)."""
    out = tmp_path_factory.mktemp('resumed') / 'run'
    shutil.copytree(trained / 'run', out)
    cmd = [sys.executable, os.path.join(ROOT, 'train_efficient.py'), f'--dataset={trained / "tiny"}', f'--out_dir={out}',
           '--init_from=resume', '--device=cpu', '--eval_iters=2', '--log_interval=1', '--batch_size=4', '--warmup_iters=2',
           '--lr_decay_iters=40', '--max_iters=7', '--eval_interval=2', '--final_eval_windows=0', '--dropout=0.1']
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return load_checkpoint(str(out / 'ckpt.pt')), r


# 1. a loss that is not finite stops the run and is never written


def test_nan_at_an_evaluation_keeps_the_last_good_checkpoint(run_copy, trained):
    r = train(run_copy, trained / 'tiny', '--init_from=resume', '--max_iters=50', '--eval_interval=1', *EXPLODE, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"The last good checkpoint is {run_copy / 'ckpt.pt'} (iteration 4)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    ckpt = load_checkpoint(str(run_copy / 'ckpt.pt'))
    assert ckpt['iter_num'] == 4 and finite(ckpt)


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path, trained):
    r = train(tmp_path / 'out', trained / 'tiny', '--max_iters=50', '--eval_interval=1', *EXPLODE, check=False)
    assert r.returncode == 1 and 'No good checkpoint was written' in r.stderr, r.stdout + r.stderr
    assert 'last good checkpoint' not in r.stderr and not (tmp_path / 'out' / 'ckpt.pt').exists()


def test_a_resumed_checkpoint_that_is_not_finite_is_refused(run_copy, trained):
    ckpt = load_checkpoint(str(run_copy / 'ckpt.pt'))
    ckpt['model']['lm_head.weight'][0, 0] = float('nan')  # as written by a version without the guard
    save_checkpoint(ckpt, str(run_copy / 'ckpt.pt'))
    r = train(run_copy, trained / 'tiny', '--init_from=resume', '--max_iters=6', check=False)
    assert r.returncode == 2 and 'not finite' in r.stderr and 'cannot be resumed' in r.stderr, r.stderr


# 2. a finished run always writes its final state


def test_a_finished_run_writes_its_checkpoint_without_any_evaluation_write(tmp_path, trained):
    r = train(tmp_path / 'out', trained / 'tiny', '--max_iters=3', '--eval_interval=1000', '--final_eval_windows=0')
    assert load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))['iter_num'] == 3
    # 9. progress=False in a log: a plain line every log_interval, not silence between evaluations
    assert [l.split(':')[0] for l in r.stdout.splitlines() if l.startswith('iter ')] == ['iter 1', 'iter 2', 'iter 3']


def test_a_run_resumed_to_an_iteration_between_evaluations_writes_it(resumed):
    ckpt, _ = resumed
    assert ckpt['iter_num'] == 7 and ckpt['config']['max_iters'] == 7


# 3. resume keeps the model; the stored config is what ran


def test_resume_takes_the_model_from_the_checkpoint_and_applies_dropout(resumed):
    ckpt, r = resumed
    # the run did not give n_layer etc.: the checkpoint's apply (and are what its config says), not the defaults
    assert ckpt['model_args']['n_layer'] == ckpt['config']['n_layer'] == 2
    assert ckpt['model_args']['n_embd'] == ckpt['config']['n_embd'] == 32 and ckpt['config']['block_size'] == 16
    assert "n_layer = 2" in r.stdout and "model keys from the checkpoint" in r.stdout
    assert ckpt['model_args']['dropout'] == ckpt['config']['dropout'] == 0.1 and 'dropout 0.0 -> 0.1' in r.stdout


def test_resume_refuses_a_changed_model_naming_each_key(bad_input_results, bad_input_folder):
    results = bad_input_results
    code, err = results['--dataset=tiny --out_dir=run --init_from=resume --n_layer=6 --n_embd=128 --n_head=4']
    assert code == 2 and 'n_layer 2 -> 6' in err and 'n_head 2 -> 4' in err and 'n_embd 32 -> 128' in err
    code, err = results['--dataset=tiny --out_dir=run --init_from=resume --block_size=32']
    assert code == 2 and 'block_size 16 -> 32' in err
    code, err = results['--dataset=tiny --out_dir=run --init_from=resume --model_type=efficient --bias=True']
    assert code == 2 and "model_type 'gpt' -> 'efficient'" in err and 'bias False -> True' in err
    assert load_checkpoint(os.path.join(bad_input_folder, 'run', 'ckpt.pt'))['iter_num'] == 2


# 4. a fresh run never replaces a checkpoint unless told to


def test_a_fresh_run_into_a_checkpoint_folder_stops_unless_overwrite(run_copy, trained):
    r = train(run_copy, trained / 'tiny', '--max_iters=1', check=False)
    assert r.returncode == 2 and '--init_from=resume' in r.stderr and '--overwrite=True' in r.stderr, r.stderr
    assert load_checkpoint(str(run_copy / 'ckpt.pt'))['iter_num'] == 4
    train(run_copy, trained / 'tiny', '--max_iters=1', '--overwrite=True', '--final_eval_windows=0')
    assert load_checkpoint(str(run_copy / 'ckpt.pt'))['iter_num'] == 1


# 5. and 6. every bad input: one error line, exit status 2, before any work


def test_every_bad_input_is_one_error_line_with_exit_status_2(bad_input_results, bad_input_folder):
    for args, (code, err) in bad_input_results.items():
        assert code == 2 and err.startswith('error: ') and len(err.strip().splitlines()) == 1, (args, code, err)
    assert not os.path.exists(os.path.join(bad_input_folder, 'out'))  # nothing started: no out_dir made


def test_a_model_config_error_in_a_real_run_is_one_line(tmp_path, trained):
    r = train(tmp_path / 'out', trained / 'tiny', '--model_type=efficient', '--enable_hierarchical=True',
              '--hierarchy_layers=1', check=False)  # the last of 2 layers: a ValueError of EfficientGPTConfig
    assert r.returncode == 2 and r.stderr.startswith('error: model config: hierarchy_layers') and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'out').exists()


def test_prepare_text_refuses_a_text_too_short_for_one_window(tmp_path):
    (tmp_path / 'two.txt').write_text('ab')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'prepare_text.py'), '--out', str(tmp_path / 'out'),
                        '--input', str(tmp_path / 'two.txt')], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and 'too short to train on' in r.stderr and not (tmp_path / 'out').exists(), r.stderr


def test_a_random_file_is_not_called_loadable_with_weights_only_false(tmp_path):
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(random.Random(1).randbytes(5000))
    torch.save({'model': io.BytesIO(b'x')}, tmp_path / 'object.pt')  # a pickle of an object a checkpoint never holds
    for p in (path, tmp_path / 'object.pt'):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(p))
        assert 'weights_only' not in str(e.value) and 'not a checkpoint this project wrote, nor a nanoGPT one' in str(e.value)
        assert len(str(e.value).splitlines()) == 1


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': {'w': torch.ones(2)}, 'model_args': {}}, path)
    os.symlink('/dev/full', path + '.tmp')  # every write to the temporary file fails with ENOSPC
    with pytest.raises(CheckpointError, match='the disk is full; the previous checkpoint there is intact'):
        save_checkpoint({'model': {'w': torch.zeros(2**20)}, 'model_args': {}}, path)
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.ones(2)) and os.listdir(tmp_path) == ['ckpt.pt']


def test_a_full_disk_stops_training_with_one_line(run_copy, trained):
    os.symlink('/dev/full', run_copy / 'ckpt.pt.tmp')
    r = train(run_copy, trained / 'tiny', '--init_from=resume', '--max_iters=8', '--eval_interval=1', check=False)
    assert r.returncode == 1 and 'the disk is full' in r.stderr and 'unexpected pos' not in r.stderr, r.stderr
    assert 'continue from iteration 4 with --init_from=resume' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert load_checkpoint(str(run_copy / 'ckpt.pt'))['iter_num'] == 4


# 7. final_eval_windows=0 ("skip") in incremental learning


def test_incremental_run_with_final_eval_windows_0_skips_the_r_matrix(tmp_path):
    write_dataset(str(tmp_path / 'tasks'), TASKS)
    r = train(tmp_path / 'out', tmp_path / 'tasks', '--incremental_tasks=A,B', '--iters_per_task=2', '--eval_interval=1000',
              '--final_eval_windows=0')
    assert 'no R matrix' in r.stdout
    ckpt = load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))
    assert ckpt['iter_num'] == 4 and ckpt['incremental']['R'] == []


# 8. eval_history: one entry per evaluated iteration, also across a resume


def test_resume_adds_no_duplicate_eval_history_entry(resumed):
    ckpt, _ = resumed
    assert [e['iter'] for e in ckpt['eval_history']] == [0, 2, 4, 6]


# 9. logs in a file: plain lines, no carriage returns


def test_output_to_a_pipe_has_plain_log_lines_and_no_progress_bar(resumed):
    _, r = resumed
    assert '\r' not in r.stdout + r.stderr
    assert [l.split(':')[0] for l in r.stdout.splitlines() if l.startswith('iter ')] == ['iter 5', 'iter 6', 'iter 7']
    assert re.search(r"^iter 5: loss \d+\.\d{4}, [\d,]+ tok/s, lr \d\.\de[-+]\d\d$", r.stdout, re.M), r.stdout


# 10. --help describes every key


def test_help_describes_every_training_and_gpt_key():
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_efficient.py'), '--help'], capture_output=True,
                       text=True, env=ENV, timeout=60)
    keys = dict(re.findall(r"^  --(\w+) +\S+(?: {2,}(\S.*))?$", r.stdout, re.M))
    undescribed = [k for k, text in keys.items() if not text]
    gpt_and_script = ['out_dir', 'log_interval', 'eval_only', 'overwrite', 'wandb_log', 'wandb_project', 'wandb_run_name',
                      'gradient_accumulation_steps', 'batch_size', 'model_type', 'learning_rate', 'max_iters',
                      'weight_decay', 'beta1', 'beta2', 'decay_lr', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'seed',
                      'block_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'bias']
    assert all(k in keys for k in gpt_and_script), r.stdout
    assert not [k for k in gpt_and_script if k in undescribed], undescribed


# fault injection: SIGKILL in the middle of saving


# saves the checkpoint again and again in a forked child (a later iteration each time) and kills the child at
# a random moment, `rounds` times; after each kill the checkpoint must load, be finite and never go back
KILL_WHILE_SAVING = r'''
import json, os, random, signal, sys, time
import torch
from checkpoint import load_checkpoint, save_checkpoint
torch.set_num_threads(1)
path, rounds = sys.argv[1], int(sys.argv[2])
ckpt = load_checkpoint(path)
start = time.perf_counter()
save_checkpoint(ckpt, path)
save_seconds = time.perf_counter() - start
rng, iters, mid_write, n = random.Random(0), [], 0, ckpt['iter_num']
for _ in range(rounds):
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                n += 1
                save_checkpoint({**ckpt, 'iter_num': n}, path)
        finally:
            os._exit(1)
    time.sleep(rng.uniform(0.2, 4) * save_seconds)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    mid_write += os.path.exists(path + '.tmp')
    loaded = load_checkpoint(path)
    assert all(torch.isfinite(t).all() for t in loaded['model'].values())
    n = loaded['iter_num']
    iters.append(n)
print(json.dumps(dict(iters=iters, mid_write=mid_write)))
'''


def test_sigkill_while_saving_always_leaves_a_checkpoint_that_resumes(run_copy, trained):
    path = str(run_copy / 'ckpt.pt')
    r = subprocess.run([sys.executable, '-c', KILL_WHILE_SAVING, path, '20'], capture_output=True, text=True,
                       env={**ENV, 'PYTHONPATH': ROOT}, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert len(result['iters']) == 20 and result['iters'] == sorted(result['iters']) and result['iters'][0] >= 4
    assert result['mid_write'] >= 1, result  # some kills did land in the middle of a write
    last = result['iters'][-1]
    r = train(run_copy, trained / 'tiny', '--init_from=resume', f'--max_iters={last + 2}', '--eval_interval=1000',
              '--final_eval_windows=0')
    assert f"iter {last + 1}: loss" in r.stdout, r.stdout
    ckpt = load_checkpoint(path)
    assert ckpt['iter_num'] == last + 2 and finite(ckpt)


# docs/BAD_INPUTS.md


def bad_input_rows(d):
    """[(command, message, exit status)] of BAD_INPUTS and PREPARE_INPUTS, each run as its own process in d."""
    rows = []
    for args in BAD_INPUTS:
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_efficient.py'), *shlex.split(args)],
                           capture_output=True, text=True, env=ENV, cwd=d, timeout=300)
        rows.append((f'python train_efficient.py {args}', r.stderr.strip(), r.returncode))
    for _, _, args in PREPARE_INPUTS:
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'prepare_text.py'), *shlex.split(args)],
                           capture_output=True, text=True, env=ENV, cwd=d, timeout=300)
        rows.append((f'python data/prepare_text.py {args}', r.stderr.strip().splitlines()[-1], r.returncode))
    return rows


def failure_rows(d):
    """[(command, message, exit status)] of failures during training, in the folder of BAD_INPUTS."""
    rows = []
    shutil.copytree(os.path.join(d, 'run'), os.path.join(d, 'full'))
    os.symlink('/dev/full', os.path.join(d, 'full', 'ckpt.pt.tmp'))
    shutil.copytree(os.path.join(d, 'run'), os.path.join(d, 'nan'))
    runs = [('--dataset=tiny --out_dir=nan --init_from=resume --eval_interval=1 ' + ' '.join(EXPLODE), ''),
            ('--dataset=tiny --out_dir=fresh --eval_interval=1 ' + ' '.join(EXPLODE), ''),
            ('--dataset=tiny --out_dir=full --init_from=resume --eval_interval=1', ' (on a full disk)')]
    for args, note in runs:
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_efficient.py'), *shlex.split(args)],
                           capture_output=True, text=True, env=ENV, cwd=d, timeout=300)
        rows.append((f'python train_efficient.py {args}', r.stderr.strip().splitlines()[-1], r.returncode, note))
    return rows


def cell(text):
    """A message as a table cell: '|' escaped, the repository's own path left out."""
    return text.replace(ROOT + os.sep, '').replace('|', '\\|')


def write_doc():
    with tempfile.TemporaryDirectory() as d:
        make_bad_input_folder(d)
        rows = bad_input_rows(d)
        failures = failure_rows(d)
    lines = [
        "# Bad inputs",
        "",
        "What each bad input prints, and its exit status, from real runs (regenerate this file with",
        "`python tests/test_robustness.py`; `tests/test_robustness.py` checks that it is current).",
        "",
        "A bad setting is one `error:` line on stderr and exit status 2, before any work starts: no out_dir is made",
        "and no model is built. The runs below are in a folder that holds `tiny`, a",
        "character dataset of 3,240 train and 324 val tokens; `run`, the checkpoint of",
        f"`python train_efficient.py --dataset=tiny --out_dir=run {' '.join(RUN)}`;",
        "`junk/ckpt.pt`, 3,000 random bytes; an empty folder `empty`; and the text files `two.txt` (`ab`),",
        "`none.txt` (empty) and `ok.txt`.",
        "",
        "| Command | Prints on stderr | Exit |",
        "|---|---|---|",
        *(f"| `{cmd}` | `{cell(msg)}` | {code} |" for cmd, msg, code in rows),
        "",
        "## Failures during training",
        "",
        "A failure once training runs is one `error:` line and exit status 1. No checkpoint whose weights, optimizer",
        "state or losses are not finite is ever written, and the message names the last good checkpoint (or says",
        "that there is none). A write that fails (a full disk) leaves the previous checkpoint as it was; so does a",
        "SIGKILL in the middle of a write (the checkpoint is written to `ckpt.pt.tmp`, flushed to disk, then",
        "renamed over `ckpt.pt`).",
        "",
        "| Command | Prints on stderr (last line) | Exit |",
        "|---|---|---|",
        *(f"| `{cmd}`{note} | `{cell(msg)}` | {code} |" for cmd, msg, code, note in failures),
        "",
    ]
    with open(DOC, 'w') as f:
        f.write('\n'.join(lines))


def test_bad_inputs_doc_is_current(bad_input_results):
    with open(DOC) as f:
        doc = f.read()
    for args, (code, err) in bad_input_results.items():
        assert f"| `python train_efficient.py {args}` | `{cell(err.strip())}` | {code} |" in doc, \
            f"docs/BAD_INPUTS.md is out of date (python tests/test_robustness.py): {args}: {err}"


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    write_doc()
    print(f"wrote {DOC}")
