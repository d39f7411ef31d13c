"""
Sample text from a trained model (an EfficientGPT checkpoint or one written by nanoGPT's train.py),
printing every token as soon as it is generated.
$ python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=2 --max_new_tokens=200
Type prompts and watch each continuation stream, until Ctrl-D:
$ python sample.py --out_dir=out-shakespeare-char-cpu --interactive
An early-exit checkpoint can show which characters were easy: each one coloured by the layer it exited at.
$ python sample.py --out_dir=out-bench-early-exit --show_compute
"""

import os
import pickle
import sys

import numpy as np
import torch

from checkpoint import PRETRAINED, from_pretrained, is_pretrained, load_checkpoint, model_from_checkpoint
from common import REPO, autocast, fail, pick_device, pick_dtype
from configurator import configure_or_exit, describe
from early_exit import CRITERIA, stream_early_exit
from efficient_modules import calibration_windows, teal_sparsify
from model import decode_tokens, sample_next
from tokenizer import ensure_prepared, load_tokenizer

DEFAULTS = dict(
    init_from='resume',  # 'resume': the checkpoint in out_dir (or ckpt); or GPT-2 weights: 'gpt2' .. 'gpt2-xl', 'hf:<folder>'
    out_dir='out',  # directory holding ckpt.pt
    ckpt='',  # a checkpoint file, instead of out_dir/ckpt.pt
    start='\n',  # prompt text, or FILE:path to read it from a file
    num_samples=3,  # samples to draw (per prompt with interactive)
    max_new_tokens=500,  # tokens per sample
    temperature=0.8,  # 1.0 unchanged, < 1 more conservative, 0 greedy; otherwise at least 0.001
    top_k=200,  # sample from the top_k most likely tokens; 0: all
    seed=1337,  # random seed of the sampling
    device='auto',  # cpu, cuda, cuda:1, mps, or auto: cuda, then mps, then cpu
    dtype='auto',  # auto: bfloat16 autocast on a GPU that supports it, float16 on older GPUs, else float32
    compile=False,  # torch.compile the model
    decode='full',  # 'full', or with an early-exit checkpoint 'early_exit' (lossy) or 'speculative' (exact)
    exit_criterion=None,  # early_exit: max_prob | margin | saturation | learned; None: the checkpoint's
    exit_threshold=None,  # early_exit: exit when the criterion's confidence >= this; None: the checkpoint's
    draft_layers=None,  # speculative: layers that draft (the trunk included); None: the checkpoint's
    draft_tokens=None,  # speculative: tokens drafted per verification; None: the checkpoint's
    draft_confidence=0.0,  # speculative: stop drafting when the draft's top probability falls below this
    teal_sparsity=0.0,  # TEAL: drop this fraction of each dense MLP's activations, thresholds set on training text; 0: off
    teal_data='',  # TEAL: the dataset folder whose train.bin sets the thresholds; '': the checkpoint's dataset
    show_compute=False,  # early-exit checkpoints: decode with early exit, each character marked by its exit layer
    interactive=False,  # read prompts from the terminal, one continuation each, until Ctrl-D
    data_root=os.path.join(REPO, 'data'),  # where a nanoGPT checkpoint finds <dataset>/meta.pkl
)


# each decode engine's policy: generate()'s keyword -> this script's key
POLICY = {'full': {}, 'early_exit': {'criterion': 'exit_criterion', 'threshold': 'exit_threshold'},
          'speculative': {k: k for k in ('draft_layers', 'draft_tokens', 'draft_confidence')}}


def check_settings(cfg):
    """Every value that would otherwise fail inside torch (or print garbage) is named before any work."""
    if cfg['decode'] not in POLICY:
        fail(f"--decode must be one of {', '.join(POLICY)}, not {cfg['decode']!r}")
    if cfg['show_compute']:
        cfg['decode'] = 'early_exit'
    if cfg['exit_criterion'] is not None and cfg['exit_criterion'] not in CRITERIA:
        fail(f"--exit_criterion must be one of {', '.join(CRITERIA)}, not {cfg['exit_criterion']!r}")
    for key, kind in (('exit_threshold', (int, float)), ('draft_layers', int), ('draft_tokens', int)):
        value = cfg[key]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or value <= 0):
            fail(f"--{key} must be a positive number (an int for the draft keys), not {value!r}")
    s = cfg['teal_sparsity']
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (s == 0 or 0 < s < 1):
        fail(f"--teal_sparsity must be 0 (off) or a fraction of activations to drop in (0, 1), not {s!r}")
    t = cfg['temperature']
    if not (t == 0 or 1e-3 <= t < float('inf')):
        fail(f"--temperature must be 0 (greedy) or a finite number >= 0.001, not {t}")
    for key, low in (('top_k', 0), ('num_samples', 1), ('max_new_tokens', 1)):
        if cfg[key] < low:
            fail(f"--{key} must be at least {low}, not {cfg[key]}")


