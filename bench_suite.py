"""
The README's results in one command per size. Trains what is missing (nanoGPT's baseline, the strong dense
baseline at full and half depth, EfficientGPT, EfficientGPT-8L and, with --models=all, each mechanism alone, all on
one size file's data, steps, seed and size; a training that stopped early is resumed), then measures every model
against both cached baselines in one process: each timed call of a model alternates with one of each baseline
(bench_rows.protocol.time_rounds).
$ python bench_suite.py                                # the 128-dim benchmark: EfficientGPT against the baselines
$ python bench_suite.py --models=all                   # ... and every mechanism alone
$ python bench_suite.py --models=out-my-variant        # a folder with a ckpt.pt trained on the size file, measured too
$ python bench_suite.py --size=384                     # the 384-dim benchmark, where decode reads weights from memory
$ python bench_suite.py --models=strong,efficient_gpt --runs=3 --plot=results
$ python bench_suite.py --dataset=shakespeare --models=early_exit,efficient_gpt   # on GPT-2 BPE word pieces
Prints Markdown tables, writes every figure to --json and, with --plot=DIR, the frontier plot (needs matplotlib).
"""

import copy
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

from bench_rows.protocol import greedy, stats, time_pair, time_rounds, train_step
from bench_rows.roofline import gemv_sweeps, weight_matrices
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from common import REPO, autocast, fail, pick_dtype, pyplot, synchronizer
from configurator import configure_or_exit, describe, load_config_file
from evaluate import bits, decoded_loss, decode_consistent_loss, evaluate_loss, streaming_loss
from static_decode import StaticDecoder, why_not_static

# n_embd: (its size file, the evaluation interval of its trainings: the time to target_loss is read from them)
SIZES = {128: ('config/train_bench_cpu.py', 100), 384: ('config/train_bench384_cpu.py', 250)}
# dataset: (the file layered last over the size file and recipe for it, the infix of its folders and plots). The
# size files train on characters; word pieces in GPT-2 BPE change the vocabulary from 65 to 50,257, which makes the
# output head the largest matrix of a small model and so changes what skipping layers can save.
DATASETS = {'shakespeare_char': ([], ''), 'shakespeare': (['config/bench_bpe.py'], '-bpe')}
# name: (the recipe files it trains with over the size file, its decode: generate()'s engine and policy). The
# first two are the baselines every model is timed against: nanoGPT's, and the strong dense one.
MODELS = {
    'baseline': ([], {}),
    'strong': (['config/strong_baseline.py'], {}),
    'strong_3l': (['config/strong_baseline_3l.py'], {}),  # the strong baseline at EfficientGPT-8L's cost per character
    'early_exit': (['config/train_bench_early_exit.py'], dict(decode='early_exit', criterion='saturation',
                                                              threshold=0.9)),
    'topk': (['config/train_bench_topk_cpu.py'], {}),
    'moe': (['config/train_bench_moe_cpu.py'], {}),
    'act': (['config/bench_act.py'], {}),
    'mod': (['config/bench_mod.py'], {}),
    'local_rope': (['config/train_bench_local.py'], {}),
    'hourglass': (['config/bench_hourglass_k4.py'], {}),
    'efficient_gpt': (['config/efficient_gpt.py'], {}),
    'efficient_gpt_8l': (['config/efficient_gpt_8l.py'], {}),
}
BASELINES = list(MODELS)[:2]
# names --models takes for several models. The default, 'headline', is the README's front table: EfficientGPT
# against both baselines and the strong one at half depth (41 minutes from a fresh clone at 128 dims on 2 CPU
# cores, 26 of them training); 'all' adds every mechanism alone
MODEL_SETS = {'headline': ['strong_3l', 'efficient_gpt', 'efficient_gpt_8l'], 'all': list(MODELS)}
# the strong baseline through the static-shape decode step (static_decode.py; compiled with --compile): the fastest
# way this repository decodes a dense model. Every model's fastest decode (its own static step where it has one)
# is timed against it
STATIC = 'strong_static'
RIVALS = BASELINES + [STATIC]
DEFAULTS = dict(
    size=128,  # n_embd of the benchmark: 128 (per-op overhead bound at batch 1) or 384 (weight reads bound)
    dataset='shakespeare_char',  # or 'shakespeare': Tiny Shakespeare in GPT-2 BPE word pieces (config/bench_bpe.py)
    models='headline',  # comma list of MODELS and MODEL_SETS; both baselines are always measured
    measure=True,  # False: only train what is missing (then measure later, on a quiet machine)
    jobs=os.cpu_count() or 1,  # trainings at once, each with cpu_count // jobs threads
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
    target_loss=0.0,  # time to reach this val loss in training (nanoGPT's estimate); 0: the strong baseline's final one
    json='bench_suite.json',
    plot='',  # a folder for frontier_<size>[-bpe].png and <model>[-bpe]_exit_layers.png
    # JSON files of earlier runs, comma-separated: print their table (and --plot it) without measuring anything; a
    # later file adds or replaces models, the baselines' rows stay the first file's (each row keeps its own run's ratios)
    report='',
)


