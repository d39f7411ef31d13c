"""
Prepare three char-level tasks for continual (incremental) learning:
    A = Tiny Shakespeare (../shakespeare_char/input.txt), B = Sherlock Holmes (sherlock.txt), C = Lua C source (lua.txt).
One character vocabulary covers all three texts, so one model (one embedding table) can learn A, then B, then C.
Writes A_train.bin, A_val.bin, B_train.bin, ... (np.uint16 token ids, the first 90% of each text is train)
and meta.json next to this file. Runs offline: the texts ship with the repository (see README.md).
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, '..', '..')) # the repo root, for tokenizer.py
from tokenizer import char_meta, write_split

tasks = {'A': 'shakespeare', 'B': 'sherlock', 'C': 'lua'}
paths = {'A': os.path.join(here, '..', 'shakespeare_char', 'input.txt'),
         'B': os.path.join(here, 'sherlock.txt'),
         'C': os.path.join(here, 'lua.txt')}
texts = {}
for task, path in paths.items():
    with open(path, encoding='utf-8') as f:
        texts[task] = f.read()
    print(f"task {task} ({tasks[task]}): {len(texts[task]):,} characters, {len(set(texts[task]))} distinct")

meta = char_meta(''.join(texts.values()))
meta['tasks'] = tasks
print(f"shared vocab size: {meta['vocab_size']:,}")
for task, data in texts.items():
    write_split(here, data, meta, prefix=f'{task}_')
