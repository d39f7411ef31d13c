"""
The incremental-learning experiment: naive fine-tuning, EWC, replay, EWC + replay, importance-adaptive
learning rates and joint training (the upper bound) on the same task sequence, model, steps and seed.
$ python incremental_experiment.py                                   # A (Shakespeare), then B (Sherlock)
$ python incremental_experiment.py --tasks=A,B,C --json=incremental_abc.json --plot=incremental_abc.png
Tune a method with its settings, e.g. --methods=ewc --ewc_lambda=100; train_args goes to every
train_efficient.py run (e.g. --train_args="--iters_per_task=300 --seed=2"). Each method is a run of
config/train_incremental_char_cpu.py plus its keys, in out_dir/<tasks>-<method and settings>; a finished run
with the same command is read back from its checkpoint instead of trained again (--rerun trains it anyway).
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from checkpoint import load_checkpoint
from common import REPO, fail
from configurator import configure_or_exit, describe, load_config_file
from incremental_learning import backward_transfer, forgetting, parse_stages

CONFIG = os.path.join(REPO, 'config', 'train_incremental_char_cpu.py')
# each method's keys on top of the config (the settings' values come from the options below)
METHODS = {
    'naive': [],
    'ewc': ['fisher_batches', 'ewc_lambda', 'ewc_gamma'],
    'replay': ['replay_buffer_size', 'replay_ratio'],
    'ewc+replay': ['fisher_batches', 'ewc_lambda', 'ewc_gamma', 'replay_buffer_size', 'replay_ratio'],
    'adaptive_lr': ['fisher_batches', 'adaptive_lr_strength'],
    'joint': [],  # one stage of every task mixed, as many iterations as the whole sequence
}
SETTINGS = dict(  # the methods' settings, tuned on A -> B (docs/incremental.md)
    ewc_lambda=3.0,  # EWC penalty weight
    ewc_gamma=1.0,  # online EWC: decay of the accumulated Fisher at each stage
    fisher_batches=20,  # batches for the diagonal Fisher after each stage
    replay_buffer_size=2000,  # windows kept for replay
    replay_ratio=0.125,  # fraction of each batch replayed from earlier tasks
    adaptive_lr_strength=10.0,  # importance-adaptive learning rates: damping strength
)
DEFAULTS = dict(
    tasks='A,B',  # the sequence, e.g. A,B or A,B,C
    methods=','.join(METHODS),  # a comma list of the methods to run
    out_dir='out-incremental',  # runs go to out_dir/<tasks>-<method>
    json='',  # write every figure and the commands to this file
    plot='',  # write a PNG of the final losses (needs matplotlib)
    jobs=1,  # runs at a time
    rerun=False,  # train again even if a finished run is there
    train_args='',  # more train_efficient.py arguments for every run, e.g. '--iters_per_task=300 --seed=2'
    **SETTINGS,
)


def setting(key, extra):
    """An integer setting of the runs: the last --key=value in extra, else the config file's."""
    given = [a.split('=', 1)[1] for a in extra if a.startswith(f'--{key}=')]
    return int(given[-1]) if given else load_config_file(CONFIG)[key]


def run_name(method, settings):
    """The run's folder name: the method and the values of its tuned settings, e.g. ewc-ewc_lambda10."""
    tuned = [k for k in METHODS[method] if k not in ('fisher_batches', 'replay_buffer_size', 'ewc_gamma') or settings[k] != SETTINGS[k]]
    return '-'.join([method] + [f"{k}{settings[k]:g}" for k in tuned])


def command(method, stages, settings, out_dir, extra):
    keys = [f"--incremental_tasks={','.join('+'.join(s) for s in stages)}"] + [f'--{k}={settings[k]}' for k in METHODS[method]]
    if method == 'joint':  # the same total steps and one schedule over them
        n = len(stages)
        keys = [f"--incremental_tasks={'+'.join(t for s in stages for t in s)}",
                f"--iters_per_task={n * setting('iters_per_task', extra)}", f"--lr_decay_iters={n * setting('lr_decay_iters', extra)}"]
    return [sys.executable, os.path.join(REPO, 'train_efficient.py'), CONFIG, *keys, *extra,
            f'--out_dir={out_dir}', '--progress=False']


