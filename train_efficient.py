"""
Train a baseline GPT or an EfficientGPT. One linear script, like nanoGPT's train.py.

On one CPU or GPU:
$ python train_efficient.py config/train_shakespeare_char_cpu.py
Override any key from the command line:
$ python train_efficient.py config/train_shakespeare_char_cpu.py --max_iters=500 --model_type=efficient
Incremental learning, task A then task B, with EWC and replay (incremental_learning.py):
$ python train_efficient.py config/train_incremental_char_cpu.py --fisher_batches=20 --ewc_lambda=3 --replay_buffer_size=2000 --replay_ratio=0.125
Resume a run exactly where it stopped (Ctrl-C writes a checkpoint first):
$ python train_efficient.py config/train_shakespeare_char_cpu.py --init_from=resume
DDP on 4 GPUs of one node (gloo on CPU: add --device=cpu):
$ torchrun --standalone --nproc_per_node=4 train_efficient.py config/train_shakespeare_char.py
"""

import inspect
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
from torch.distributed import all_reduce, destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import build_model, load_checkpoint, model_checkpoint, save_checkpoint
from common import autocast, dataset_dir, fail, pick_device, pick_dtype
from configurator import configure_or_exit, describe, print_config
from evaluate import bits, evaluate_loss
from incremental_learning import IncrementalLearner, task_files
from model import GPTConfig
from model_efficient import EfficientGPTConfig
from tokenizer import ensure_prepared, read_meta, vocabulary_difference

# -----------------------------------------------------------------------------
# default config values: a small character model that trains on a laptop CPU in minutes
# I/O
out_dir = 'out'
eval_interval = 250  # estimate losses and write the checkpoint every this many iterations
log_interval = 10
eval_iters = 20  # batches per random-batch loss estimate (logs only; see final_eval_windows)
final_eval_windows = -1  # deterministic val loss at the end over this many fixed windows; -1: whole split, 0: skip
eval_only = False
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
progress = True  # progress bar with loss and tokens/s
# wandb logging (optional extra, off by default)
wandb_log = False
wandb_project = 'efficientgpt'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'  # a folder under data/, or a path to a folder with train.bin, val.bin, meta.json
gradient_accumulation_steps = 1
batch_size = 12
# incremental learning (incremental_learning.py): tasks data_dir/{task}_train.bin, _val.bin over one vocabulary
incremental_tasks = ''  # '' trains on train.bin; 'A,B,C': A, then B, then C; 'A+B': one stage of A and B mixed (joint)
iters_per_task = 1000  # iterations per stage (max_iters becomes their total); the lr schedule restarts every stage
ewc_lambda = 0.0  # EWC: adds ewc_lambda * sum F * (theta - theta*)^2 after the first stage
ewc_gamma = 1.0  # online EWC: F <- ewc_gamma * F + F_new after each stage (1: every task counts fully)
fisher_batches = 0  # batches for the diagonal Fisher after each stage (EWC, adaptive lr); 0: no Fisher
replay_buffer_size = 0  # windows kept by reservoir sampling over all training windows; 0: no buffer
replay_ratio = 0.0  # fraction of each training batch replayed from earlier tasks (round half up)
adaptive_lr_strength = 0.0  # each parameter's update scaled by 1 / (1 + strength * F / mean F)
# model: 'gpt' (model.py) or 'efficient' (model_efficient.py); every field of EfficientGPTConfig is a key too
model_type = 'gpt'
# adamw optimizer
learning_rate = 1e-3
max_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip gradients at this norm; 0 disables
# learning rate schedule: linear warm-up, then cosine decay to min_lr
decay_lr = True
warmup_iters = 100
lr_decay_iters = 2000
min_lr = 1e-4
# system
device = 'auto'  # 'auto' picks cuda, then mps, then cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto': bfloat16 autocast on CUDA when supported, else float16 (with GradScaler); float32 elsewhere
compile = False  # torch.compile the model
seed = 1337
# -----------------------------------------------------------------------------
model_defaults = {f.name: f.default for f in fields(EfficientGPTConfig) if f.name != 'vocab_size'}
model_defaults.update(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
script_defaults = {k: v for k, v in globals().items()
                   if not k.startswith('_') and isinstance(v, (int, float, bool, str)) and k not in ('math', 'np')}
config = configure_or_exit({**script_defaults, **model_defaults}, sys.argv[1:], __doc__,
                           describe(__file__, *map(inspect.getsourcefile, (EfficientGPTConfig, GPTConfig))))
globals().update(config)
# -----------------------------------------------------------------------------


if model_type not in ('gpt', 'efficient'):
    fail(f"model_type must be 'gpt' or 'efficient', not {model_type!r}")
if model_type == 'gpt':
    gpt_keys = {f.name for f in fields(GPTConfig)}
    stray = [k for k, v in model_defaults.items() if k not in gpt_keys and config[k] != v]
    if stray:
        fail(f"{', '.join(stray)} only apply to model_type='efficient'")
incremental_keys = ('iters_per_task', 'ewc_lambda', 'ewc_gamma', 'fisher_batches', 'replay_buffer_size', 'replay_ratio', 'adaptive_lr_strength')
if not incremental_tasks and any(config[k] != script_defaults[k] for k in incremental_keys):
    fail(f"{', '.join(k for k in incremental_keys if config[k] != script_defaults[k])}: these keys need incremental_tasks (e.g. incremental_tasks='A,B')")
if init_from not in ('scratch', 'resume'):
    fail(f"init_from must be 'scratch' or 'resume', not {init_from!r}")

# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a torchrun launch?
device = pick_device(device)
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
if ddp:
    init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0  # this process does the logging, checkpointing etc.
    seed_offset = ddp_rank  # each process gets a different seed
    assert gradient_accumulation_steps % ddp_world_size == 0, "gradient_accumulation_steps must divide by the world size"
    gradient_accumulation_steps //= ddp_world_size
else:
    master_process, seed_offset, ddp_world_size = True, 0, 1
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    print_config(config)
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
    os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed + seed_offset)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
