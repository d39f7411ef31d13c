"""
The README's results in one command. Trains what is missing (the CPU benchmark baseline, each mechanism
alone and the combined EfficientGPT, all with config/train_bench_cpu.py's data, steps, seed and size),
then measures every model against the cached baseline in one process (bench_rows.protocol.time_pair):
$ python bench_suite.py                                # everything, on CPU
$ python bench_suite.py --models=baseline,efficient_gpt --runs=3 --plot=results
Prints a Markdown table, writes every figure to --json and, with --plot=DIR, two PNGs (needs matplotlib).
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import date

import numpy as np
import torch
from tqdm import tqdm

from bench_rows.protocol import greedy, time_pair
from checkpoint import load_checkpoint, model_from_checkpoint
from common import REPO, autocast, fail, pick_dtype, synchronizer
from configurator import configure_or_exit, describe, load_config_file
from evaluate import bits, decoded_loss, decode_consistent_loss, evaluate_loss, streaming_loss

BASE = 'config/train_bench_cpu.py'
# name: (the config files it trains with, its decode: generate()'s engine and policy). The first is the baseline
# every other model is timed against.
MODELS = {
    'baseline': ([BASE], {}),
    'early_exit': ([BASE, 'config/train_bench_early_exit.py'], dict(decode='early_exit', criterion='saturation',
                                                                     threshold=0.9)),
    'topk': ([BASE, 'config/train_bench_topk_cpu.py'], {}),
    'moe': ([BASE, 'config/train_bench_moe_cpu.py'], {}),
    'act': ([BASE, 'config/bench_act.py'], {}),
    'mod': ([BASE, 'config/bench_mod.py'], {}),
    'local_rope': ([BASE, 'config/train_bench_local.py'], {}),
    'hourglass': ([BASE, 'config/bench_hourglass_k4.py'], {}),
    'efficient_gpt': (['config/train_efficient_gpt.py'], {}),
}
DEFAULTS = dict(
    models=','.join(MODELS),  # comma list of MODELS; the baseline is always measured
    jobs=os.cpu_count() or 1,  # trainings at once, each with cpu_count // jobs threads
    eval_interval=100,  # passed to every training: its evaluations give the time to target_loss
    device='cpu',  # 'cuda' trains and measures on the GPU
    dtype='auto',  # auto: bfloat16 autocast on a GPU that supports it, float32 elsewhere
    compile=False,  # torch.compile every model measured (the first calls of each compile it: minutes)
    threads=1,  # torch threads while measuring (batch-1 decode is per-op overhead: threads don't help it)
    runs=5,  # timed runs of each side, alternating A B A B
    reference_runs=2,  # for the pairs with an uncached reference side (seconds per run) and past-block_size pairs
    new_tokens=250,  # batch-1 and batched decode inside the context (a one-token prompt)
    batch=16,
    past_tokens=500,  # decode past block_size: the baseline recomputes, streaming models don't
    stream_eval_tokens=4096,  # a streaming model's loss past block_size over this much val text read as one
    val_windows=16,  # quality: the first N fixed windows of val.bin (N * block_size characters)
    exit_sweep='0.995,0.99,0.95,0.9,0.8',  # early exit: thresholds on the speed-vs-quality plot
    target_loss=2.2,  # time to reach this val loss (nanoGPT's estimate, eval_iters batches) in training
    json='bench_suite.json',
    plot='',  # a folder for speed_vs_quality.png and exit_layers.png
    report='',  # a JSON file of an earlier run: print its table (and --plot it) without measuring anything
)


def out_dir_of(files):
    settings = {}
    for f in files:
        settings.update(load_config_file(os.path.join(REPO, f)))
    return os.path.join(REPO, settings['out_dir'])


def train_missing(names, cfg):
    """Train, in parallel, every model of names whose checkpoint is missing; each logs to out_dir/train.log."""
    todo = [n for n in names if not os.path.exists(os.path.join(out_dir_of(MODELS[n][0]), 'ckpt.pt'))]
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 1) // cfg['jobs'])
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}

    def train(name):
        files, out_dir = MODELS[name][0], out_dir_of(MODELS[name][0])
        os.makedirs(out_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(REPO, 'train_efficient.py'), *files, f"--eval_interval={cfg['eval_interval']}",
               f"--device={cfg['device']}", f"--dtype={cfg['dtype']}", '--progress=False']
        with open(os.path.join(out_dir, 'train.log'), 'w') as log:
            if subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                fail(f"training {name} failed: see {os.path.join(out_dir, 'train.log')}")
        return name

    print(f"training {', '.join(todo)}: {cfg['jobs']} at a time, {threads} thread(s) each")
    with ThreadPoolExecutor(cfg['jobs']) as pool:
        for done in tqdm(as_completed([pool.submit(train, n) for n in todo]), total=len(todo), unit='model'):
            done.result()


def load(name, cfg):
    ckpt = load_checkpoint(os.path.join(out_dir_of(MODELS[name][0]), 'ckpt.pt'), cfg['device'])
    model = model_from_checkpoint(ckpt)[0].to(cfg['device']).eval()
    if cfg['compile']:
        model.compile()  # compiles model(...), which every decode path calls
    return model, ckpt


def training_figures(ckpt, target):
    """Training tok/s and the training time (evaluations excluded) to the first evaluation at or below target."""
    history = ckpt.get('eval_history') or []
    if not history or not history[-1]['train_seconds']:
        return dict(train_tok_s=None, seconds_to_target=None)
    hit = next((h for h in history if h['val_loss'] <= target), None)
    return dict(train_tok_s=history[-1]['tokens'] / history[-1]['train_seconds'],
                seconds_to_target=hit['train_seconds'] if hit else None, final_val_loss=ckpt.get('final_val_loss'))


def measure(m, base, data, cfg, prompts, sync, decode):
    """One model's row: speed against the cached baseline at batch 1 and batched, quality as it decodes, work
    per token, KV-cache bytes, and for a streaming model its decode past block_size against the baseline's
    uncached reference path and its loss there. decode: generate()'s engine and policy for this model."""
    n, runs = cfg['new_tokens'], cfg['runs']

    def gen(model, prompt, tokens, **extra):
        return lambda: model.generate(prompt, tokens, temperature=0, **extra)

    _, _, b1 = time_pair(gen(m, prompts[:1], n, **decode), gen(base, prompts[:1], n), runs, n, sync)
    # batched: the early-exit engines are batch 1, so a batched row is the full decode
    _, _, b16 = time_pair(gen(m, prompts, n), gen(base, prompts, n), runs, n * prompts.size(0), sync)
    q = decoded_loss(m, data, m.config.block_size, cfg['val_windows'], cfg['batch'], cfg['device'], **decode)
    stream, cache = greedy(m)
    for _ in stream(prompts[:1], n):
        pass
    cost = m.decode_cost((n + 1) / 2)  # mean positions attended over the generation
    row = dict(decode_tok_s=b1['a']['median'], vs_cached=b1['ratio'], batch_tok_s=b16['a']['median'],
               batch_vs_cached=b16['ratio'], val_loss=q['loss'], bits=bits(q['loss']),
               flops_per_token=q.get('flops_per_token', cost.flops), weight_bytes_per_token=cost.weight_bytes,
               kv_cache_bytes=sum(c.nbytes for c in cache),
               **{k: q[k] for k in ('mean_exit_layer', 'exit_layer_counts') if k in q})
    if getattr(m, 'streams', False):  # the reference path recomputes block_size positions every step
        _, _, past = time_pair(gen(m, prompts[:1], cfg['past_tokens'], **decode),
                               gen(base, prompts[:1], cfg['past_tokens'], use_cache=False),
                               cfg['reference_runs'], cfg['past_tokens'], sync)
        row.update(past_tok_s=past['a']['median'], past_vs_reference=past['ratio'], **stream_quality(m, data, cfg))
    return row


