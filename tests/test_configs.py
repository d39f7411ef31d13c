"""Every file in config/ runs alone: resolved by the strict configurator on train_efficient.py's defaults, it
builds its model and trains two iterations (of two sequences: the batch size is not the file's to prove)."""

import glob
import os
import subprocess
import sys

import pytest

from checkpoint import is_pretrained
from configurator import load_config_file
from conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))
FAST = ['--max_iters=2', '--batch_size=2', '--eval_iters=1', '--final_eval_windows=1', '--device=cpu', '--compile=False',
        '--progress=False']


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_runs_alone(path, tmp_path):
    extra = ['--iters_per_task=1'] if 'incremental' in os.path.basename(path) else []  # stages set max_iters
    if is_pretrained(load_config_file(path).get('init_from', '')):  # no hub here: a tiny GPT-2 stands in
        transformers = pytest.importorskip('transformers')
        gpt2 = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, bos_token_id=None, eos_token_id=None)
        transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / 'gpt2')
        extra += [f'--init_from=hf:{tmp_path / "gpt2"}', '--gradient_accumulation_steps=1']
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_efficient.py'), path, *FAST, *extra,
                        f'--out_dir={tmp_path / "out"}'], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert os.path.isfile(tmp_path / 'out' / 'ckpt.pt')


def test_recipe_files_say_so_on_their_first_line():
    """A file that sets only mechanism keys names itself a recipe, one that sets only the data a dataset; every other
    file sets a size (or starts from GPT-2)."""
    for path in CONFIGS:
        with open(path) as f:
            text = f.read()
        sets_size = 'n_layer' in text or 'include(' in text or 'init_from' in text  # or GPT-2's own size
        assert sets_size or text.startswith(('# Recipe', '# Dataset')), path