def out_dir_of(name, size, dataset='shakespeare_char'):
    if name not in MODELS:  # a folder named on the command line
        return name
    return os.path.join(REPO, f"out-bench{'' if size == 128 else size}{DATASETS[dataset][1]}-{name}")


def model_names(spec):
    """The models a --models value names, baselines first, each once; MODEL_SETS' names expand. A name that is not
    in MODELS is a folder holding a ckpt.pt."""
    named = [m for n in spec.split(',') if n for m in MODEL_SETS.get(n, [n])]
    names = list(dict.fromkeys(BASELINES + named))
    if unknown := [n for n in names if n not in MODELS and not os.path.isfile(os.path.join(n, 'ckpt.pt'))]:
        fail(f"unknown models {unknown}: choose from {', '.join([*MODELS, *MODEL_SETS])}, "
             "or name a folder holding a ckpt.pt")
    return names


def stopped_early(path):
    """A checkpoint short of its run's max_iters (an interrupted training writes one): resumed, never measured."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        fail(e)
    return 'iter_num' in ckpt and ckpt['iter_num'] < ckpt.get('config', {}).get('max_iters', 0)


def train_missing(names, cfg):
    """Train, in parallel, every model of names whose checkpoint is missing, and resume any that stopped early; each
    logs to out_dir/train.log."""
    size_file, eval_interval = SIZES[cfg['size']]
    ckpts = {n: os.path.join(out_dir_of(n, cfg['size'], cfg['dataset']), 'ckpt.pt') for n in names}
    todo = [n for n, path in ckpts.items() if not os.path.exists(path) or stopped_early(path)]
    if not todo:
        return
    if folders := [ckpts[n] for n in todo if n not in MODELS]:  # the suite knows no recipe to resume them with
        fail(f"{', '.join(folders)} stopped before max_iters: finish with train_efficient.py --init_from=resume")
    threads = max(1, (os.cpu_count() or 1) // cfg['jobs'])
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}

    def train(name):
        out_dir, resume = os.path.dirname(ckpts[name]), os.path.exists(ckpts[name])
        os.makedirs(out_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(REPO, 'train_efficient.py'), size_file, *MODELS[name][0],
               *DATASETS[cfg['dataset']][0],
               f'--out_dir={out_dir}', f'--eval_interval={eval_interval}', f"--device={cfg['device']}",
               f"--dtype={cfg['dtype']}", '--progress=False', *(['--init_from=resume'] if resume else [])]
        with open(os.path.join(out_dir, 'train.log'), 'a' if resume else 'w') as log:
            if subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                fail(f"training {name} failed: see {os.path.join(out_dir, 'train.log')}")
        return name

    print(f"training {', '.join(todo)}: {cfg['jobs']} at a time, {threads} thread(s) each")
    with ThreadPoolExecutor(cfg['jobs']) as pool:
        for done in tqdm(as_completed([pool.submit(train, n) for n in todo]), total=len(todo), unit='model'):
            done.result()


def load(name, cfg):
    ckpt = load_checkpoint(os.path.join(out_dir_of(name, cfg['size'], cfg['dataset']), 'ckpt.pt'), cfg['device'])
    model = model_from_checkpoint(ckpt)[0].to(cfg['device']).eval()
    if cfg['compile']:
        model.compile()  # compiles model(...), which every decode path calls
    return model, ckpt


def training_figures(ckpt, target):
    """From the run's log: training tok/s, its loss curve (iteration, training seconds with evaluations excluded,
    val loss), and the iteration of the first evaluation at or below target. The logged
    seconds are as the run went (other jobs beside it slow them); the report's time to target is the iteration
    at the step speed measured in the suite's one process."""
    history = ckpt.get('eval_history') or []
    if not history or not history[-1]['train_seconds']:
        return dict(train_tok_s=None, iters_to_target=None, final_val_loss=ckpt.get('final_val_loss'))
    hit = next((h for h in history if h['val_loss'] <= target), None)
    return dict(train_tok_s=history[-1]['tokens'] / history[-1]['train_seconds'],
                iters_to_target=hit['iter'] if hit else None, final_val_loss=ckpt.get('final_val_loss'),
                loss_curve=[(h['iter'], h['train_seconds'], h['val_loss']) for h in history])