def reference(base, cfg, prompts, sync):
    """nanoGPT's uncached generate against the cached baseline: batch 1, batched, and past block_size."""
    def gen(prompt, tokens, use_cache):
        return lambda: base.generate(prompt, tokens, temperature=0, use_cache=use_cache)
    n, runs = cfg['new_tokens'], cfg['reference_runs']
    figures = {}
    for key, prompt, tokens in (('b1', prompts[:1], n), ('batch', prompts, n), ('past', prompts[:1], cfg['past_tokens'])):
        _, _, t = time_pair(gen(prompt, tokens, False), gen(prompt, tokens, True), runs, tokens * prompt.size(0), sync)
        figures.update({f'{key}_tok_s': t['a']['median'], f'{key}_vs_cached': t['ratio']})
    return figures


def stream_quality(m, data, cfg):
    """Does streaming cost quality? The val text's first stream_eval_tokens read as one stream, against the
    same positions past block_size scored in fixed block_size windows (each window's context starts afresh)."""
    n, T = cfg['stream_eval_tokens'], m.config.block_size
    inside, past = streaming_loss(m, data, n, device=cfg['device'])
    windows = evaluate_loss(m, data[T:n + 1], T, cfg['batch'], (n - T) // T, cfg['device'])
    return dict(stream_loss_inside_block=inside, stream_loss_past_block=past, window_loss_past_block=windows)


def exit_sweep(m, base, data, cfg, prompts, sync, decode):
    """Early exit's speed and decode-consistent loss at each threshold of exit_sweep (the plot's curve)."""
    points, n = [], cfg['new_tokens']
    for threshold in (float(t) for t in cfg['exit_sweep'].split(',')):
        policy = {**decode, 'threshold': threshold}
        _, _, t = time_pair(lambda: m.generate(prompts[:1], n, temperature=0, **policy),
                            lambda: base.generate(prompts[:1], n, temperature=0), cfg['runs'], n, sync)
        q = decode_consistent_loss(m, data, m.config.block_size, cfg['val_windows'], policy['criterion'], threshold,
                                   cfg['device'])
        points.append(dict(threshold=threshold, vs_cached=t['ratio'], val_loss=q['loss']))
    return points


def fmt_ratio(x):
    return f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})"