dtype = pick_dtype(dtype, device)
ctx = autocast(device, dtype)

# data: memmaps are re-created per batch to avoid a memory leak (as in nanoGPT)
data_dir = dataset_dir(dataset)
if master_process:
    try:
        ensure_prepared(data_dir, task_files(incremental_tasks) if incremental_tasks else ('train.bin', 'val.bin'))
    except FileNotFoundError as e:
        fail(e)
if ddp:
    torch.distributed.barrier()
meta = read_meta(data_dir) or fail(f"{data_dir} has no meta.json: prepare it with data/prepare_text.py")
train_batches = torch.Generator().manual_seed(seed + seed_offset)  # its state is checkpointed: resume is exact
learner = None  # the task sequence of incremental learning, or None for one dataset
if incremental_tasks:
    try:
        learner = IncrementalLearner(data_dir, meta, config, device)
    except ValueError as e:
        fail(e)
    max_iters = learner.max_iters
    if master_process:
        print(f"incremental learning: stages {incremental_tasks}, {iters_per_task} iterations each, max_iters={max_iters}")


def get_batch(split, generator):
    if learner is not None:  # the current task's windows
        return learner.get_batch(split, generator)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# model
iter_num, best_val_loss = 0, float('inf')
# each evaluation's {iter, tokens, train_seconds, val_loss}: bench_suite.py reads time to a target loss from it
eval_history, train_seconds = [], 0.0
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'scratch':
    model_args = {k: config[k] for k in model_defaults if k in {f.name for f in fields(GPTConfig)} or model_type == 'efficient'}
    model_args['vocab_size'] = meta['vocab_size']
    print(f"initializing a new {model_type} model from scratch")
    model = build_model(model_type, model_args)
    checkpoint = None