def measured_seconds(r, iters):
    """Training seconds of iters steps at the step speed measured in the suite (None where it was not)."""
    return iters / r['train_steps_s'] if r.get('train_steps_s') and iters is not None else None


def training_step(model, ckpt, x):
    """One step as train_efficient.py takes it over x (B, T): forward, backward with the aux losses, and the step
    of the optimizer the checkpoint trained with, on a copy (the measured model keeps its weights)."""
    model, c = copy.deepcopy(model).train(), ckpt['config']
    optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']),
                                           x.device.type, c.get('optimizer', 'adamw'), c.get('muon_lr_scale', 1.0))
    forward_backward = train_step(model, x)

    def step():
        forward_backward()
        optimizer.step()
    return step


def against(name, fn, baseline_fns, runs, work, sync):
    """Model name's call fn timed in turn with each baseline's call (but its own): its stats, and the stats of
    its per-round speed ratio against each baseline by name (exactly 1 against itself)."""
    rivals = [b for b in baseline_fns if b != name]
    _, rates, ratios = time_rounds([fn, *(baseline_fns[b] for b in rivals)], runs, work, sync)
    vs = {b: stats([1.0]) for b in baseline_fns}
    vs.update(zip(rivals, ratios))
    return rates[0], vs


def measure(name, m, baselines, data, cfg, prompts, sync, decode, steps=None, static=None):
    """One model's row: speed against both cached baselines at batch 1 and batched, and each one's fastest decode
    against the strong baseline's static step (baselines[STATIC]); quality as it decodes, work and weight bytes per
    token, KV-cache bytes, and for a streaming model its decode past block_size against the nanoGPT baseline's
    uncached reference path and its loss there. decode: generate()'s engine and policy. steps: training steps
    (training_step) by model name, this one's and each baseline's, timed in turn. static: the model's own
    StaticDecoder, where it has one (its fastest decode: timed against the strong one's static step)."""
    n, runs = cfg['new_tokens'], cfg['runs']

    def gen(model, prompt, tokens, **policy):
        return lambda: model.generate(prompt, tokens, temperature=0, **policy)

    def timed(prompt):
        """n tokens after prompt: this model with its decode policy, in turn with each rival in full; with a static
        step of its own, that step in turn with the strong baseline's."""
        rivals = {b: gen(bm, prompt, n) for b, bm in baselines.items() if static is None or b != STATIC}
        rate, vs = against(name, gen(m, prompt, n, **decode), rivals, runs, n * prompt.size(0), sync)
        if static is not None:  # the strong baseline's own static step is the rival itself: exactly 1
            own = STATIC if static is baselines[STATIC] else name
            vs[STATIC] = against(own, gen(static, prompt, n), {STATIC: gen(baselines[STATIC], prompt, n)}, runs,
                                 n * prompt.size(0), sync)[1][STATIC]
        return rate, vs

    b1, b1_vs = timed(prompts[:1])
    batch, batch_vs = timed(prompts)
    q = decoded_loss(m, data, m.config.block_size, cfg['val_windows'], cfg['batch'], cfg['device'], **decode)
    stream, cache = greedy(m)
    for _ in stream(prompts[:1], n):
        pass
    cost = m.decode_cost((n + 1) / 2)  # mean positions attended over the generation
    row = dict(decode_tok_s=b1['median'], vs=b1_vs, batch_tok_s=batch['median'], batch_vs=batch_vs,
               val_loss=q['loss'], bits=bits(q['loss']), flops_per_token=q.get('flops_per_token', cost.flops),
               weight_bytes_per_token=cost.weight_bytes, kv_cache_bytes=sum(c.nbytes for c in cache),
               **{k: q[k] for k in ('mean_exit_layer', 'exit_layer_counts') if k in q})
    if getattr(m, 'streams', False):  # the reference path recomputes block_size positions every step
        base = baselines[BASELINES[0]]
        _, _, past = time_pair(gen(m, prompts[:1], cfg['past_tokens'], **decode),
                               gen(base, prompts[:1], cfg['past_tokens'], use_cache=False),
                               cfg['reference_runs'], cfg['past_tokens'], sync)
        row.update(past_tok_s=past['a']['median'], past_vs_reference=past['ratio'], **stream_quality(m, data, cfg))
    if steps:
        train, row['train_step_vs'] = against(name, steps[name], {b: steps[b] for b in BASELINES}, runs, 1, sync)
        row['train_steps_s'] = train['median']
    return row


