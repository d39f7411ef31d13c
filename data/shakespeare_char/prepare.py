"""
Prepare the Tiny Shakespeare dataset for character-level language modeling.
Maps characters to ints and writes train.bin and val.bin (np.uint16 token ids) and
meta.json (the vocabulary, which sample.py needs to encode and decode) next to this file.
Runs offline: input.txt ships with the repository.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, '..', '..')) # the repo root, for tokenizer.py
from tokenizer import char_meta, write_split

with open(os.path.join(here, 'input.txt'), encoding='utf-8') as f:
    data = f.read()
print(f"length of dataset in characters: {len(data):,}")

meta = char_meta(data)
print("all the unique characters:", ''.join(meta['itos']))
print(f"vocab size: {meta['vocab_size']:,}")

# the first 90% of the text is train, the rest val
write_split(here, data, meta)

# length of dataset in characters: 1,115,394
# all the unique characters:
#  !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz
# vocab size: 65
# train has 1,003,854 tokens
# val has 111,540 tokens
