"""
The incremental-learning experiment: naive fine-tuning, every method and joint training (the reference) on the
same task sequence, model, steps and seed, one training process per run, --jobs at a time with one thread each.
$ python incremental_experiment.py --json=incremental.json --plot=incremental.png   # A -> B -> C, default methods
$ python incremental_experiment.py --methods=all                                    # every method
$ python incremental_experiment.py --methods=replay --sweep=replay_ratio=0.01,0.05,0.125,0.25,0.5
$ python incremental_experiment.py --methods=naive,replay,joint --sweep=stage_lr_peak=1,0.5,0.25
The headline, per sequence A -> B and A -> B -> C: each task's loss after the sequence and its gap to joint
training over the same datasets and total steps, forgetting and backward transfer. --sweep takes a setting below,
or any train_efficient.py key (given to every sequential run); train_args goes to every run (e.g.
--train_args="--iters_per_task=100 --seed=2"). Each run is config/train_incremental_char_cpu.py plus its keys,
in out_dir/<tasks>-<run>; a finished run with the same command is read back instead of trained again.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from checkpoint import load_checkpoint
from common import REPO, fail, pyplot
from configurator import configure_or_exit, describe, load_config_file
from incremental_learning import backward_transfer, forgetting, parse_stages

CONFIG = os.path.join(REPO, 'config', 'train_incremental_char_cpu.py')
# each method's train_efficient.py keys on top of the config, from the settings s (the options below)
METHODS = {
    'naive': lambda s: {},
    'ewc': lambda s: dict(fisher_batches=s['fisher_batches'], ewc_lambda=s['ewc_lambda'], ewc_gamma=s['ewc_gamma']),
    'ewc_per_task': lambda s: dict(fisher_batches=s['fisher_batches'], ewc_lambda=s['ewc_lambda'], ewc_mode='per_task'),
    'si': lambda s: dict(importance='si', ewc_lambda=s['si_lambda']),
    'mas': lambda s: dict(importance='mas', fisher_batches=s['fisher_batches'], ewc_lambda=s['mas_lambda']),
    'replay': lambda s: dict(replay_buffer_size=s['replay_buffer_size'], replay_ratio=s['replay_ratio'],
                             replay_balance=s['replay_balance']),
    'ewc+replay': lambda s: {**METHODS['ewc'](s), **METHODS['replay'](s)},
    'adaptive_lr': lambda s: dict(fisher_batches=s['fisher_batches'], adaptive_lr_strength=s['adaptive_lr_strength']),
    'protect': lambda s: dict(fisher_batches=s['fisher_batches'], protect_fraction=s['protect_fraction'],
                              protect_scale=s['protect_scale']),
    'joint': lambda s: {},  # one stage of every task mixed, as many iterations as the whole sequence
}
SETTINGS = dict(  # the methods' settings (docs/incremental.md)
    ewc_lambda=3.0,  # EWC penalty weight (ewc, ewc_per_task, ewc+replay)
    ewc_gamma=1.0,  # online EWC: decay of the accumulated Fisher at each stage
    # SI's and MAS's weights give their importance the Fisher's mean weight at ewc_lambda 3: after 150 iterations of
    # A the mean Fisher is 3.3e-4, MAS's 1.1e-4, SI's 8.1e-3 (docs/incremental.md)
    si_lambda=0.1,  # the penalty weight with Synaptic Intelligence's importance (si)
    mas_lambda=10.0,  # the penalty weight with Memory Aware Synapses' importance (mas)
    fisher_batches=20,  # batches for the Fisher (or MAS) after each stage
    # windows kept for replay: 8,000 keeps every window the default stages train on (7,200 over A -> B -> C);
    # 2,000 left B 3.8% above joint training after A -> B -> C, 8,000 3.3% (docs/incremental.md)
    replay_buffer_size=8000,
    # fraction of each batch replayed from earlier tasks: 0.5 came closest to joint training of 0.125, 0.25 and 0.5
    replay_ratio=0.5,
    # replayed windows uniform over the buffer ('windows': A, trained longest, is replayed most) or each earlier
    # task an equal share ('tasks', as joint training mixes them): the worst gap to joint 3.3% -> 2.2%
    replay_balance='tasks',
    adaptive_lr_strength=10.0,  # importance-adaptive learning rates: damping strength
    protect_fraction=0.01,  # protect: the top fraction of weights by Fisher whose updates are scaled
    protect_scale=0.0,  # protect: their update scale (0: frozen)
)
DEFAULTS = dict(
    tasks='A,B,C',  # the sequence, e.g. A,B or A,B,C
    methods='naive,ewc,replay,ewc+replay,adaptive_lr,joint',  # a comma list of methods, or 'all'
    sweep='',  # 'key=v1,v2,...': a run of each method the key changes per value, e.g. 'replay_ratio=0.05,0.25'
    out_dir='out-incremental',  # runs go to out_dir/<tasks>-<run>
    json='',  # write every figure and the commands to this file
    plot='',  # write a PNG of each task's loss over the stages, a line per run (needs matplotlib)
    jobs=os.cpu_count() or 1,  # runs at a time, each with one thread (default: the number of cores)
    rerun=False,  # train again even if a finished run is there
    train_args='',  # more train_efficient.py arguments for every run, e.g. '--iters_per_task=300 --seed=2'
    **SETTINGS,
)


def setting(key, extra):
    """An integer setting of the runs: the last --key=value in extra, else the config file's."""
    given = [a.split('=', 1)[1] for a in extra if a.startswith(f'--{key}=')]
    return int(given[-1]) if given else load_config_file(CONFIG)[key]


