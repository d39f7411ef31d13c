"""
Tokenizers and dataset metadata, shared by the data prepare scripts, training and sampling.
A dataset folder holds train.bin / val.bin (np.uint16 token ids) and meta.json, which names the tokenizer:
- "char": one token per character; meta["itos"] lists the characters in id order.
- "gpt2": GPT-2 BPE through tiktoken, built offline from the files shipped in data/gpt2_bpe.
"""
import functools
import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np

GPT2_BPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'gpt2_bpe')
# sha256 of OpenAI's GPT-2 files, the same values tiktoken's own "gpt2" encoding checks
GPT2_BPE_SHA256 = {
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
}

class CharTokenizer:
    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    def encode(self, s):
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            # never remap silently: a prompt with unseen characters is a user error worth seeing
            shown = ', '.join(repr(c) for c in unknown[:20]) + (f' and {len(unknown) - 20} more' if len(unknown) > 20 else '')
            raise ValueError(f"characters not in the vocabulary: {shown} (the model knows {self.vocab_size} characters)")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return ''.join(self.itos[i] for i in ids)

class GPT2Tokenizer:
    def __init__(self):
        self.enc = gpt2_encoding()
        self.vocab_size = self.enc.n_vocab # 50257; the model may pad its embedding table beyond this

    def encode(self, s):
        # encode_ordinary: "<|endoftext|>" typed in a text is plain text, not the special token (as in nanoGPT's prepare.py)
        return self.enc.encode_ordinary(s)

    def decode(self, ids):
        return self.enc.decode(list(ids))

@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's "gpt2" encoding, built from data/gpt2_bpe so that it needs no network."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    paths = {name: os.path.join(GPT2_BPE_DIR, name) for name in GPT2_BPE_SHA256}
    for name, path in paths.items():
        # tiktoken skips its hash check when its cache is off (below), so check here: a truncated file would give wrong tokens
        if not os.path.exists(path):
            raise FileNotFoundError(f"GPT-2 BPE file missing: {path} (it ships with the repository, see data/gpt2_bpe/README.md)")
        with open(path, 'rb') as f:
            if hashlib.sha256(f.read()).hexdigest() != GPT2_BPE_SHA256[name]:
                raise ValueError(f"GPT-2 BPE file {path} does not match its sha256 (see data/gpt2_bpe/README.md)")
    # an empty TIKTOKEN_CACHE_DIR makes tiktoken read the local files as they are, without copying them into a cache dir
    old = os.environ.get('TIKTOKEN_CACHE_DIR')
    os.environ['TIKTOKEN_CACHE_DIR'] = ''
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=paths['vocab.bpe'], encoder_json_file=paths['encoder.json'])
    finally:
        if old is None:
            del os.environ['TIKTOKEN_CACHE_DIR']
        else:
            os.environ['TIKTOKEN_CACHE_DIR'] = old
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': 50256}, explicit_n_vocab=50257)

def load_tokenizer(meta):
    """The tokenizer a meta dict (from read_meta) describes: an object with encode, decode and vocab_size."""
    kind = meta.get('tokenizer')
    if kind == 'char':
        return CharTokenizer(meta['itos'])
    if kind == 'gpt2':
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {kind!r} in meta (expected 'char' or 'gpt2')")

def char_meta(text):
    """The meta dict of a char-level dataset whose vocabulary is every character in text."""
    itos = sorted(set(text))
    return {'vocab_size': len(itos), 'itos': itos, 'tokenizer': 'char'}

class _MetaUnpickler(pickle.Unpickler):
    # nanoGPT's meta.pkl holds only dicts, strs and ints, which unpickle without find_class; refusing every
    # class and function means a meta.pkl from elsewhere cannot run code (pickle.load of os.system etc.)
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain dicts, strings and ints are allowed")

def read_meta(data_dir):
    """meta.json of a dataset folder, else nanoGPT's meta.pkl converted to the same format; None if it has neither
    (nanoGPT's convention for that case is GPT-2 BPE; the caller decides)."""
    path = os.path.join(data_dir, 'meta.json')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(path):
        return None
    with open(path, 'rb') as f:
        meta = _MetaUnpickler(f).load()
    if not (isinstance(meta, dict) and isinstance(meta.get('itos'), dict) and 'vocab_size' in meta):
        raise ValueError(f"{path} is not a nanoGPT char-level meta.pkl (a dict with 'vocab_size', 'itos', 'stoi')")
    return {'vocab_size': meta['vocab_size'], 'itos': [meta['itos'][i] for i in range(meta['vocab_size'])], 'tokenizer': 'char'}

def vocabulary_difference(known, meta):
    """How the vocabulary of data (meta) differs from a checkpoint's (known), naming the characters the
    checkpoint has never seen: they have no embedding, so training on them is an error, never a remap."""
    if known.get('tokenizer') != meta.get('tokenizer'):
        return f"tokenizer {meta.get('tokenizer')!r}, the checkpoint's is {known.get('tokenizer')!r}"
    if known.get('itos') == meta.get('itos'):
        return "same tokens, different metadata"
    unseen = [c for c in meta.get('itos') or [] if c not in set(known.get('itos') or [])]
    if unseen:
        shown = ', '.join(repr(c) for c in unseen[:20]) + (f' and {len(unseen) - 20} more' if len(unseen) > 20 else '')
        return f"the corpus has characters outside the checkpoint's vocabulary of {len(known['itos'])}: {shown}"
    return "the same characters numbered differently"

def write_split(folder, text, meta, prefix='', train_fraction=0.9):
    """Tokenize text with meta's tokenizer, the first train_fraction of its characters into {prefix}train.bin
    and the rest into {prefix}val.bin (uint16 token ids, nanoGPT's split), and write meta.json beside them."""
    tok, n = load_tokenizer(meta), int(len(text) * train_fraction)
    for split, part in (('train', text[:n]), ('val', text[n:])):
        ids = tok.encode(part)
        print(f"{prefix}{split} has {len(ids):,} token{'s' * (len(ids) != 1)}")
        np.array(ids, dtype=np.uint16).tofile(os.path.join(folder, f'{prefix}{split}.bin'))
    with open(os.path.join(folder, 'meta.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False)


def ensure_prepared(data_dir, files=('train.bin', 'val.bin')):
    """Make sure data_dir holds files, running data_dir/prepare.py if one of them is missing."""
    missing = [f for f in files if not os.path.exists(os.path.join(data_dir, f))]
    if not missing:
        return
    script = os.path.join(data_dir, 'prepare.py')
    if not os.path.exists(script):
        raise FileNotFoundError(f"no {missing[0]} in {data_dir}, and no prepare.py there to make it. Tokenize your text with "
                                f"python data/prepare_text.py --out {data_dir} --input YOUR_TEXT.txt --tokenizer char")
    print(f"no {missing[0]} in {data_dir}: running {script}")
    subprocess.run([sys.executable, os.path.abspath(script)], cwd=data_dir, check=True)
    missing = [f for f in files if not os.path.exists(os.path.join(data_dir, f))]
    if missing:
        raise FileNotFoundError(f"{script} ran but did not write {', '.join(missing)}")