else:
    print(f"resuming training from {ckpt_path}")
    try:
        checkpoint = load_checkpoint(ckpt_path, map_location=device)
        model = build_model(checkpoint['model_type'], checkpoint['model_args'])
    except ValueError as e:
        fail(e)
    model.load_state_dict(checkpoint['model'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    eval_history = checkpoint.get('eval_history', [])
    train_seconds = eval_history[-1]['train_seconds'] if eval_history else 0.0
    if checkpoint['meta'] != meta:
        fail(f"the vocabulary of {data_dir} differs from the checkpoint's ({vocabulary_difference(checkpoint['meta'], meta)}): "
             "resume on the data it was trained on; a checkpoint's tokens are never remapped")
    if learner is not None:
        try:
            learner.load_state_dict(checkpoint.get('incremental'))
        except ValueError as e:
            fail(e)
model.to(device)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    train_batches.set_state(checkpoint['rng']['train_batches'])
    torch.set_rng_state(checkpoint['rng']['torch'])
    if device_type == 'cuda' and checkpoint['rng'].get('cuda'):
        torch.cuda.set_rng_state_all(checkpoint['rng']['cuda'])
    checkpoint = None  # free up memory
raw_model = model
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters random batches per split, drawn from a fixed generator so that
    evaluating never moves the training randomness (a resumed run stays identical)."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        batches = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, batches)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    """Linear warm-up for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # goes 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def write_checkpoint(**extra):
    ckpt = model_checkpoint(raw_model, meta)
    ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                best_val_loss=best_val_loss, eval_history=eval_history, config=config, **extra,
                rng=dict(torch=torch.get_rng_state(), train_batches=train_batches.get_state(),
                         cuda=torch.cuda.get_rng_state_all() if device_type == 'cuda' else []))
    if learner:
        ckpt['incremental'] = learner.state_dict()  # EWC state, replay buffer, stage and R matrix
    save_checkpoint(ckpt, ckpt_path)


# Ctrl-C asks the loop to stop at the end of the current iteration and write a checkpoint;
# a second Ctrl-C stops at once.
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    if stop_requested:
        raise KeyboardInterrupt
    stop_requested = True
    if master_process:
        print("\nstopping after this iteration (Ctrl-C again to stop at once)")


signal.signal(signal.SIGINT, request_stop)

if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install 'efficientgpt[wandb]' (or set wandb_log=False)")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop
bar = tqdm(total=max_iters, initial=iter_num, disable=not (progress and master_process), unit='it', dynamic_ncols=True)
t0 = time.time()
while True:
    lr = get_lr(learner.lr_iter(iter_num) if learner else iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if iter_num % eval_interval == 0 and master_process:
        losses = estimate_loss()
        tqdm.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})
        best_val_loss = min(best_val_loss, losses['val'])
        eval_history.append(dict(iter=iter_num, tokens=iter_num * tokens_per_iter, train_seconds=train_seconds,
                                 val_loss=float(losses['val'])))
        if iter_num > 0 and not eval_only:
            write_checkpoint()
    if eval_only or iter_num >= max_iters:
        break
    if ddp:  # every rank must stop at the same iteration, or the next all-reduce hangs
        flag = torch.tensor(float(stop_requested), device=device)
        all_reduce(flag)
        stop_requested = flag.item() > 0
    if stop_requested:
        if master_process:
            write_checkpoint()
            print(f"checkpoint written at iteration {iter_num} to {ckpt_path}; continue with --init_from=resume")
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    step_start = time.time()
    for micro_step in range(gradient_accumulation_steps):
        # under DDP, sync gradients only at the last micro step
        sync = not ddp or micro_step == gradient_accumulation_steps - 1
        with model.no_sync() if not sync else nullcontext():
            X, Y = learner.train_batch(train_batches) if learner else get_batch('train', train_batches)
            with ctx:
                logits, lm_loss = model(X, Y)
                aux = raw_model.aux_losses()  # {name: (weight, value)}
                if learner:
                    aux.update(learner.aux_losses(raw_model))  # the EWC penalty
                loss = lm_loss + sum(w * v for w, v in aux.values())
                loss = loss / gradient_accumulation_steps
            scaler.scale(loss).backward()
    lossf = loss.item() * gradient_accumulation_steps
    if not math.isfinite(lossf):
        # nothing is written: the checkpoint on disk is the last good state
        bar.close()
        print(f"error: loss is {lossf} at iteration {iter_num}; stopping. The last good checkpoint is {ckpt_path} "
              f"(lower learning_rate, or use dtype='bfloat16'/'float32')", file=sys.stderr)
        sys.exit(1)
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    with learner.scaled_update(raw_model) if learner else nullcontext():  # importance-adaptive learning rates
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    train_seconds += time.time() - step_start  # training alone: evaluations and checkpoints excluded

    iter_num += 1
    bar.update(1)
    if learner:  # at the end of a stage (on every rank): the R row, the Fisher, the next stage
        row = learner.after_step(raw_model, iter_num, ctx)
        if row and master_process:
            tqdm.write(row)
    if iter_num % log_interval == 0 and master_process:
        t1 = time.time()
        tok_s = tokens_per_iter * log_interval / (t1 - t0)
        t0 = t1
        bar.set_postfix(loss=f"{lossf:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss_step': lossf, 'tok_per_s': tok_s,
                       **{f'aux/{k}': v.item() for k, (w, v) in aux.items()}})
        if aux and not progress:
            print(f"iter {iter_num}: loss {lossf:.4f}, " + ", ".join(f"{k} {v.item():.4f}" for k, (w, v) in aux.items()))
bar.close()

if master_process and learner and not stop_requested:
    print(learner.report())
    if not eval_only:
        write_checkpoint()
elif master_process and final_eval_windows != 0 and not stop_requested:
    val_data = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.uint16, mode='r')
    windows = None if final_eval_windows < 0 else final_eval_windows
    val = evaluate_loss(raw_model, val_data, block_size, max_windows=windows, device=device, ctx=ctx)
    n = (len(val_data) - 1) // block_size if windows is None else windows
    print(f"final val loss over {n} fixed windows of {block_size} tokens: {val:.4f} nats/token ({bits(val):.4f} bits/token)")
    if not eval_only:
        write_checkpoint(final_val_loss=val)
if wandb_log and master_process:
    wandb.finish()
if ddp:
    torch.distributed.barrier()  # leave together: a rank that tears down while rank 0 still evaluates can abort
    destroy_process_group()
    # torch 2.13's gloo can abort in interpreter teardown ("terminate called without an active exception") after
    # all work is done and saved, turning a finished run into exit status -6 under load; skip the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