def plan(methods, stages, settings, sweep):
    """{run label: (method, train_efficient.py keys)}. Joint training runs over each prefix of two or more
    stages (the reference of A -> B and of A -> B -> C), labelled 'joint A+B'; the full sequence's is 'joint'.
    A sweep gives every method it changes a run per value, labelled e.g. 'replay replay_ratio=0.25'."""
    runs = {}
    key, _, values = sweep.partition('=')
    for m in methods:
        if m == 'joint':
            n = len(stages)
            for k in range(min(2, n), n + 1):
                tasks = '+'.join(t for s in stages[:k] for t in s)
                runs['joint' if k == n else f'joint {tasks}'] = ('joint', dict(incremental_tasks=tasks, stages=k))
            continue
        base = METHODS[m](settings)
        variants = [(m, base)]
        if key:
            variants = []
            for v in values.split(','):
                keys = METHODS[m]({**settings, key: type(settings[key])(v)}) if key in settings else {**base, key: v}
                variants.append((f'{m} {key}={v}', keys))
            if all(k == base for _, k in variants):  # the key does not touch this method
                variants = [(m, base)]
        for label, keys in variants:
            runs[label] = (m, dict(incremental_tasks=','.join('+'.join(s) for s in stages), **keys))
    return runs


def command(keys, extra, out_dir):
    keys, last = dict(keys), []
    if 'stages' in keys:  # joint over k stages: the same total steps and one schedule over them
        k, n = keys.pop('stages'), setting('iters_per_task', extra)
        total = (setting('first_stage_iters', extra) or n) + (k - 1) * n
        keys.update(iters_per_task=total, lr_decay_iters=total * setting('lr_decay_iters', extra) // n)
        if any(a.startswith('--first_stage_iters=') for a in extra):
            last = ['--first_stage_iters=0']  # its one stage has the sequence's total already
    return [sys.executable, os.path.join(REPO, 'train_efficient.py'), CONFIG, *[f'--{k}={v}' for k, v in keys.items()],
            *extra, *last, f'--out_dir={out_dir}', '--progress=False']


def run(label, cmd, out_dir, n_stages, rerun):
    """Train with one thread (unless a finished run with the same command is there); the checkpoint's R
    matrix and diagnostics."""
    ckpt_path, cmd_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'command.json')
    done = (os.path.exists(ckpt_path) and os.path.exists(cmd_path) and json.load(open(cmd_path)) == cmd[2:]
            and len(load_checkpoint(ckpt_path)['incremental']['R']) == n_stages)
    seconds = None
    if rerun or not done:
        os.makedirs(out_dir, exist_ok=True)
        print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        with open(os.path.join(out_dir, 'train.log'), 'w') as log:
            r = subprocess.run(cmd + ['--overwrite=True'], stdout=log, stderr=subprocess.STDOUT,  # a stale run
                               env={**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'})
        if r.returncode != 0:
            with open(os.path.join(out_dir, 'train.log')) as log:
                last = (log.read().strip().splitlines() or [''])[-1]
            fail(f"{label} failed (exit {r.returncode}): {last} (log: {os.path.join(out_dir, 'train.log')})")
        seconds = time.time() - t0
        json.dump(cmd[2:], open(cmd_path, 'w'))
        print(f"[{label}] done in {seconds:.0f} s", flush=True)
    state = load_checkpoint(ckpt_path)['incremental']
    return dict(R=state['R'], diagnostics=state['diagnostics'], seconds=seconds,
                command=' '.join(['python'] + [os.path.relpath(c, REPO) if os.path.isabs(c) else c for c in cmd[1:]]))


def summarize(results, runs, stages):
    """The headline per sequence (the first k + 1 stages, for each k >= 1 with a joint run over them): per run,
    each learned task's loss, its gap to joint training (loss / joint's - 1), the worst gap, forgetting and
    backward transfer. Details: the share of naive fine-tuning's forgetting removed, the last task's loss
    against naive's."""
    tasks = list(dict.fromkeys(t for s in stages for t in s))
    learned = [next(i for i, s in enumerate(stages) if t in s) for t in tasks]
    sequential = [label for label, (m, _) in runs.items() if m != 'joint']
    joints = {keys['stages'] - 1: label for label, (m, keys) in runs.items() if m == 'joint'}
    headline = {}
    for k in range(1, len(stages)):
        name = ' -> '.join('+'.join(s) for s in stages[:k + 1])
        seen = [j for j, s in enumerate(learned) if s <= k]
        joint = {tasks[j]: v for j, v in zip(seen, results[joints[k]]['R'][-1])} if k in joints else None
        rows = {}
        for label in sequential:
            R = [row[:len(seen)] for row in results[label]['R'][:k + 1]]
            loss = {tasks[j]: R[k][j] for j in seen}
            gap = {t: v / joint[t] - 1 for t, v in loss.items()} if joint else {}
            rows[label] = dict(loss=loss, gap_to_joint=gap, worst_gap=max(gap.values()) if gap else None,
                               forgetting={tasks[j]: v for j, v in forgetting(R, learned[:len(seen)]).items()},
                               backward_transfer=backward_transfer(R, learned[:len(seen)]))
        if joint:
            rows[joints[k]] = dict(loss=joint, gap_to_joint={t: 0.0 for t in joint}, worst_gap=0.0, forgetting={},
                                   backward_transfer=None)
        headline[name] = rows
    details = {}
    if 'naive' in results and headline:
        last = headline[' -> '.join('+'.join(s) for s in stages)]
        naive = last['naive']
        for label in sequential:
            row = last[label]
            details[label] = dict(
                forgetting_cut={t: 1 - v / naive['forgetting'][t] for t, v in row['forgetting'].items() if naive['forgetting'][t] > 0},
                last_task_vs_naive=row['loss'][tasks[-1]] / naive['loss'][tasks[-1]] - 1)
    return headline, details


def print_tables(results, runs, stages, headline, details):
    tasks = list(dict.fromkeys(t for s in stages for t in s))
    for label, res in results.items():
        names = [runs[label][1]['incremental_tasks']] if runs[label][0] == 'joint' else ['+'.join(s) for s in stages]
        print(f"\n{label}: R[i][j] = val loss on task j (columns) after stage i (rows)" +
              (f", trained in {res['seconds']:.0f} s" if res['seconds'] else ""))
        print("        " + "".join(f"{t:>9}" for t in tasks))
        for name, r in zip(names, res['R']):
            print(f"{name:<8}" + "".join(f"{v:9.4f}" for v in r))
        for d in res['diagnostics']:
            print(f"  after {names[d['stage']]}: the top 10% of weights by importance hold {d['importance']:.0%} of it, "
                  f"{d['movement']:.0%} of the movement since the anchor, {d['penalty']:.0%} of the penalty")
    width = max(len(label) for label in results) + 1
    print("\nval loss in nats/token on fixed windows (gap to joint training over the same datasets and steps);")
    print("forgetting = loss after the sequence - best earlier loss on that task; BWT = backward transfer")
    for name, rows in headline.items():
        seen = list(next(iter(rows.values()))['loss'])
        print(f"\n{name}\n{'run':<{width}}" + "".join(f"{t:>18}" for t in seen) + f"{'worst gap':>10}"
              + "".join(f"{'forget ' + t:>10}" for t in seen[:-1]) + f"{'BWT':>9}")
        for label, row in rows.items():
            print(f"{label:<{width}}" + "".join(f"{row['loss'][t]:9.4f} ({cell(row['gap_to_joint'].get(t), '+6.1%')})" for t in seen)
                  + cell(row['worst_gap'], '+10.1%') + "".join(cell(row['forgetting'].get(t), '+10.4f') for t in seen[:-1])
                  + cell(row['backward_transfer'], '+9.4f'))
        gaps = [(r['worst_gap'], label) for label, r in rows.items() if runs[label][0] != 'joint' and r['worst_gap'] is not None]
        if gaps:
            print(f"closest to joint: {min(gaps)[1]} (worst gap {min(gaps)[0]:+.1%})")
    if details:
        print(f"\ndetails, {' -> '.join(tasks)}: share of naive fine-tuning's forgetting removed; the last task's loss against naive's")
        for label, d in details.items():
            print(f"{label:<{width}}" + "".join(f"  cut {t} {cell(v, '4.0%')}" for t, v in d['forgetting_cut'].items())
                  + f"  {tasks[-1]} {cell(d['last_task_vs_naive'], '+.1%')}")


def cell(value, spec):
    """value formatted with spec, or a dash as wide when there is none (e.g. forgetting of joint training)."""
    width = int(spec.strip('+').split('.')[0] or 0)
    return f"{'-':>{width}}" if value is None else f"{value:{spec}}"


def plot(results, runs, stages, path):
    """One panel per task: its loss after each stage from the stage that learns it, a line per sequential run;
    joint training over the stages so far dashed."""
    plt = pyplot()
    if plt is None:
        return
    tasks = list(dict.fromkeys(t for s in stages for t in s))
    names = ['+'.join(s) for s in stages]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for j, (t, ax) in enumerate(zip(tasks, axes[0])):
        first = next(i for i, s in enumerate(stages) if t in s)
        for label, res in results.items():
            method, keys = runs[label]
            if method != 'joint':
                ax.plot(range(first, len(stages)), [row[j] for row in res['R'][first:]], marker='o', label=label)
        joint = sorted((runs[label][1]['stages'] - 1, res['R'][-1][j]) for label, res in results.items()
                       if runs[label][0] == 'joint' and j < len(res['R'][-1]))
        if joint:
            ax.plot(*zip(*joint), 'k--', marker='s', label='joint')
        ax.set_xticks(range(len(stages)), [f'after {n}' for n in names])
        ax.set_title(f'task {t}')
        ax.set_ylabel('val loss (nats/token)')
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main():
    cfg = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__, describe(__file__))
    try:
        stages = parse_stages(cfg['tasks'])
    except ValueError as e:
        fail(e)
    methods = list(METHODS) if cfg['methods'] == 'all' else cfg['methods'].split(',')
    extra = cfg['train_args'].split()
    if unknown := [m for m in methods if m not in METHODS]:
        fail(f"unknown methods {', '.join(unknown)}; known: {', '.join(METHODS)} (or 'all')")
    if stray := [a for a in extra if not a.startswith('--')]:
        fail(f"--train_args holds {' '.join(stray)}: give train_efficient.py keys as --key=value")
    if cfg['sweep'] and ('=' not in cfg['sweep'] or not cfg['sweep'].split('=', 1)[1]):
        fail(f"--sweep={cfg['sweep']!r}: give key=v1,v2,..., e.g. replay_ratio=0.05,0.25")
    if cfg['jobs'] < 1:
        fail(f"--jobs must be at least 1, not {cfg['jobs']}")
    try:
        runs = plan(methods, stages, {k: cfg[k] for k in SETTINGS}, cfg['sweep'])
    except ValueError as e:  # a sweep value that is not a number
        fail(f"--sweep={cfg['sweep']!r}: {e}")
    t0 = time.time()
    with ThreadPoolExecutor(cfg['jobs']) as pool:
        out = {label: os.path.join(cfg['out_dir'], f"{cfg['tasks'].replace(',', '')}-{label.replace(' ', '-')}") for label in runs}
        longest_first = sorted(runs, key=lambda label: -runs[label][1].get('stages', len(stages)))  # shorter wall time
        jobs = {label: pool.submit(run, label, command(runs[label][1], extra, out[label]), out[label],
                                   1 if runs[label][0] == 'joint' else len(stages), cfg['rerun'])
                for label in longest_first}
    results = {label: jobs[label].result() for label in runs}
    wall = time.time() - t0
    headline, details = summarize(results, runs, stages)
    print_tables(results, runs, stages, headline, details)
    print(f"\n{len(runs)} runs, {cfg['jobs']} at a time: {wall:.0f} s wall time")
    if cfg['json']:
        with open(cfg['json'], 'w') as f:
            json.dump(dict(tasks=cfg['tasks'], train_args=extra, jobs=cfg['jobs'], wall_seconds=wall, headline=headline,
                           details=details, runs={label: dict(method=runs[label][0], **results[label]) for label in runs}),
                      f, indent=1)
        print(f"figures written to {cfg['json']}")
    if cfg['plot']:
        plot(results, runs, stages, cfg['plot'])


if __name__ == '__main__':
    main()
