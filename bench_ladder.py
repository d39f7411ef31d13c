"""
The scaling ladder: from which model width each mechanism's decode pays. Random weights (these paths skip the
same work whatever the weights are), 6 layers, a 256-token context, n_embd 128 to 1024: batch-1 and batched
greedy decode of every mechanism and of the cached dense GPT of the same width, called in turn in one process
(bench_rows.protocol.time_rounds), as speed ratios against that dense model.
$ python bench_ladder.py                                        # every width and mechanism, one thread
$ python bench_ladder.py --widths=128,384 --mechanisms=topk,moe --runs=3 --json=results/ladder.json --plot=results
"""

import json
import os
import sys
from datetime import date

import torch
from tqdm import tqdm

from bench_rows.protocol import stats, time_rounds
from checkpoint import build_model
from common import REPO, fail, pyplot, synchronizer
from configurator import configure_or_exit, describe, load_config_file
from model_efficient import EfficientGPTConfig

# name: (its recipe file, keys changed over it). Each runs as the recipe's bench model does, at every width.
MECHANISMS = {
    'rope': ('train_bench_rope.py', {}),  # the strong baseline's decode: Muon changes training only
    'topk': ('train_bench_topk_cpu.py', {}),  # 10% of the MLP units, the down-projection gathered
    'moe': ('train_bench_moe_cpu.py', {}),  # 4 experts, top-1: a token reads one expert's weights
    'hourglass_k4': ('bench_hourglass_k4.py', {}),  # layers 1-4 run once per 4 tokens
    'hourglass_k32': ('bench_hourglass_k4.py', dict(hierarchy_factor=32)),
    'local_rope': ('train_bench_local.py', {}),  # a 64-token window in every layer
    'efficient_gpt': ('efficient_gpt.py', {}),  # the combination: hourglass k = 32, rope, local attention
}
DEFAULTS = dict(
    widths='128,256,384,768,1024',  # n_embd of each rung; n_head = n_embd / 64 (4 heads below 256)
    mechanisms=','.join(MECHANISMS),  # comma list of MECHANISMS
    n_layer=6,
    block_size=256,
    vocab_size=65,  # shakespeare_char's
    new_tokens=100,  # greedy tokens per decode call, after a one-token prompt
    batch=16,  # the batched rows' batch
    runs=3,  # timed rounds after a warm-up round
    threads=1,  # torch threads (batch-1 decode of the small rungs is per-op overhead: threads don't help it)
    seed=1337,
    json='',  # write every figure and the settings here
    plot='',  # a folder for scaling_ladder.png (needs matplotlib)
)


def rung(width, names, cfg):
    """The dense GPT and each mechanism's model at this width, random weights, in eval mode."""
    size = dict(n_layer=cfg['n_layer'], n_head=width // 64 if width >= 256 else 4, n_embd=width,
                block_size=cfg['block_size'], vocab_size=cfg['vocab_size'], bias=False, dropout=0.0)
    keys = set(EfficientGPTConfig.__dataclass_fields__)
    models = {'dense': build_model('gpt', size)}
    for name in names:
        recipe, changes = MECHANISMS[name]
        settings = {**load_config_file(os.path.join(REPO, 'config', recipe)), **changes}
        models[name] = build_model('efficient', {**{k: v for k, v in settings.items() if k in keys}, **size})
    return {name: m.eval() for name, m in models.items()}


def measure(models, batch, cfg, sync):
    """Each model's decode tok/s at this batch and its per-round speed ratio against the dense model."""
    torch.manual_seed(cfg['seed'])
    prompt = torch.randint(cfg['vocab_size'], (batch, 1))
    n = cfg['new_tokens']
    fns = [lambda m=m: m.generate(prompt, n, temperature=0) for m in models.values()]
    _, rates, _ = time_rounds(fns, cfg['runs'], n * batch, sync)
    dense = rates[0]['runs']
    return {name: dict(tok_s=r['median'], ratio=stats([a / b for a, b in zip(r['runs'], dense)]))
            for name, r in zip(models, rates)}


