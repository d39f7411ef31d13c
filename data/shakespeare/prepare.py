"""
Prepare the Tiny Shakespeare dataset with the GPT-2 BPE tokenizer (tiktoken).
Reads the text shipped in ../shakespeare_char/input.txt (one copy in the repo) and writes
train.bin and val.bin (np.uint16 token ids) and meta.json next to this file.
Runs offline: the GPT-2 BPE files ship in ../gpt2_bpe.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, '..', '..')) # the repo root, for tokenizer.py
from tokenizer import write_split

with open(os.path.join(here, '..', 'shakespeare_char', 'input.txt'), encoding='utf-8') as f:
    data = f.read()
print(f"length of dataset in characters: {len(data):,}")

meta = {'vocab_size': 50257, 'tokenizer': 'gpt2'} # the model pads its own vocab size (e.g. to 50304) if it wants to

# the first 90% of the characters are train, the rest val (split as in nanoGPT, so the token counts match)
write_split(here, data, meta)

# train has 301,966 tokens
# val has 36,059 tokens
