import importlib.util
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenizer import char_meta, ensure_prepared, gpt2_encoding, load_tokenizer, read_meta

REPO = Path(__file__).resolve().parents[1]
PREPARE_TEXT = REPO / 'data' / 'prepare_text.py'

def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd)

def read_ids(path):
    return np.fromfile(path, dtype=np.uint16).tolist()

# tokenizers

def test_char_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = load_tokenizer(char_meta(text))
    assert tok.vocab_size == len(set(text))
    assert tok.decode(tok.encode(text)) == text

def test_char_unknown_characters_are_named_not_remapped():
    tok = load_tokenizer(char_meta("abc"))
    with pytest.raises(ValueError, match=r"characters not in the vocabulary: 'é', '€' \(the model knows 3 characters\)"):
        tok.encode("abé€a€")

def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        load_tokenizer({'tokenizer': 'bpe'})

def test_gpt2_offline_without_cache_writes(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("the GPT-2 tokenizer tried to use the network")
    monkeypatch.setattr(socket, 'socket', no_network)
    cache = tmp_path / 'tiktoken_cache'
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(cache))
    gpt2_encoding.cache_clear() # build it here, under the patches
    tok = load_tokenizer({'vocab_size': 50257, 'tokenizer': 'gpt2'})
    assert tok.vocab_size == 50257
    assert tok.encode('hello world') == [31373, 995]
    text = "Ünïcode — “quotes”, <|endoftext|> as text,\n\n\tand 12345 digits."
    assert tok.decode(tok.encode(text)) == text
    assert not cache.exists() and os.environ['TIKTOKEN_CACHE_DIR'] == str(cache)

# prepare scripts

def test_shakespeare_char_prepare(tmp_path):
    # run a copy, laid out like the repo, so the repo's data folder is not touched
    shutil.copy(REPO / 'tokenizer.py', tmp_path)
    data_dir = tmp_path / 'data' / 'shakespeare_char'
    data_dir.mkdir(parents=True)
    for name in ('prepare.py', 'input.txt'):
        shutil.copy(REPO / 'data' / 'shakespeare_char' / name, data_dir)
    result = run_script(data_dir / 'prepare.py', cwd=tmp_path) # not from its own folder
    assert result.returncode == 0, result.stderr
    assert "train has 1,003,854 tokens" in result.stdout and "val has 111,540 tokens" in result.stdout
    train, val = read_ids(data_dir / 'train.bin'), read_ids(data_dir / 'val.bin')
    assert (len(train), len(val)) == (1003854, 111540)
    meta = read_meta(data_dir)
    assert meta['vocab_size'] == 65 and meta['tokenizer'] == 'char' and len(meta['itos']) == 65
    tok = load_tokenizer(meta)
    text = (data_dir / 'input.txt').read_text(encoding='utf-8')
    assert tok.decode(train + val) == text
    assert tok.decode(tok.encode(text)) == text

@pytest.mark.parametrize('tokenizer', ['char', 'gpt2'])
def test_prepare_text_round_trip(tmp_path, tokenizer):
    a = tmp_path / 'a.txt'
    a.write_text("A file that does not end with a newline", encoding='utf-8')
    b = tmp_path / 'b.txt'
    b.write_text("Ünïcode — “quotes” and\ttabs.\n" * 30, encoding='utf-8')
    out = tmp_path / 'corpus'
    result = run_script(PREPARE_TEXT, '--out', out, '--input', a, b, '--tokenizer', tokenizer, '--val_fraction', '0.2')
    assert result.returncode == 0, result.stderr
    meta = read_meta(out)
    assert meta['tokenizer'] == tokenizer
    tok = load_tokenizer(meta)
    train, val = read_ids(out / 'train.bin'), read_ids(out / 'val.bin')
    assert train and val
    expected = a.read_text(encoding='utf-8') + '\n' + b.read_text(encoding='utf-8') # a newline joins a to b
    assert tok.decode(train) + tok.decode(val) == expected
    source = json.loads((out / 'source.json').read_text(encoding='utf-8'))
    assert source['tokenizer'] == tokenizer and source['input'] == [str(a), str(b)] and source['val_fraction'] == 0.2
    assert not (out / 'prepare.py').exists() # so that training never tries to re-run it

def test_prepare_text_missing_input(tmp_path):
    result = run_script(PREPARE_TEXT, '--out', tmp_path / 'out', '--input', tmp_path / 'nope.txt')
    assert result.returncode != 0 and "input file not found" in result.stderr and "nope.txt" in result.stderr
    assert not (tmp_path / 'out').exists()

