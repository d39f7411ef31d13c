"""
Train a baseline GPT or an EfficientGPT. One linear script, like nanoGPT's train.py.

On one CPU or GPU:
$ python train_efficient.py config/train_shakespeare_char_cpu.py
Override any key from the command line:
$ python train_efficient.py config/train_shakespeare_char_cpu.py --max_iters=500 --model_type=efficient
Incremental learning, task A then task B, with EWC and replay (incremental_learning.py):
$ python train_efficient.py config/train_incremental_char_cpu.py --fisher_batches=20 --ewc_lambda=3 --replay_buffer_size=2000 --replay_ratio=0.125
Resume a run exactly where it stopped (Ctrl-C writes a checkpoint first); the model keys come from the checkpoint:
$ python train_efficient.py config/train_shakespeare_char_cpu.py --init_from=resume
A fresh run never replaces a checkpoint in out_dir unless told to (--overwrite=True).
DDP on 4 GPUs of one node (gloo on CPU: add --device=cpu):
$ torchrun --standalone --nproc_per_node=4 train_efficient.py config/train_shakespeare_char.py
"""

import ast
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

from checkpoint import (PRETRAINED, CheckpointError, build_model, from_checkpoint_weights, from_pretrained, is_pretrained,
                        load_checkpoint, model_checkpoint, model_config, save_checkpoint)
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
out_dir = 'out'  # folder of the checkpoint, out_dir/ckpt.pt
eval_interval = 250  # estimate losses and write the checkpoint every this many iterations (>= 1)
log_interval = 10  # log the training loss, tokens/s and lr every this many iterations (>= 1)
eval_iters = 20  # batches per random-batch loss estimate (logs only; see final_eval_windows) (>= 1)
final_eval_windows = -1  # deterministic val loss at the end over this many fixed windows; -1: whole split, 0: skip
eval_only = False  # True: evaluate (at the first iteration and at the end) and exit, writing nothing
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt, with its model keys), GPT-2's weights: 'gpt2' .. 'gpt2-xl', 'hf:<folder>', or a trained checkpoint's weights as a new run: 'ckpt:<path>'
overwrite = False  # True: a run from scratch may replace a checkpoint already in out_dir
progress = True  # progress bar on a terminal; in a log file, or with False, a plain line every log_interval
# wandb logging (optional extra, off by default)
wandb_log = False  # True: log losses to Weights & Biases (pip install 'efficientgpt[wandb]')
wandb_project = 'efficientgpt'  # the wandb project
wandb_run_name = 'run'  # the wandb run name
# data
dataset = 'shakespeare_char'  # a folder under data/, or a path to a folder with train.bin, val.bin, meta.json
gradient_accumulation_steps = 1  # micro-batches per optimizer step (>= 1; under DDP, a multiple of the world size)
batch_size = 12  # sequences per micro-batch (>= 1)
# incremental learning (incremental_learning.py): tasks data_dir/{task}_train.bin, _val.bin over one vocabulary
incremental_tasks = ''  # '' trains on train.bin; 'A,B,C': A, then B, then C; 'A+B': one stage of A and B mixed (joint)
iters_per_task = 1000  # iterations per stage (max_iters becomes their total); the lr schedule restarts every stage
first_stage_iters = 0  # iterations of the first stage (e.g. to converge), its lr schedule stretched; 0: iters_per_task
ewc_lambda = 0.0  # EWC: adds ewc_lambda * sum F * (theta - theta*)^2 after the first stage
ewc_gamma = 1.0  # online EWC: F <- ewc_gamma * F + F_new after each stage (1: every task counts fully)
ewc_mode = 'online'  # 'online': one summed F at the latest theta*; 'per_task': a penalty per earlier task (Kirkpatrick)
importance = 'fisher'  # F of EWC and adaptive lr: 'fisher', 'mas' (output sensitivity), 'si' (path integral, no batches)
fisher_batches = 0  # batches for the Fisher or MAS importance after each stage (EWC, adaptive lr); 0: none
replay_buffer_size = 0  # windows kept by reservoir sampling over all training windows; 0: no buffer
replay_ratio = 0.0  # fraction of each training batch replayed from earlier tasks (in expectation), in [0, 1)
replay_balance = 'windows'  # 'windows': replay draws uniformly over the buffer; 'tasks': each earlier task an equal share
adaptive_lr_strength = 0.0  # each parameter's update scaled by 1 / (1 + strength * F / mean F)
protect_fraction = 0.0  # the top fraction of all weights by importance F have their updates scaled by protect_scale
protect_scale = 0.0  # protect_fraction's update scale: 0 freezes them, 0.1 damps them tenfold
stage_lr_schedule = 'rewarm'  # stages after the first: 'rewarm' (warm-up and decay again), 'constant' (min_lr)
stage_lr_peak = 1.0  # rewarm: stages after the first peak at stage_lr_peak * learning_rate, still decay to min_lr
# model: 'gpt' (model.py) or 'efficient' (model_efficient.py); every field of EfficientGPTConfig is a key too
model_type = 'gpt'  # 'gpt' (the baseline, model.py) or 'efficient' (EfficientGPT, model_efficient.py)
# adamw optimizer
optimizer = 'adamw'  # 'adamw', or 'muon': Muon for the hidden matrices, AdamW for the rest (GPT.configure_optimizers)
muon_lr_scale = 1.0  # muon: Muon's learning rate over AdamW's (its update is scaled to AdamW's RMS first)
learning_rate = 1e-3  # peak learning rate (>= 0)
max_iters = 2000  # total training iterations (>= 0)
weight_decay = 1e-1  # AdamW weight decay of the matmul and embedding weights (>= 0)
beta1 = 0.9  # AdamW beta1, in [0, 1)
beta2 = 0.99  # AdamW beta2, in [0, 1)
grad_clip = 1.0  # clip gradients at this norm; 0 disables
# learning rate schedule: linear warm-up, then cosine decay to min_lr
decay_lr = True  # False: a constant learning_rate
warmup_iters = 100  # linear warm-up iterations (>= 0)
lr_decay_iters = 2000  # cosine decay ends here (> warmup_iters), then min_lr
min_lr = 1e-4  # the learning rate at the end of the decay (>= 0)
lr_schedule = 'cosine'  # 'cosine', or 'wsd': warm-up, stable at learning_rate, linear to min_lr at lr_decay_iters
wsd_decay_frac = 0.2  # wsd: the linear decay takes this last fraction of lr_decay_iters, in (0, 1]
# system
device = 'auto'  # 'auto' picks cuda, then mps, then cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto': bfloat16 autocast on CUDA when supported, else float16 (with GradScaler); float32 elsewhere
compile = False  # torch.compile the model
seed = 1337  # seed of the initial weights, the batches and dropout
# -----------------------------------------------------------------------------
model_defaults = {f.name: f.default for f in fields(EfficientGPTConfig) if f.name != 'vocab_size'}
model_defaults.update(
    block_size=64,  # context length in tokens (>= 1; the data's splits need more tokens than this)
    n_layer=4,  # transformer blocks (>= 1)
    n_head=4,  # attention heads per block (>= 1, divides n_embd)
    n_embd=128,  # width of the residual stream (>= 1)
    dropout=0.0,  # dropout rate in [0, 1); may change on resume (fine-tuning)
    bias=False,  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
)
script_defaults = {k: v for k, v in globals().items()
                   if not k.startswith('_') and isinstance(v, (int, float, bool, str)) and k not in ('math', 'np')}
