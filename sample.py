"""
Sample text from a trained model (an EfficientGPT checkpoint or one written by nanoGPT's train.py),
printing every token as soon as it is generated.
$ python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2 --max_new_tokens=200
An early-exit checkpoint can show which characters were easy: each one coloured by the layer it exited at.
$ python sample.py --out_dir=out-bench-early-exit --show_compute
"""

import argparse
import os
import pickle
import sys
from contextlib import nullcontext

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from early_exit import stream_early_exit
from model import sample_next
from tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.abspath(__file__))
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def pick_device(device):
    if device != 'auto':
        return device
    if torch.cuda.is_available():
        return 'cuda'
    return 'mps' if torch.backends.mps.is_available() else 'cpu'


def pick_dtype(dtype, device):
    """'auto' is bfloat16 autocast on a GPU that supports it, float32 everywhere else."""
    if dtype == 'auto':
        return 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    return dtype


def autocast(device, dtype):
    """The context the model runs in: float32 runs as is, lower precisions under autocast."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=DTYPES[dtype])


@torch.inference_mode()  # no autograd bookkeeping on the many small ops of each step
def stream_tokens(model, idx, max_new_tokens, temperature, top_k, vocab_size):
    """Yield each new token id of idx (1, T) as soon as it is sampled: model.generate's cached loop,
    one step at a time. Logits are cut to the tokenizer's vocab_size: a GPT-2 model pads its
    embedding table to 50304 rows, and the padding rows are not tokens."""
    cache = model.new_cache(1)
    for _ in range(max_new_tokens):
        logits = model.next_logits(idx, cache)[:, :vocab_size]  # (1, vocab); crops past block_size
        idx_next = sample_next(logits, temperature, top_k)  # (1, 1)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next.item()


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


def fail(message):
    """One line on stderr and exit status 2 (torch's own errors can run to several lines: keep the first)."""
    print(f"error: {str(message).strip().splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--ckpt', default='out/ckpt.pt', help="checkpoint file (default: %(default)s)")
    where.add_argument('--out_dir', help="directory holding ckpt.pt (instead of --ckpt)")
    add = parser.add_argument
    add('--start', default='\n', help="prompt text, or FILE:path to read it from a file (default: a newline)")
    add('--num_samples', type=int, default=3, help="samples to draw (default: %(default)s)")
    add('--max_new_tokens', type=int, default=500, help="tokens per sample (default: %(default)s)")
    add('--temperature', type=float, default=0.8,
        help="1.0 unchanged, < 1 more conservative, 0 greedy (default: %(default)s)")
    add('--top_k', type=int, default=200,
        help="sample from the top_k most likely tokens, 0: all (default: %(default)s)")
    add('--seed', type=int, default=1337, help="random seed (default: %(default)s)")
    add('--device', default='auto', help="cpu, cuda, cuda:1, mps, or auto: cuda, then mps, then cpu (default: auto)")
    add('--dtype', default='auto', choices=['auto', *DTYPES],
        help="auto: bfloat16 autocast on a GPU that supports it, else float32 (default: auto)")
    add('--compile', action='store_true', help="torch.compile the model (default: off)")
    add('--show_compute', action='store_true',
        help="early-exit checkpoints: decode with early exit and mark each character by the layer it exited at")
    add('--data_root', default=os.path.join(REPO, 'data'),
        help="where a nanoGPT checkpoint finds <dataset>/meta.pkl (default: the repository's data/)")
    args = parser.parse_args()

    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt') if args.out_dir else args.ckpt
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    start = args.start
    try:
        model, meta = model_from_checkpoint(load_checkpoint(ckpt_path), args.data_root)
        tok = load_tokenizer(meta)
        if start.startswith('FILE:'):
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
    except (ValueError, OSError, pickle.UnpicklingError) as e:  # CheckpointError is a ValueError
        fail(e)
    try:
        start_ids = tok.encode(start)
    except ValueError as e:
        fail(f"--start: {e}")
    if not start_ids:
        fail("--start is empty: the model needs at least one token to continue")

    model.eval().to(device)
    L = model.config.n_layer
    if args.show_compute and not getattr(model.config, 'enable_early_exit', False):
        fail("--show_compute needs a checkpoint trained with enable_early_exit=True")
    if args.show_compute and sys.stdout.isatty():
        print("exit layer: " + ' '.join(f"\033[38;5;{layer_mark(l, L, True)}m{l}\033[0m" for l in range(1, L + 1)))
    if args.compile:
        model.compile()  # compiles model(...), which next_logits calls
    torch.manual_seed(args.seed)
    idx = torch.tensor([start_ids], dtype=torch.long, device=device)  # (1, T)
    with autocast(device, dtype):
        for _ in range(args.num_samples):
            if args.show_compute:
                stats = {}
                steps = stream_early_exit(model, idx, args.max_new_tokens, args.temperature, args.top_k or None,
                                          None, stats, tok.vocab_size)
                show_compute(tok, start, steps, L, sys.stdout.isatty())
                print(f"\nmean exit layer {stats['mean_exit_layer']:.2f} of {L}", end='')
            else:
                show(start)
                tokens = stream_tokens(model, idx, args.max_new_tokens, args.temperature, args.top_k or None,
                                       tok.vocab_size)
                for piece in stream_text(tok, tokens):
                    show(piece)
            print('\n---------------')


if __name__ == '__main__':
    main()