def reference(base, cfg, prompts, sync):
    """nanoGPT's uncached generate against the cached baseline (batch 1, batched, and past block_size), and the
    decode roofline: how fast GEMVs over the baseline's own matrices read weights here, timed in turn with its
    batch-1 decode (bench_rows.roofline)."""
    def gen(prompt, tokens, use_cache):
        return lambda: base.generate(prompt, tokens, temperature=0, use_cache=use_cache)
    n, runs = cfg['new_tokens'], cfg['reference_runs']
    figures = {}
    for key, prompt, tokens in (('b1', prompts[:1], n), ('batch', prompts, n), ('past', prompts[:1], cfg['past_tokens'])):
        _, _, t = time_pair(gen(prompt, tokens, False), gen(prompt, tokens, True), runs, tokens * prompt.size(0), sync)
        figures.update({f'{key}_tok_s': t['a']['median'], f'{key}_vs_cached': t['ratio']})
    per_token = base.decode_cost((n + 1) / 2).weight_bytes
    sweep, read = gemv_sweeps(weight_matrices(base), n)
    _, (decode, speed), _ = time_rounds([gen(prompts[:1], n, True), sweep], cfg['runs'], [n, read], sync)
    return dict(figures, read_bytes_s=speed['median'], baseline_roofline_fraction=decode['median'] * per_token / speed['median'])