def fmt_row(name, r, base_loss):
    ratio = fmt_ratio
    to_target = f"{r['seconds_to_target']:.0f} s" if r.get('seconds_to_target') else '—'
    whole = f"{r['final_val_loss']:.4f}" if r.get('final_val_loss') else '—'
    train = f"{r['train_tok_s']:,.0f}" if r.get('train_tok_s') else '—'
    return (f"| {name} | {r['decode_tok_s']:,.0f} | {ratio(r['vs_cached'])} | {r['batch_tok_s']:,.0f} | "
            f"{ratio(r['batch_vs_cached'])} | {r['val_loss']:.4f} | {r['bits']:.3f} | "
            f"{100 * (r['val_loss'] - base_loss) / base_loss:+.1f}% | {whole} | {r['flops_per_token'] / 1e6:.2f} | "
            f"{r['kv_cache_bytes'] / 1024:.0f} | {train} | {to_target} |")


def report(results, cfg, header):
    rows = results['rows']
    base = rows[next(iter(rows))]  # the first row is the baseline
    print(header)
    print(f"\nbatch 1 and batch {cfg['batch']}: {cfg['new_tokens']} new tokens after a one-token prompt; ratios are "
          f"medians of per-pair ratios against the cached baseline (min-max), {cfg['runs']} runs each "
          f"({cfg['reference_runs']} for the batched and past-block_size reference paths). Val loss: as each model "
          f"decodes, over the first {cfg['val_windows']} fixed windows of val.bin; the forward loss over the whole "
          f"split is the training run's final evaluation")
    print("\n| model | tok/s b=1 | vs cached | tok/s b=%d | vs cached | val loss | bits/char | Δ loss | forward loss, "
          "whole val | MFLOPs/token | KV KiB | train tok/s | train time to %.2f |" % (cfg['batch'], cfg['target_loss']))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = results.get('reference')
    if ref:
        print(f"| uncached reference (nanoGPT's generate) | {ref['b1_tok_s']:,.0f} | {fmt_ratio(ref['b1_vs_cached'])} | "
              f"{ref['batch_tok_s']:,.0f} | {fmt_ratio(ref['batch_vs_cached'])} | | | | | | | | |")
    for name, r in rows.items():
        print(fmt_row(name, r, base['val_loss']))
    if not ref:
        return
    print(f"\n{cfg['past_tokens']} new tokens, past block_size, batch 1, against the baseline's uncached reference "
          f"path ({ref['past_tok_s']:,.0f} tok/s; the cached baseline recomputes the cropped context there too, "
          f"{fmt_ratio(ref['past_vs_cached'])} of its speed):\n")
    print(f"| model | tok/s | vs uncached reference | loss past block_size, streamed over {cfg['stream_eval_tokens']:,} "
          f"val tokens | the same positions in fixed windows |\n|---|---|---|---|---|")
    for name, r in rows.items():
        if 'past_tok_s' in r:
            x = r['past_vs_reference']
            losses = (f"{r['stream_loss_past_block']:.4f} | {r['window_loss_past_block']:.4f}"
                      if 'stream_loss_past_block' in r else '— | —')
            print(f"| {name} | {r['past_tok_s']:,.0f} | {x['median']:.1f}x ({x['min']:.1f}-{x['max']:.1f}) | {losses} |")