def test_prepare_text_empty_text(tmp_path):
    (tmp_path / 'empty.txt').write_text('')
    result = run_script(PREPARE_TEXT, '--out', tmp_path / 'out', '--input', tmp_path / 'empty.txt')
    assert result.returncode != 0 and "empty" in result.stderr

def test_prepare_text_char_vocab_too_big_for_uint16(tmp_path):
    chars = (chr(i) for i in range(32, 0x20000) if not 0xD800 <= i <= 0xDFFF) # no surrogates: they are not UTF-8
    (tmp_path / 'big.txt').write_text(''.join(c for _, c in zip(range(2**16 + 1), chars)), encoding='utf-8')
    result = run_script(PREPARE_TEXT, '--out', tmp_path / 'out', '--input', tmp_path / 'big.txt')
    assert result.returncode != 0 and "65,537 distinct characters" in result.stderr and "--tokenizer gpt2" in result.stderr

@pytest.mark.skipif(importlib.util.find_spec('datasets') is not None, reason="datasets is installed")
def test_prepare_text_hf_without_datasets_says_what_to_install(tmp_path):
    result = run_script(PREPARE_TEXT, '--out', tmp_path / 'out', '--hf_dataset', 'roneneldan/TinyStories')
    assert result.returncode != 0 and "pip install 'efficientgpt[data]'" in result.stderr

# read_meta

def test_read_meta_converts_nanogpt_meta_pkl(tmp_path):
    chars = sorted(set("hello world"))
    nanogpt_meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump(nanogpt_meta, f)
    meta = read_meta(tmp_path)
    assert meta == {'vocab_size': len(chars), 'itos': chars, 'tokenizer': 'char'}
    tok = load_tokenizer(meta)
    assert tok.decode(tok.encode("hello world")) == "hello world"

def test_read_meta_prefers_json_and_is_none_without_meta(tmp_path):
    assert read_meta(tmp_path) is None
    (tmp_path / 'meta.json').write_text(json.dumps({'vocab_size': 50257, 'tokenizer': 'gpt2'}))
    (tmp_path / 'meta.pkl').write_bytes(b'not a pickle')
    assert read_meta(tmp_path) == {'vocab_size': 50257, 'tokenizer': 'gpt2'}

class Marker:
    pass

class MakesDirWhenLoaded:
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (os.mkdir, (self.path,))

@pytest.mark.parametrize('payload', ['function', 'instance', 'reduce'])
def test_read_meta_pkl_refuses_classes_and_functions(tmp_path, payload):
    marker_dir = tmp_path / 'pwned'
    obj = {'function': os.system,
           'instance': {'vocab_size': 1, 'itos': {0: Marker()}},
           'reduce': MakesDirWhenLoaded(str(marker_dir))}[payload]
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump(obj, f)
    with pytest.raises(pickle.UnpicklingError, match="only plain dicts"):
        read_meta(tmp_path)
    assert not marker_dir.exists()

# ensure_prepared

FAKE_PREPARE = """
import os
here = os.path.dirname(os.path.abspath(__file__))
for name in ('train.bin', 'val.bin'):
    open(os.path.join(here, name), 'wb').write(bytes(4))
"""

def test_ensure_prepared_runs_prepare_when_bins_missing(tmp_path, capsys):
    data_dir = tmp_path / 'fake'
    data_dir.mkdir()
    (data_dir / 'prepare.py').write_text(FAKE_PREPARE)
    ensure_prepared(str(data_dir))
    assert (data_dir / 'train.bin').exists() and (data_dir / 'val.bin').exists()
    assert f"no train.bin in {data_dir}: running" in capsys.readouterr().out
    (data_dir / 'prepare.py').unlink()
    ensure_prepared(str(data_dir)) # all there: nothing to run
    assert capsys.readouterr().out == ''

def test_ensure_prepared_without_prepare_py_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no A_train.bin in .*data/prepare_text.py"):
        ensure_prepared(str(tmp_path), ('A_train.bin', 'A_val.bin'))

def test_ensure_prepared_prepare_that_writes_nothing(tmp_path):
    (tmp_path / 'prepare.py').write_text("print('oops')\n")
    with pytest.raises(FileNotFoundError, match="did not write train.bin, val.bin"):
        ensure_prepared(str(tmp_path))