def stream_quality(m, data, cfg):
    """Does streaming cost quality? The val text's first stream_eval_tokens read as one stream, against the
    same positions past block_size scored in fixed block_size windows (each window's context starts afresh)."""
    n, T = cfg['stream_eval_tokens'], m.config.block_size
    inside, past = streaming_loss(m, data, n, device=cfg['device'])
    windows = evaluate_loss(m, data[T:n + 1], T, cfg['batch'], (n - T) // T, cfg['device'])
    return dict(stream_loss_inside_block=inside, stream_loss_past_block=past, window_loss_past_block=windows)


def exit_sweep(m, base, data, cfg, prompts, sync, decode):
    """Early exit's speed and decode-consistent loss at each threshold of exit_sweep (the plot's curve), timed
    against nanoGPT's cached baseline."""
    points, n = [], cfg['new_tokens']
    for threshold in (float(t) for t in cfg['exit_sweep'].split(',')):
        policy = {**decode, 'threshold': threshold}
        _, _, t = time_pair(lambda: m.generate(prompts[:1], n, temperature=0, **policy),
                            lambda: base.generate(prompts[:1], n, temperature=0), cfg['runs'], n, sync)
        q = decode_consistent_loss(m, data, m.config.block_size, cfg['val_windows'], policy['criterion'], threshold,
                                   cfg['device'])
        points.append(dict(threshold=threshold, tok_s=t['a']['median'], vs_cached=t['ratio'], val_loss=q['loss']))
    return points


def fmt_ratio(x):
    return f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})"


def delta(loss, reference):
    return f"{100 * (loss - reference) / reference:+.1f}%"


def fmt_row(name, r, rows, read_bytes_s):
    seconds = measured_seconds(r, r.get('iters_to_target'))
    to_target = f"{r['iters_to_target']} it, {seconds:.0f} s" if seconds else '—'
    whole = f"{r['final_val_loss']:.4f}" if r.get('final_val_loss') else '—'
    train = f"{r['train_tok_s']:,.0f}" if r.get('train_tok_s') else '—'
    roof = 100 * r['decode_tok_s'] * r['weight_bytes_per_token'] / read_bytes_s
    cells = [name, f"{r['decode_tok_s']:,.0f}", *(fmt_ratio(r['vs'][b]) if b in r['vs'] else '—' for b in RIVALS),
             f"{roof:.0f}%", f"{r['batch_tok_s']:,.0f}",
             *(fmt_ratio(r['batch_vs'][b]) if b in r['batch_vs'] else '—' for b in RIVALS), f"{r['val_loss']:.4f}",
             *(delta(r['val_loss'], rows[b]['val_loss']) for b in BASELINES), whole,
             f"{r['flops_per_token'] / 1e6:.2f}", f"{r['weight_bytes_per_token'] / 2**20:.2f}",
             f"{r['kv_cache_bytes'] / 1024:.0f}", train, to_target,
             *((fmt_ratio(r['train_step_vs'][b]) for b in BASELINES) if 'train_step_vs' in r else ('—', '—'))]
    return '| ' + ' | '.join(cells) + ' |'