def report(results):
    widths = [int(w) for w in results['rows']]
    names = list(next(iter(results['rows'].values()))['1'])
    for batch in results['batches']:
        print(f"\nbatch {batch}: decode speed against the cached dense GPT of the same width (median of per-round "
              f"ratios); dense tok/s in the first row\n")
        print('| mechanism | ' + ' | '.join(f'n_embd {w}' for w in widths) + ' | pays from |')
        print('|---|' + '---|' * (len(widths) + 1))
        for name in names:
            cells = [results['rows'][str(w)][str(batch)][name] for w in widths]
            if name == 'dense':
                print('| dense (tok/s) | ' + ' | '.join(f"{c['tok_s']:,.0f}" for c in cells) + ' | |')
                continue
            pays = next((w for w, c in zip(widths, cells) if c['ratio']['median'] > 1), None)
            print(f'| {name} | ' + ' | '.join(f"{c['ratio']['median']:.2f}x" for c in cells) +
                  f" | {pays or 'never'} |")


def plot(results, folder):
    plt = pyplot()
    if plt is None:
        return
    os.makedirs(folder, exist_ok=True)
    widths = [int(w) for w in results['rows']]
    fig, axes = plt.subplots(1, len(results['batches']), figsize=(6 * len(results['batches']), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], results['batches']):
        for name in next(iter(results['rows'].values()))[str(batch)]:
            if name != 'dense':
                ax.plot(widths, [results['rows'][str(w)][str(batch)][name]['ratio']['median'] for w in widths], 'o-',
                        label=name)
        ax.axhline(1.0, color='black', lw=0.8, ls=':')
        ax.set_xscale('log', base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel('n_embd (6 layers, random weights)')
        ax.set_ylabel('decode speed vs dense (x)')
        ax.set_title(f'batch {batch}')
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, 'scaling_ladder.png'), dpi=120)
    print(f"plot written to {folder}/scaling_ladder.png")


def main():
    cfg = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__, describe(__file__))
    names = [n for n in cfg['mechanisms'].split(',') if n]
    if unknown := [n for n in names if n not in MECHANISMS]:
        fail(f"unknown mechanisms {', '.join(unknown)}: choose from {', '.join(MECHANISMS)}")
    try:
        widths = [int(w) for w in cfg['widths'].split(',')]
    except ValueError:
        fail(f"--widths={cfg['widths']!r}: a comma list of integers, e.g. {DEFAULTS['widths']}")
    if bad := [w for w in widths if w < 64 or w % 64]:
        fail(f"--widths: {bad} are not multiples of 64 (the head size)")
    torch.set_num_threads(cfg['threads'])
    sync = synchronizer('cpu')
    results = dict(config=cfg, date=date.today().isoformat(), torch=torch.__version__, threads=torch.get_num_threads(),
                   machine=f"{os.uname().machine}, {os.cpu_count()} CPUs", batches=[1, cfg['batch']], rows={})
    for width in tqdm(widths, unit='width'):  # generate() runs in inference mode; the models are built outside it
        models = rung(width, names, cfg)
        results['rows'][str(width)] = {str(b): measure(models, b, cfg, sync) for b in results['batches']}
    print(f"bench_ladder.py {' '.join(sys.argv[1:])}: {results['date']}, {results['machine']}, torch {torch.__version__}, "
          f"{results['threads']} thread(s), {cfg['new_tokens']} new tokens, {cfg['runs']} rounds")
    report(results)
    if cfg['json']:
        os.makedirs(os.path.dirname(os.path.abspath(cfg['json'])), exist_ok=True)
        with open(cfg['json'], 'w') as f:
            json.dump(results, f, indent=1)
    if cfg['plot']:
        plot(results, cfg['plot'])


if __name__ == '__main__':
    main()