def plot(results, folder):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install -e '.[plot]'")
        return
    os.makedirs(folder, exist_ok=True)
    rows = results['rows']
    base_loss = rows[next(iter(rows))]['val_loss']
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        x = r['vs_cached']['median']
        ax.scatter(x, r['val_loss'], zorder=3)
        ax.annotate(name, (x, r['val_loss']), textcoords='offset points', xytext=(5, 4))
    if results.get('exit_sweep'):
        pts = results['exit_sweep']
        ax.plot([p['vs_cached']['median'] for p in pts], [p['val_loss'] for p in pts], 'o--', color='grey',
                label='early exit, thresholds ' + ', '.join(str(p['threshold']) for p in pts))
    ax.axhline(1.02 * base_loss, color='red', lw=0.8, ls=':', label='baseline loss + 2%')
    ax.axvline(2.0, color='green', lw=0.8, ls=':', label='2x the cached baseline')
    ax.set_xlabel('batch-1 decode speed vs the cached baseline (x)')
    ax.set_ylabel('val loss as decoded (nats/char)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, 'speed_vs_quality.png'), dpi=120)
    for name, r in rows.items():
        if 'exit_layer_counts' not in r:
            continue
        counts = r['exit_layer_counts']
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(range(1, len(counts) + 1), [c / sum(counts) for c in counts])
        ax.set_xlabel('layers run before the token exits')
        ax.set_ylabel('fraction of val characters')
        ax.set_title(f"{name}: {', '.join(f'{k} {v}' for k, v in MODELS[name][1].items())}")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f'{name}_exit_layers.png'), dpi=120)
    print(f"plots written to {folder}/")


def main():
    cfg = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__, describe(__file__))
    if cfg['report']:
        with open(cfg['report']) as f:
            results = json.load(f)
        report(results, results['config'], results.get('header', ''))
        if cfg['plot']:
            plot(results, cfg['plot'])
        return
    baseline = next(iter(MODELS))
    names = [baseline] + [n for n in cfg['models'].split(',') if n and n != baseline]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        fail(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    start = time.time()
    train_missing(names, cfg)
    torch.set_num_threads(cfg['threads'])
    torch.manual_seed(1337)
    device = cfg['device']
    dtype = pick_dtype(cfg['dtype'], device)
    sync = synchronizer(device)
    base, _ = load(baseline, cfg)
    data = np.memmap(os.path.join(REPO, 'data', 'shakespeare_char', 'val.bin'), dtype=np.uint16, mode='r')
    prompts = torch.randint(base.config.vocab_size, (cfg['batch'], 1), device=device)
    results = dict(config=cfg, rows={}, torch=torch.__version__, threads=torch.get_num_threads(), device=device, dtype=dtype,
                   date=date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                   load_average=os.getloadavg())
    with torch.no_grad(), autocast(device, dtype):
        results['reference'] = reference(base, cfg, prompts, sync)
        for name in tqdm(names, unit='model', desc='measuring'):
            m, ckpt = load(name, cfg)
            decode = MODELS[name][1]
            row = measure(m, base, data, cfg, prompts, sync, decode)
            results['rows'][name] = {**row, **training_figures(ckpt, cfg['target_loss'])}
            if decode.get('decode') == 'early_exit':
                results['exit_sweep'] = exit_sweep(m, base, data, cfg, prompts, sync, decode)
    results['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results['seconds'] = time.time() - start
    header = (f"bench_suite.py {' '.join(sys.argv[1:])}: {results['date']}, {results['machine']}, torch {torch.__version__}, "
              f"{device}, {dtype}, {'compiled' if cfg['compile'] else 'no compile'}, {results['threads']} thread(s), load average {results['load_average'][0]:.1f}, "
              f"{results['seconds'] / 60:.1f} min in all, peak RSS {results['peak_rss_bytes'] / 2**20:.0f} MiB")
    results['header'] = header
    report(results, cfg, header)
    if cfg['json']:
        os.makedirs(os.path.dirname(os.path.abspath(cfg['json'])), exist_ok=True)
        with open(cfg['json'], 'w') as f:
            json.dump(results, f, indent=1, default=str)
    if cfg['plot']:
        plot(results, cfg['plot'])


if __name__ == '__main__':
    main()