def report(results, cfg, header):
    rows, ref = results['rows'], results['reference']
    print(header)
    print(f"\n{cfg['size']}-dim models on {cfg.get('dataset', 'shakespeare_char')}. Batch 1 and batch {cfg['batch']}: "
          f"{cfg['new_tokens']} new tokens after a one-token prompt; ratios are medians of per-round ratios against "
          f"each cached baseline (min-max). "
          f"Static step: each model's fastest decode (its own static-shape step where it has one) against the strong baseline's "
          f"static step{', both compiled' if cfg['compile'] else ''}; "
          f"{cfg['runs']} rounds ({cfg['reference_runs']} for the reference paths). % roofline: batch-1 weight bytes "
          f"read per second over the {ref['read_bytes_s'] / 1e9:.2f} GB/s that GEMVs over the baseline's matrices "
          f"read here. Val loss: as each model decodes, over the first {cfg['val_windows']} fixed windows of "
          f"val.bin; the whole-split loss is the training run's final evaluation. Train step speed: one step of "
          f"each model's own optimizer, timed in turn with the baselines'. Training time to "
          f"{results['target_loss']:.4f} (the strong baseline's final estimate): the first evaluation at or below "
          f"it, from the run's log, at that measured step speed. Train tok/s: from the run's log, as it ran")
    print(f"\n| model | tok/s b=1 | vs baseline | vs strong | static step vs strong's | % roofline | "
          f"tok/s b={cfg['batch']} | vs baseline | vs strong | static step vs strong's | val loss | Δ vs baseline | "
          f"Δ vs strong | whole-split loss | MFLOPs/token | weight MiB/token | "
          f"KV KiB | train tok/s | train time to {results['target_loss']:.4f} | train step speed vs baseline | "
          f"vs strong |")
    print('|---' * 21 + '|')
    print(f"| uncached reference (nanoGPT's generate) | {ref['b1_tok_s']:,.0f} | {fmt_ratio(ref['b1_vs_cached'])} | | | | "
          f"{ref['batch_tok_s']:,.0f} | {fmt_ratio(ref['batch_vs_cached'])} |" + ' |' * 14)
    for name, r in rows.items():
        print(fmt_row(name, r, rows, ref['read_bytes_s']))
    print(f"\n{cfg['past_tokens']} new tokens, past block_size, batch 1, against the nanoGPT baseline's uncached "
          f"reference path ({ref['past_tok_s']:,.0f} tok/s; the cached baseline recomputes the cropped context there "
          f"too, {fmt_ratio(ref['past_vs_cached'])} of its speed):\n")
    print(f"| model | tok/s | vs uncached reference | loss past block_size, streamed over {cfg['stream_eval_tokens']:,} "
          f"val tokens | the same positions in fixed windows |\n|---|---|---|---|---|")
    for name, r in rows.items():
        if 'past_tok_s' in r:
            x = r['past_vs_reference']
            print(f"| {name} | {r['past_tok_s']:,.0f} | {x['median']:.1f}x ({x['min']:.1f}-{x['max']:.1f}) | "
                  f"{r['stream_loss_past_block']:.4f} | {r['window_loss_past_block']:.4f} |")


def plot(results, folder):
    plt = pyplot()
    if plt is None:
        return
    os.makedirs(folder, exist_ok=True)
    rows, size = results['rows'], results['config']['size']
    infix = DATASETS[results['config'].get('dataset', 'shakespeare_char')][1]
    fig, (speed, train) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, r in rows.items():
        style = dict(marker='s', s=60, zorder=4) if name in BASELINES else dict(zorder=3)
        speed.scatter(r['decode_tok_s'], r['val_loss'], **style)
        speed.annotate(name, (r['decode_tok_s'], r['val_loss']), textcoords='offset points', xytext=(5, 4))
        if r.get('loss_curve'):
            iters, logged, losses = zip(*r['loss_curve'])
            seconds = [measured_seconds(r, i) for i in iters] if r.get('train_steps_s') else logged
            train.plot(seconds, losses, 'o-', ms=3, lw=2.2 if name in BASELINES else 1.2, label=name)
    if results.get('exit_sweep'):
        pts = results['exit_sweep']
        speed.plot([p['tok_s'] for p in pts], [p['val_loss'] for p in pts], 'o--', color='grey',
                   label='early exit, thresholds ' + ', '.join(str(p['threshold']) for p in pts))
        speed.legend(fontsize=8)
    speed.set_xscale('log')
    speed.set_xlabel('batch-1 decode, tokens/s (log)')
    speed.set_ylabel('val loss as decoded (nats/token)')
    speed.set_title(f'{size} dims: speed and quality (down and right is better)')
    train.set_xlabel('training seconds (iterations at the measured step speed)')
    train.set_ylabel('val loss (estimate)')
    train.set_title(f'{size} dims: val loss against training wall-clock')
    train.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, f'frontier_{size}{infix}.png'), dpi=120)
    for name, r in rows.items():
        if 'exit_layer_counts' not in r:
            continue
        counts = r['exit_layer_counts']
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(range(1, len(counts) + 1), [c / sum(counts) for c in counts])
        ax.set_xlabel('layers run before the token exits')
        ax.set_ylabel('fraction of val tokens')
        ax.set_title(f"{name}: {', '.join(f'{k} {v}' for k, v in MODELS[name][1].items())}")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f'{name}{infix}_exit_layers.png'), dpi=120)
    print(f"plots written to {folder}/")


