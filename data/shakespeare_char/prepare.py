"""
Prepare the Tiny Shakespeare dataset for character-level language modeling.
Maps characters to ints and writes train.bin and val.bin (np.uint16 token ids) and
meta.json (the vocabulary, which sample.py needs to encode and decode) next to this file.
Runs offline: input.txt ships with the repository.
"""
import json
import os
import sys

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, '..', '..')) # the repo root, for tokenizer.py
from tokenizer import char_meta, load_tokenizer

with open(os.path.join(here, 'input.txt'), encoding='utf-8') as f:
    data = f.read()
print(f"length of dataset in characters: {len(data):,}")

meta = char_meta(data)
print("all the unique characters:", ''.join(meta['itos']))
print(f"vocab size: {meta['vocab_size']:,}")
tok = load_tokenizer(meta)

# the first 90% of the text is train, the rest val
n = len(data)
train_ids = tok.encode(data[:int(n*0.9)])
val_ids = tok.encode(data[int(n*0.9):])
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

np.array(train_ids, dtype=np.uint16).tofile(os.path.join(here, 'train.bin'))
np.array(val_ids, dtype=np.uint16).tofile(os.path.join(here, 'val.bin'))
with open(os.path.join(here, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, ensure_ascii=False)

# length of dataset in characters: 1,115,394
# all the unique characters:
#  !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz
# vocab size: 65
# train has 1,003,854 tokens
# val has 111,540 tokens