def sampler(temperature, top_k, vocab_size, generator=None):
    """choose(logits (B, V)) -> token (B, 1) for the token loop. Logits are cut to the tokenizer's vocab_size:
    a GPT-2 model pads its embedding table to 50304 rows, and the padding rows are not tokens."""
    return lambda logits: sample_next(logits[:, :vocab_size], temperature, top_k or None, generator)


@torch.inference_mode()  # no autograd bookkeeping on the many small ops of each step
def stream_tokens(model, idx, max_new_tokens, choose):
    """Yield each new token id of idx (1, T) as soon as it is chosen: generate's cached token loop."""
    cache = model.new_cache(1)
    for token in decode_tokens(lambda context: model.next_logits(context, cache), idx, max_new_tokens, choose):
        yield token.item()


def stream_text(tok, token_ids):
    """Yield the printable text of each token as it arrives. The whole generated sequence is decoded
    each time and its new suffix handed out: with GPT-2 BPE one character can span several tokens,
    and until its last byte arrives its first bytes decode to U+FFFD, so a trailing U+FFFD is held
    back until the next token completes it (or the stream ends)."""
    ids, done = [], 0
    for i in token_ids:
        ids.append(i)
        stable = tok.decode(ids).rstrip('\ufffd')
        yield stable[done:]
        done = max(done, len(stable))
    yield tok.decode(ids)[done:]


def show(piece):
    """Where every piece of generated text is written."""
    print(piece, end='', flush=True)


# 256-colour ANSI codes from green (shallow: an easy token) through yellow to red (the last layer)
EXIT_COLOURS = (46, 118, 190, 226, 220, 214, 208, 202, 196)


def layer_mark(layer, n_layer, colour):
    """How --show_compute marks a layer (1-based): an ANSI colour code on a terminal, else one digit."""
    if colour:
        return EXIT_COLOURS[round((layer - 1) * (len(EXIT_COLOURS) - 1) / max(1, n_layer - 1))]
    return '0123456789abcdefghijklmnopqrstuvwxyz'[layer]


def show_compute(tok, start, steps, n_layer, colour):
    """Print the prompt, then the text of steps ((token (1, 1), layers run) pairs) marked by exit layer: on
    a terminal each piece in its layer's colour as it arrives; elsewhere plain text, each line followed
    by a line of layer digits under its characters (blank under the prompt)."""
    layers, lines = [], start.split('\n')
    marks = [' ' * len(line) for line in lines]
    if colour:
        show(start)

    def token_ids():
        for token, layer in steps:
            layers.append(layer)
            yield token.item()

    for piece in stream_text(tok, token_ids()):
        if colour:
            print(f"\033[38;5;{layer_mark(layers[-1], n_layer, True)}m{piece}\033[0m", end='', flush=True)
            continue
        for i, line in enumerate(piece.split('\n')):
            if i:
                lines.append('')
                marks.append('')
            lines[-1] += line
            marks[-1] += layer_mark(layers[-1], n_layer, False) * len(line)
    if not colour:
        print('\n'.join(f"{line}\n{mark}" for line, mark in zip(lines, marks)), end='')


def continue_text(model, tok, start, cfg, colour):
    """Print start and its continuation as it streams (with --show_compute, marked by exit layer)."""
    try:
        start_ids = tok.encode(start)
    except ValueError as e:
        fail(f"--start: {e}")
    if not start_ids:
        fail("--start is empty: the model needs at least one token to continue")
    idx = torch.tensor([start_ids], dtype=torch.long, device=model.lm_head.weight.device)  # (1, T)
    choose = sampler(cfg['temperature'], cfg['top_k'], tok.vocab_size)
    policy = {name: cfg[key] for name, key in POLICY[cfg['decode']].items() if cfg[key] is not None}
    if cfg['decode'] == 'early_exit':
        with torch.inference_mode():
            stats = {}
            steps = stream_early_exit(model, idx, cfg['max_new_tokens'], choose, stats, **policy)
            if cfg['show_compute']:
                show_compute(tok, start, steps, model.config.n_layer, colour)
            else:
                show(start)
                for piece in stream_text(tok, (token.item() for token, _ in steps)):
                    show(piece)
        print(f"\nmean exit layer {stats['mean_exit_layer']:.2f} of {model.config.n_layer}", end='')
    elif cfg['decode'] == 'speculative':  # a verification pass yields several tokens at once: printed at the end
        out = model.generate(idx, cfg['max_new_tokens'], cfg['temperature'], cfg['top_k'] or None,
                             decode='speculative', **policy)
        show(tok.decode(out[0].tolist()))
    else:
        show(start)
        for piece in stream_text(tok, stream_tokens(model, idx, cfg['max_new_tokens'], choose)):
            show(piece)


