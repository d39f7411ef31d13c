"""
Turn your own text into a dataset folder for training:
    python data/prepare_text.py --out data/mycorpus --input a.txt b.txt --tokenizer char
    python data/prepare_text.py --out data/stories --hf_dataset roneneldan/TinyStories --tokenizer gpt2
Writes train.bin and val.bin (np.uint16 token ids), meta.json (the tokenizer) and source.json (the
arguments used) into --out. Texts are joined in order, with a newline between two texts unless the first
already ends with one; the last val_fraction of the characters is the val split. The text is held in memory.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')) # the repo root, for tokenizer.py
from tokenizer import char_meta, load_tokenizer

def fail(message):
    # common.fail's convention (one error line, exit status 2), without importing torch for it
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def read_files(paths):
    texts = []
    for path in paths:
        if not os.path.isfile(path):
            fail(f"input file not found: {path}")
        try:
            with open(path, encoding='utf-8') as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            fail(f"{path} is not UTF-8 text ({e})")
    return texts

def read_hf_dataset(name, config, split, field):
    try:
        import datasets # imported here: only this path needs it, and it is an optional dependency
    except ImportError:
        fail("--hf_dataset needs the Hugging Face datasets package: pip install 'efficientgpt[data]' "
             "(or pip install datasets)")
    from tqdm import tqdm
    ds = datasets.load_dataset(name, config, split=split)
    if field not in ds.column_names:
        fail(f"{name} has no field {field!r}; its fields are {ds.column_names} (choose one with --hf_text_field)")
    return [row[field] for row in tqdm(ds, desc=f"reading {name} [{split}]")]

def join_texts(texts):
    # so that the end of one file (or document) never runs into the first word of the next
    parts = []
    for i, text in enumerate(texts):
        if i > 0 and not texts[i - 1].endswith('\n'):
            parts.append('\n')
        parts.append(text)
    return ''.join(parts)

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help="the dataset folder to write, e.g. data/mycorpus (made if missing)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--input', nargs='+', metavar='FILE', help="UTF-8 text file(s), joined in the order given")
    source.add_argument('--hf_dataset', metavar='NAME', help="a Hugging Face dataset, e.g. roneneldan/TinyStories "
                        "(needs pip install datasets, and network or a local Hugging Face cache)")
    parser.add_argument('--hf_config', default=None, help="the dataset's configuration, if it has several (e.g. wikitext-2-raw-v1)")
    parser.add_argument('--hf_split', default='train', help="the split of the dataset to read (default: train)")
    parser.add_argument('--hf_text_field', default='text', help="the field that holds the text (default: text)")
    parser.add_argument('--tokenizer', choices=['char', 'gpt2'], default='char',
                        help="char: one token per character, the vocabulary is the characters of the text; "
                             "gpt2: GPT-2 BPE, 50257 tokens (default: char)")
    parser.add_argument('--val_fraction', type=float, default=0.1, help="the fraction of the text, from its end, for val (default: 0.1)")
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1, not {args.val_fraction}")

    if args.input:
        text = join_texts(read_files(args.input))
    else:
        text = join_texts(read_hf_dataset(args.hf_dataset, args.hf_config, args.hf_split, args.hf_text_field))
    if not text:
        fail("the text is empty")
    n = len(text)
    cut = int(n * (1 - args.val_fraction))
    if cut == 0 or cut == n:
        fail(f"the text ({n:,} characters) is too short to split with --val_fraction {args.val_fraction}")
    print(f"length of dataset in characters: {n:,}")

    if args.tokenizer == 'char':
        meta = char_meta(text)
        if meta['vocab_size'] > 2**16:
            fail(f"the text has {meta['vocab_size']:,} distinct characters, more than the 65,536 ids "
                 f"np.uint16 can hold; use --tokenizer gpt2")
    else:
        meta = {'vocab_size': 50257, 'tokenizer': 'gpt2'}
    print(f"vocab size: {meta['vocab_size']:,}")
    tok = load_tokenizer(meta)
    train_ids = tok.encode(text[:cut])
    val_ids = tok.encode(text[cut:])
    for split, ids in (('train', train_ids), ('val', val_ids)):
        print(f"{split} has {len(ids):,} token{'s' * (len(ids) != 1)}")
    # a training window of block_size tokens reads block_size + 1 (its targets are shifted by one)
    longest = min(len(train_ids), len(val_ids)) - 1
    if longest < 1:
        fail(f"the text is too short to train on: train has {len(train_ids):,} tokens and val {len(val_ids):,}, and each "
             f"split needs at least block_size + 1 (2 for block_size=1); use more text")
    print(f"largest block_size these splits allow: {longest:,}")

    os.makedirs(args.out, exist_ok=True)
    np.array(train_ids, dtype=np.uint16).tofile(os.path.join(args.out, 'train.bin'))
    np.array(val_ids, dtype=np.uint16).tofile(os.path.join(args.out, 'val.bin'))
    with open(os.path.join(args.out, 'meta.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False)
    # there is no prepare.py in the folder, so training never re-runs this; source.json says how to remake it
    with open(os.path.join(args.out, 'source.json'), 'w', encoding='utf-8') as f:
        json.dump(vars(args), f, indent=2, ensure_ascii=False)
    print(f"wrote train.bin, val.bin, meta.json and source.json to {args.out}")

if __name__ == '__main__':
    main()