def run(method, cmd, out_dir, n_stages, rerun):
    """Train (unless a finished run with the same command is there) and return the checkpoint's R matrix."""
    ckpt_path, cmd_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'command.json')
    done = (os.path.exists(ckpt_path) and os.path.exists(cmd_path) and json.load(open(cmd_path)) == cmd[2:]
            and len(load_checkpoint(ckpt_path)['incremental']['R']) == n_stages)
    seconds = None
    if rerun or not done:
        os.makedirs(out_dir, exist_ok=True)
        print(f"[{method}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        with open(os.path.join(out_dir, 'train.log'), 'w') as log:
            r = subprocess.run(cmd + ['--overwrite=True'], stdout=log, stderr=subprocess.STDOUT)  # a stale run
        if r.returncode != 0:
            with open(os.path.join(out_dir, 'train.log')) as log:
                last = (log.read().strip().splitlines() or [''])[-1]
            fail(f"{method} failed (exit {r.returncode}): {last} (log: {os.path.join(out_dir, 'train.log')})")
        seconds = time.time() - t0
        json.dump(cmd[2:], open(cmd_path, 'w'))
        print(f"[{method}] done in {seconds:.0f} s", flush=True)
    ckpt = load_checkpoint(ckpt_path)
    return dict(R=ckpt['incremental']['R'], seconds=seconds, command=' '.join(['python'] + [os.path.relpath(c, REPO) if os.path.isabs(c) else c for c in cmd[1:]]))


def summarize(results, tasks, stages, methods):
    """Per method: final loss per task, forgetting per task, backward transfer, and against naive: the
    share of forgetting removed and the last task's loss ratio."""
    learned = [next(i for i, s in enumerate(stages) if t in s) for t in tasks]
    rows = {}
    for m in methods:
        R = results[m]['R']
        f = forgetting(R, learned) if m != 'joint' else {}
        rows[m] = dict(final={t: R[-1][j] for j, t in enumerate(tasks)},
                       forgetting={tasks[j]: v for j, v in f.items()},
                       backward_transfer=backward_transfer(R, learned) if m != 'joint' else None)
    if 'naive' in rows:
        naive = rows['naive']
        for m, row in rows.items():
            row['forgetting_cut'] = {t: 1 - v / naive['forgetting'][t] for t, v in row['forgetting'].items()
                                     if naive['forgetting'].get(t, 0) > 0}
            row['last_task_vs_naive'] = row['final'][tasks[-1]] / naive['final'][tasks[-1]] - 1
    return rows


def print_tables(results, rows, tasks, stages):
    for m, res in results.items():
        names = ['+'.join(tasks)] if m == 'joint' else ['+'.join(s) for s in stages]
        print(f"\n{m}: R[i][j] = val loss on task j (columns) after stage i (rows)" +
              (f", trained in {res['seconds']:.0f} s" if res['seconds'] else ""))
        print("        " + "".join(f"{t:>9}" for t in tasks))
        for name, r in zip(names, res['R']):
            print(f"{name:<8}" + "".join(f"{v:9.4f}" for v in r))
    earlier = tasks[:-1]
    head = (f"{'method':<12}" + "".join(f"{'final ' + t:>9}" for t in tasks) + "".join(f"{'forget ' + t:>10}" for t in earlier)
            + f"{'BWT':>9}" + "".join(f"{'cut ' + t:>8}" for t in earlier) + f"{tasks[-1] + ' vs naive':>13}")
    print("\nval loss in nats/token on fixed windows; forgetting = final loss - best earlier loss on that task;")
    print("cut = share of naive's forgetting removed; last column: final loss on the last task against naive's")
    print(head)
    for m, row in rows.items():
        print(f"{m:<12}" + "".join(cell(row['final'][t], '9.4f') for t in tasks)
              + "".join(cell(row['forgetting'].get(t), '+10.4f') for t in earlier)
              + cell(row['backward_transfer'], '+9.4f')
              + "".join(cell(row.get('forgetting_cut', {}).get(t), '8.0%') for t in earlier)
              + cell(row.get('last_task_vs_naive'), '+13.1%'))


def cell(value, spec):
    """value formatted with spec, or a dash as wide when there is none (e.g. forgetting of joint training)."""
    return f"{'-':>{int(spec.strip('+').split('.')[0])}}" if value is None else f"{value:{spec}}"


def plot(rows, tasks, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'efficientgpt[plot]')")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(tasks)
    for k, t in enumerate(tasks):
        ax.bar([i + k * width for i in range(len(rows))], [r['final'][t] for r in rows.values()], width, label=f"task {t}")
    ax.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(rows))], list(rows))
    ax.set_ylabel('val loss after the last stage (nats/token)')
    ax.set_ylim(min(r['final'][t] for r in rows.values() for t in tasks) * 0.9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main():
    cfg = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__, describe(__file__))
    try:
        stages = parse_stages(cfg['tasks'])
    except ValueError as e:
        fail(e)
    tasks = list(dict.fromkeys(t for s in stages for t in s))
    methods = cfg['methods'].split(',')
    extra = cfg['train_args'].split()
    if unknown := [m for m in methods if m not in METHODS]:
        fail(f"unknown methods {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if stray := [a for a in extra if not a.startswith('--')]:
        fail(f"--train_args holds {' '.join(stray)}: give train_efficient.py keys as --key=value")
    if cfg['jobs'] < 1:
        fail(f"--jobs must be at least 1, not {cfg['jobs']}")
    jobs = {}
    with ThreadPoolExecutor(cfg['jobs']) as pool:
        for m in methods:
            settings = {k: cfg[k] for k in SETTINGS}
            out = os.path.join(cfg['out_dir'], f"{cfg['tasks'].replace(',', '')}-{run_name(m, settings)}")
            n = 1 if m == 'joint' else len(stages)
            jobs[m] = pool.submit(run, m, command(m, stages, settings, out, extra), out, n, cfg['rerun'])
    results = {m: job.result() for m, job in jobs.items()}
    rows = summarize(results, tasks, stages, methods)
    print_tables(results, rows, tasks, stages)
    if cfg['json']:
        with open(cfg['json'], 'w') as f:
            json.dump(dict(tasks=cfg['tasks'], extra=extra, methods={m: {**results[m], **rows[m]} for m in methods}),
                      f, indent=1)
        print(f"figures written to {cfg['json']}")
    if cfg['plot']:
        plot(rows, tasks, cfg['plot'])


if __name__ == '__main__':
    main()
