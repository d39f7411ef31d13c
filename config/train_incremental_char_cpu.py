# Incremental learning on CPU: Tiny Shakespeare (A), then Sherlock Holmes (B), then Lua C source (C), one
# character vocabulary (data/continual_char). nanoGPT's small CPU model (4 layers, 128 dims, block 64); each
# stage re-warms and re-decays the learning rate over its own iters_per_task iterations.
# $ python train_efficient.py config/train_incremental_char_cpu.py --incremental_tasks=A,B --ewc_lambda=3 --fisher_batches=20
# incremental_experiment.py runs every method (naive, EWC, replay, EWC + replay, adaptive lr, joint) on top of this file.

out_dir = 'out-incremental'
eval_interval = 250
eval_iters = 10
log_interval = 10
final_eval_windows = 400  # each R entry: the first 400 validation windows of 64 characters of each task

dataset = 'continual_char'
incremental_tasks = 'A,B'
iters_per_task = 300
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
warmup_iters = 30
lr_decay_iters = 300  # = iters_per_task: every stage decays to min_lr
min_lr = 2e-4
beta2 = 0.99

device = 'cpu'
seed = 1337