def teal_calibrate(model, cfg, dataset, device):
    """--teal_sparsity: the model's dense MLPs become TEAL MLPs, thresholds set on windows of a training split."""
    folder = cfg['teal_data'] or dataset
    if folder and not os.path.isdir(folder):  # a dataset named as training names it: a folder under data_root
        folder = os.path.join(cfg['data_root'], folder)
    if not folder:
        fail("--teal_sparsity sets its thresholds on training text: name a dataset folder with --teal_data")
    try:
        ensure_prepared(folder, ('train.bin',))
        train = np.memmap(os.path.join(folder, 'train.bin'), dtype=np.uint16, mode='r')
        if len(train) <= model.config.block_size or int(train.max()) >= model.config.vocab_size:
            fail(f"{folder}/train.bin does not fit the model: it needs more than block_size={model.config.block_size} "
                 f"tokens, each below vocab_size={model.config.vocab_size}")
        teal_sparsify(model, cfg['teal_sparsity'], calibration_windows(train, model.config.block_size).to(device))
    except (ValueError, OSError) as e:
        fail(f"--teal_sparsity: {e}")


def prompts(cfg):
    """The prompts to continue: --start, or with --interactive each line typed until Ctrl-D (empty: --start)."""
    if not cfg['interactive']:
        yield cfg['start']
        return
    print("type a prompt and press Enter (Ctrl-C stops a continuation, Ctrl-D quits)")
    while True:
        try:
            line = input('> ')
        except EOFError:
            print()
            return
        yield line.replace('\\n', '\n') or cfg['start']


def main():
    cfg = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__, describe(__file__))
    check_settings(cfg)
    ckpt_path = cfg['ckpt'] or os.path.join(cfg['out_dir'], 'ckpt.pt')
    device = pick_device(cfg['device'])
    dtype = pick_dtype(cfg['dtype'], device)
    try:
        if is_pretrained(cfg['init_from']):
            model, meta = from_pretrained(cfg['init_from'])
            dataset = ''  # GPT-2's training text is not here: TEAL needs --teal_data
        elif cfg['init_from'] == 'resume':
            ckpt = load_checkpoint(ckpt_path)
            model, meta = model_from_checkpoint(ckpt, cfg['data_root'])
            dataset = ckpt.get('config', {}).get('dataset', '')
        else:
            fail(f"--init_from must be 'resume', one of {', '.join(PRETRAINED)} or 'hf:<folder>', not {cfg['init_from']!r}")
        tok = load_tokenizer(meta)
        if cfg['start'].startswith('FILE:'):
            with open(cfg['start'][5:], encoding='utf-8') as f:
                cfg['start'] = f.read()
    except (ValueError, OSError, pickle.UnpicklingError) as e:  # CheckpointError is a ValueError
        fail(e)
    model.eval().to(device)
    if cfg['teal_sparsity']:
        teal_calibrate(model, cfg, dataset, device)
    L, colour = model.config.n_layer, sys.stdout.isatty()
    if cfg['decode'] != 'full' and not getattr(model.config, 'enable_early_exit', False):
        fail(f"--{'show_compute' if cfg['show_compute'] else 'decode=' + cfg['decode']} needs a checkpoint trained "
             f"with enable_early_exit=True")
    if cfg['show_compute'] and colour:
        print("exit layer: " + ' '.join(f"\033[38;5;{layer_mark(l, L, True)}m{l}\033[0m" for l in range(1, L + 1)))
    if cfg['compile']:
        model.compile()  # compiles model(...), which next_logits calls
    torch.manual_seed(cfg['seed'])
    with autocast(device, dtype):
        for prompt in prompts(cfg):
            for _ in range(cfg['num_samples']):
                try:
                    continue_text(model, tok, prompt, cfg, colour)
                except KeyboardInterrupt:
                    if not cfg['interactive']:
                        raise
                print('\n---------------')


if __name__ == '__main__':
    main()