def main():
    cfg = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__, describe(__file__))
    if cfg['report']:
        results, *later = [json.load(open(path)) for path in cfg['report'].split(',')]
        for more in later:
            results['rows'].update({n: r for n, r in more['rows'].items() if n not in BASELINES})
            results['header'] = f"{results.get('header', '')}\n{more.get('header', '')}"
        report(results, results['config'], results.get('header', ''))
        if cfg['plot']:
            plot(results, cfg['plot'])
        return
    if cfg['size'] not in SIZES:
        fail(f"--size={cfg['size']}: choose from {', '.join(map(str, SIZES))}")
    if cfg['dataset'] not in DATASETS:
        fail(f"--dataset={cfg['dataset']}: choose from {', '.join(DATASETS)}")
    names = model_names(cfg['models'])
    start = time.time()
    train_missing(names, cfg)
    if not cfg['measure']:
        return
    torch.set_num_threads(cfg['threads'])
    torch.manual_seed(1337)
    device = cfg['device']
    dtype = pick_dtype(cfg['dtype'], device)
    sync = synchronizer(device)
    loaded = {b: load(b, cfg) for b in BASELINES}
    baselines = {b: m for b, (m, _) in loaded.items()}
    baselines[STATIC] = StaticDecoder(baselines[BASELINES[1]], compile=cfg['compile'])
    base = baselines[BASELINES[0]]
    strong_history = loaded[BASELINES[1]][1].get('eval_history') or [dict(val_loss=0.0)]
    data = np.memmap(os.path.join(REPO, 'data', cfg['dataset'], 'val.bin'), dtype=np.uint16, mode='r')
    prompts = torch.randint(base.config.vocab_size, (cfg['batch'], 1), device=device)
    size = load_config_file(os.path.join(REPO, SIZES[cfg['size']][0]))
    x = torch.randint(base.config.vocab_size, (size['batch_size'], size['block_size']), device=device)  # (B, T)
    # training steps on copies of the models (a compiled model is not copied: no step timing then)
    steps = {} if cfg['compile'] else {b: training_step(m, ckpt, x) for b, (m, ckpt) in loaded.items()}
    results = dict(config=cfg, rows={}, torch=torch.__version__, threads=torch.get_num_threads(), device=device, dtype=dtype,
                   date=date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                   load_average=os.getloadavg(), target_loss=cfg['target_loss'] or strong_history[-1]['val_loss'])
    with torch.no_grad(), autocast(device, dtype):
        results['reference'] = reference(base, cfg, prompts, sync)
        for name in tqdm(names, unit='model', desc='measuring'):
            m, ckpt = loaded.get(name) or load(name, cfg)
            decode = MODELS[name][1] if name in MODELS else {}
            if steps and name not in steps:
                steps[name] = training_step(m, ckpt, x)
            static = baselines[STATIC] if name == BASELINES[1] else None if why_not_static(m) else \
                StaticDecoder(m, compile=cfg['compile'])
            row = measure(name, m, baselines, data, cfg, prompts, sync, decode, steps, static)
            if name not in BASELINES:
                steps.pop(name, None)
            results['rows'][name] = {**row, **training_figures(ckpt, results['target_loss'])}
            if decode.get('decode') == 'early_exit':
                results['exit_sweep'] = exit_sweep(m, base, data, cfg, prompts, sync, decode)
    results['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results['seconds'] = time.time() - start
    header = (f"bench_suite.py {' '.join(sys.argv[1:])}: {results['date']}, {results['machine']}, torch {torch.__version__}, "
              f"{device}, {dtype}, {'compiled' if cfg['compile'] else 'no compile'}, {results['threads']} thread(s), "
              f"load average {results['load_average'][0]:.1f}, {results['seconds'] / 60:.1f} min in all, "
              f"peak RSS {results['peak_rss_bytes'] / 2**20:.0f} MiB")
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