config = configure_or_exit({**script_defaults, **model_defaults}, sys.argv[1:], __doc__,
                           describe(__file__, *map(inspect.getsourcefile, (EfficientGPTConfig, GPTConfig))))
globals().update(config)
# -----------------------------------------------------------------------------
# model keys that may change when a run resumes (regularisation and loss weights: nothing the weights' shapes
# or meaning depend on); any other model key must stay as the checkpoint has it
RESUME_MAY_CHANGE = ('dropout', 'layer_dropout', 'early_exit_loss_weight', 'ponder_cost', 'router_aux_loss_weight',
                     'router_z_loss_weight')


def given_keys(argv):
    """The keys this command line sets, by --key or by an assignment in one of its config files, as opposed
    to those left at their defaults."""
    keys = {a[2:].partition('=')[0] for a in argv if a.startswith('--')}
    for path in (a for a in argv if not a.startswith('--')):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        keys.update(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    return keys


def check_settings():
    """Every value that would otherwise fail deep inside torch (or silently do nothing): one line, exit 2."""
    checks = [
        (eval_interval >= 1, f"eval_interval must be >= 1, not {eval_interval}"),
        (log_interval >= 1, f"log_interval must be >= 1, not {log_interval}"),
        (eval_iters >= 1, f"eval_iters must be >= 1, not {eval_iters} (final_eval_windows sets the final evaluation)"),
        (final_eval_windows >= -1, f"final_eval_windows must be -1 (the whole split), 0 (skip) or a number of windows, "
                                   f"not {final_eval_windows}"),
        (max_iters >= 0, f"max_iters must be >= 0, not {max_iters}"),
        (gradient_accumulation_steps >= 1, f"gradient_accumulation_steps must be >= 1, not {gradient_accumulation_steps}"),
        (batch_size >= 1, f"batch_size must be >= 1, not {batch_size}"),
        (learning_rate >= 0 and min_lr >= 0, f"learning_rate and min_lr must be >= 0, not {learning_rate} and {min_lr}"),
        (warmup_iters >= 0, f"warmup_iters must be >= 0, not {warmup_iters}"),
        (not decay_lr or lr_decay_iters > warmup_iters,
         f"lr_decay_iters ({lr_decay_iters}) must be > warmup_iters ({warmup_iters}), or set decay_lr=False"),
        (weight_decay >= 0, f"weight_decay must be >= 0, not {weight_decay}"),
        (0 <= beta1 < 1 and 0 <= beta2 < 1, f"beta1 and beta2 must be in [0, 1), not {beta1} and {beta2}"),
        (grad_clip >= 0, f"grad_clip must be >= 0 (0: no clipping), not {grad_clip}"),
        (model_type in ('gpt', 'efficient'), f"model_type must be 'gpt' or 'efficient', not {model_type!r}"),
        (init_from in ('scratch', 'resume') or is_pretrained(init_from) or init_from.startswith('ckpt:'),
         f"init_from must be 'scratch', 'resume', one of {', '.join(PRETRAINED)}, 'hf:<folder>' or 'ckpt:<path>', "
         f"not {init_from!r}"),
        (optimizer in ('adamw', 'muon') and muon_lr_scale > 0,
         f"optimizer must be 'adamw' or 'muon' and muon_lr_scale > 0, not {optimizer!r} and {muon_lr_scale}"),
        (lr_schedule in ('cosine', 'wsd') and 0 < wsd_decay_frac <= 1,
         f"lr_schedule must be 'cosine' or 'wsd' and wsd_decay_frac in (0, 1], not {lr_schedule!r} and {wsd_decay_frac}"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    world = int(os.environ.get('WORLD_SIZE', 1))
    if gradient_accumulation_steps % world:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be a multiple of the world size ({world})")


def check_model(model_type, model_args):
    """The model keys: what GPTConfig leaves unchecked, then the config class's own checks (checkpoint.model_config)."""
    a = model_args
    checks = [(a['block_size'] >= 1, f"block_size must be >= 1, not {a['block_size']}"),
              (a['n_layer'] >= 1, f"n_layer must be >= 1, not {a['n_layer']}"),
              (a['n_head'] >= 1 and a['n_embd'] >= 1, f"n_head and n_embd must be >= 1, not {a['n_head']} and {a['n_embd']}"),
              (a['n_embd'] % a['n_head'] == 0, f"n_embd ({a['n_embd']}) must be a multiple of n_head ({a['n_head']})"),
              (0 <= a['dropout'] < 1, f"dropout must be in [0, 1), not {a['dropout']}")]
    for ok, message in checks:
        if not ok:
            fail(message)
    try:
        model_config(model_type, model_args)
    except CheckpointError as e:
        fail(e)


def resume_settings(checkpoint, given):
    """Make config the run a checkpoint continues: its model type and model keys, except those in
    RESUME_MAY_CHANGE that this command line sets. A key the command line sets to another value is an error.
    Returns the model args to build."""
    old_type, old_args = checkpoint['model_type'], checkpoint['model_args']
    changed, taken, errors = [], [], []
    olds = {'model_type': old_type, **{k: old_args.get(k, v) for k, v in model_defaults.items()}}
    for k, old in olds.items():
        new = config[k]
        if new == old:
            continue
        if k not in given:
            config[k] = old
            taken.append(f"{k}={old!r}")
        elif k in RESUME_MAY_CHANGE and k in old_args:
            changed.append(f"{k} {old!r} -> {new!r}")
        else:
            errors.append(f"{k} {old!r} -> {new!r}")
    if errors:
        fail(f"the model of {ckpt_path} cannot change on resume: {', '.join(errors)}. Leave these keys out (resume "
             f"takes the checkpoint's), or start a new run in another out_dir; only {', '.join(RESUME_MAY_CHANGE)} may change")
    if master_process and taken:
        print(f"resume: model keys from the checkpoint: {', '.join(taken)}")
    if master_process and changed:
        print(f"resume: changed: {', '.join(changed)}")
    globals().update({k: config[k] for k in olds})
    return {**old_args, **{k: config[k] for k in RESUME_MAY_CHANGE if k in old_args}}


def not_resumable(checkpoint, *keys):
    """Fail unless the checkpoint holds these keys: nanoGPT's checkpoints, and those only for sampling, do not."""
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        fail(f"{ckpt_path} was not written by train_efficient.py (it has no {', '.join(missing)}): it cannot be "
             f"resumed (sample.py and bench.py read it)")


check_settings()
given = given_keys(sys.argv[1:])

# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a torchrun launch?
device = pick_device(device)
try:
    device_type = torch.device(device).type
except RuntimeError:
    fail(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', not {device!r}")
if device_type == 'cuda' and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
    fail(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) PyTorch can use")
if device_type == 'cuda' and not torch.cuda.is_available() or device_type == 'mps' and not torch.backends.mps.is_available():
    fail(f"device={device!r}, but this machine has no {device_type.upper()} device PyTorch can use: use --device=cpu")
dtype = pick_dtype(dtype, device)
if ddp:
    init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0  # this process does the logging, checkpointing etc.
    seed_offset = ddp_rank  # each process gets a different seed
    gradient_accumulation_steps //= ddp_world_size
else:
    master_process, seed_offset, ddp_world_size = True, 0, 1

# the model: from scratch, or the one in out_dir's checkpoint
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
checkpoint = None
if init_from != 'resume':
    if os.path.exists(ckpt_path) and not eval_only and not overwrite:
        fail(f"{ckpt_path} already holds a checkpoint: continue it with --init_from=resume, replace it with "
             f"--overwrite=True, or choose another out_dir")
    model_args = {k: config[k] for k in model_defaults if k in {f.name for f in fields(GPTConfig)} or model_type == 'efficient'}
else:
    try:
        checkpoint = load_checkpoint(ckpt_path, map_location=device)
    except CheckpointError as e:
        fail(e)
    not_resumable(checkpoint, 'model_type', 'meta')
    model_args = resume_settings(checkpoint, given)
if model_type == 'gpt':
    gpt_keys = {f.name for f in fields(GPTConfig)}
    stray = [k for k, v in model_defaults.items() if k not in gpt_keys and config[k] != v]
    if stray:
        fail(f"{', '.join(stray)} only appl{'ies' if len(stray) == 1 else 'y'} to model_type='efficient'")
incremental_keys = ('iters_per_task', 'first_stage_iters', 'ewc_lambda', 'ewc_gamma', 'ewc_mode', 'importance', 'fisher_batches',
                    'replay_buffer_size', 'replay_ratio', 'replay_balance', 'adaptive_lr_strength', 'protect_fraction', 'protect_scale',
                    'stage_lr_schedule', 'stage_lr_peak')
if not incremental_tasks and any(config[k] != script_defaults[k] for k in incremental_keys):
    fail(f"{', '.join(k for k in incremental_keys if config[k] != script_defaults[k])}: these keys need incremental_tasks (e.g. incremental_tasks='A,B')")
check_model(model_type, model_args)

tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    print_config(config)
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
torch.manual_seed(seed + seed_offset)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
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
        print(f"incremental learning: stages {incremental_tasks} of {', '.join(map(str, learner.stage_iters))} iterations, max_iters={max_iters}")
else:
    for split in ('train', 'val'):
        tokens = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2
        if tokens <= block_size:
            fail(f"{split}.bin of {data_dir} has {tokens:,} tokens, too few for one window of block_size={block_size} "
                 f"(that needs block_size + 1): lower block_size{f' to at most {tokens - 1}' if tokens > 1 else ''}, or use more text")


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


def all_finite(tensors):
    """True when every floating-point tensor holds only finite values (one device sync for all of them)."""
    flags = [t.isfinite().all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


# model
iter_num, best_val_loss = 0, float('inf')
# each evaluation's {iter, tokens, train_seconds, val_loss}: bench_suite.py reads time to a target loss from it
eval_history, train_seconds = [], 0.0
last_good = None  # the iteration of the checkpoint on disk that this run may fall back to
if checkpoint is None:
    if master_process and init_from == 'scratch':
        print(f"initializing a new {model_type} model from scratch")
    model_args['vocab_size'] = meta['vocab_size']
else:
    if master_process:
        print(f"resuming training from {ckpt_path}")
    if checkpoint['meta'] != meta:
        fail(f"the vocabulary of {data_dir} differs from the checkpoint's ({vocabulary_difference(checkpoint['meta'], meta)}): "
             "resume on the data it was trained on; a checkpoint's tokens are never remapped")
    not_resumable(checkpoint, 'optimizer', 'scaler', 'rng', 'iter_num')
    if not all_finite(checkpoint['model'].values()):
        fail(f"{ckpt_path} holds weights that are not finite (iteration {checkpoint['iter_num']}): it cannot be resumed")
try:
    if is_pretrained(init_from):  # GPT-2's architecture and weights; the keys set here may change a few things
        if meta.get('tokenizer') != 'gpt2':
            fail(f"init_from={init_from!r} needs a dataset in GPT-2 BPE tokens (e.g. dataset='shakespeare'), "
                 f"not {data_dir}'s {meta.get('tokenizer', 'char')} vocabulary")
        fixed = {f.name for f in fields(GPTConfig)} - {'dropout', 'block_size'}  # GPT-2's own
        if fixed & given:
            fail(f"{', '.join(sorted(fixed & given))}: GPT-2's own with init_from={init_from!r} (dropout, a shorter "
                 f"block_size and mechanism keys may be set)")
        if master_process:
            print(f"initializing a {model_type} model from GPT-2 weights {init_from!r}")
        model, _ = from_pretrained(init_from, model_type, **{k: config[k] for k in given if k in model_args
                                                              and k not in fixed})
        config.update({k: getattr(model.config, k) for k in model_defaults if hasattr(model.config, k)})
        globals().update(config)  # block_size and the rest as the model has them: the stored config is what ran
        tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
    elif init_from.startswith('ckpt:'):  # a trained model's weights, e.g. a dense one gaining exit heads (LayerSkip)
        model, source_meta = from_checkpoint_weights(init_from[5:], model_type,
                                                     **{k: config[k] for k in given if k in model_args})
        if source_meta is not None and source_meta != meta:
            fail(f"the vocabulary of {data_dir} differs from {init_from[5:]}'s "
                 f"({vocabulary_difference(source_meta, meta)}): a checkpoint's tokens are never remapped")
        if master_process:
            print(f"initializing a model ({model_type}) from the weights of {init_from[5:]}")
        config.update({k: getattr(model.config, k) for k in model_defaults if hasattr(model.config, k)})
        globals().update(config)  # the sizes as the checkpoint has them: the stored config is what ran
        tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
    else:
        model = build_model(model_type, model_args)
except CheckpointError as e:
    fail(e)
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    eval_history = checkpoint.get('eval_history', [])
    train_seconds = eval_history[-1]['train_seconds'] if eval_history else 0.0
    last_good = iter_num
    if learner is not None:
        try:
            learner.load_state_dict(checkpoint.get('incremental'))
        except ValueError as e:
            fail(e)
    if iter_num > max_iters and not eval_only:
        fail(f"{ckpt_path} is at iteration {iter_num}, past max_iters={max_iters}: raise max_iters to train on "
             f"(or evaluate it with --eval_only)")
if master_process and not eval_only:
    os.makedirs(out_dir, exist_ok=True)
model.to(device)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer, muon_lr_scale)
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
    """Linear warm-up for warmup_iters, decay to min_lr at lr_decay_iters (cosine, or wsd's), then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    if lr_schedule == 'wsd':  # stable, then linear to min_lr over the last wsd_decay_frac
        start = max(warmup_iters, lr_decay_iters * (1 - wsd_decay_frac))
        return learning_rate + (min_lr - learning_rate) * max(0.0, it - start) / (lr_decay_iters - start)
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # goes 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def fallback():
    """Where this run's last good state is, for an error message."""
    return (f"The last good checkpoint is {ckpt_path} (iteration {last_good})" if last_good is not None
            else "No good checkpoint was written")


def stop(message):
    """A failure during training: one line on stderr and exit status 1 (bad settings exit with 2 before it starts)."""
    bar.close()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def write_checkpoint(**extra):
    """Write the training state, unless any of its weights, optimizer moments or losses is not finite: a
    checkpoint on disk is always one that sample.py can use and a resumed run can continue."""
    global last_good
    moments = [t for s in optimizer.state.values() for t in s.values()]
    losses = [*([eval_history[-1]['val_loss']] if eval_history else []), *extra.values()]
    if not (all_finite([*raw_model.parameters(), *moments]) and all(map(math.isfinite, losses))):
        stop(f"the training state is not finite at iteration {iter_num}, so it was not written. {fallback()}; "
             f"try a lower learning_rate, or dtype='bfloat16'/'float32'")
    ckpt = model_checkpoint(raw_model, meta)
    ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                best_val_loss=best_val_loss, eval_history=eval_history, config=config, **extra,
                rng=dict(torch=torch.get_rng_state(), train_batches=train_batches.get_state(),
                         cuda=torch.cuda.get_rng_state_all() if device_type == 'cuda' else []))
    if learner:
        ckpt['incremental'] = learner.state_dict()  # EWC state, replay buffer, stage and R matrix
    try:
        save_checkpoint(ckpt, ckpt_path)
    except CheckpointError as e:
        resume = f"; free some space and continue from iteration {last_good} with --init_from=resume" if last_good is not None else ""
        stop(f"{e}. Training stopped at iteration {iter_num}{resume}")
    last_good = iter_num


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

# training loop. A progress bar on a terminal; in a log file (or with progress=False) a line every log_interval
bar_shown = progress and master_process and sys.stderr.isatty()
bar = tqdm(total=max_iters, initial=iter_num, disable=not bar_shown, unit='it', dynamic_ncols=True)
log = tqdm.write if bar_shown else print
stopped_early = False  # Ctrl-C: the checkpoint is written where the loop stopped
t0 = time.time()
while True:
    lr = (learner.lr(iter_num, get_lr) if learner else get_lr(iter_num)) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if (iter_num % eval_interval == 0 or eval_only) and master_process:
        losses = estimate_loss()
        log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if not all(map(math.isfinite, losses.values())):
            stop(f"the loss estimate is not finite at iteration {iter_num} (train {losses['train']:.4g}, val "
                 f"{losses['val']:.4g}); stopping. {fallback()}; "
                 f"try a lower learning_rate, or dtype='bfloat16'/'float32'")
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})
        best_val_loss = min(best_val_loss, losses['val'])
        # a run resumed at an evaluated iteration has its entry (and its checkpoint) already
        if not (eval_history and eval_history[-1]['iter'] == iter_num):
            eval_history.append(dict(iter=iter_num, tokens=iter_num * tokens_per_iter, train_seconds=train_seconds,
                                     val_loss=float(losses['val'])))
            if 0 < iter_num < max_iters and not eval_only:  # at max_iters the final checkpoint follows
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
        stopped_early = True
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    step_start = time.time()
    raw_model.set_progress(iter_num / max_iters)  # losses on a schedule (early exit's) read where training is
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
        stop(f"loss is {lossf} at iteration {iter_num}; stopping. {fallback()}; "
             f"try a lower learning_rate, or dtype='bfloat16'/'float32'")
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
            log(row)
    if iter_num % log_interval == 0 and master_process:
        t1 = time.time()
        tok_s = tokens_per_iter * log_interval / (t1 - t0)
        t0 = t1
        if bar_shown:
            bar.set_postfix(loss=f"{lossf:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
        else:
            print(f"iter {iter_num}: loss {lossf:.4f}, {tok_s:,.0f} tok/s, lr {lr:.1e}"
                  + "".join(f", {k} {v.item():.4f}" for k, (w, v) in aux.items()))
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss_step': lossf, 'tok_per_s': tok_s,
                       **{f'aux/{k}': v.item() for k, (w, v) in aux.items()}})
bar.close()

# the end: the incremental report or the final evaluation, then the final state (always written)
if master_process and not stopped_early:
    final = {}
    if learner:
        print(learner.report())
    elif final_eval_windows != 0:
        val_data = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.uint16, mode='r')
        windows = None if final_eval_windows < 0 else final_eval_windows
        final['final_val_loss'] = val = evaluate_loss(raw_model, val_data, block_size, max_windows=windows, device=device, ctx=ctx)
        n = (len(val_data) - 1) // block_size if windows is None else min(windows, (len(val_data) - 1) // block_size)
        print(f"final val loss over {n} fixed windows of {block_size} tokens: {val:.4f} nats/token ({bits(val):.4f} bits/token)")
    if not eval_only:
        write_checkpoint(**final)
        print(f"checkpoint written at iteration {iter_num} to {ckpt_path}")
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
