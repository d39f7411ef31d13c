# Incremental learning on CPU: Tiny Shakespeare (A), then Sherlock Holmes (B), then Lua C source (C), one
# character vocabulary (data/continual_char). nanoGPT's small CPU model (4 layers, 128 dims, block 64); each
# stage re-warms and re-decays the learning rate over its own iters_per_task iterations.
# $ python train_efficient.py config/train_incremental_char_cpu.py --incremental_tasks=A,B --ewc_lambda=3 --fisher_batches=20
# incremental_experiment.py runs every method (naive, EWC, SI, MAS, replay, adaptive lr, protect, joint) on top of this file.

out_dir = 'out-incremental'
eval_interval = 250
eval_iters = 10
log_interval = 10
final_eval_windows = 400  # each R entry: the first 400 validation windows of 64 characters of each task

dataset = 'continual_char'
incremental_tasks = 'A,B'
iters_per_task = 300
first_stage_iters = 0  # 0: 300 like the others; e.g. 1200 for a converged first task (its schedule stretched)

# the methods' keys, all off here (naive fine-tuning); incremental_experiment.py sets them per method and --sweep
# varies one, e.g. --sweep=replay_ratio=0.01,0.05,0.125,0.25,0.5 or --sweep=ewc_lambda=0.1,1,10,100,1000
ewc_lambda = 0.0  # EWC penalty weight
ewc_mode = 'online'  # 'online' (one summed importance at the latest anchor) or 'per_task' (Kirkpatrick: one per task)
importance = 'fisher'  # 'fisher', 'mas' or 'si': the importance EWC's penalty and adaptive lr use
fisher_batches = 0  # batches of 12 windows for the Fisher or MAS after each stage (e.g. 20, 100)
replay_buffer_size = 0  # reservoir of earlier windows (e.g. 500, 2000, 8000; a stage sees 3,600)
replay_ratio = 0.0  # replayed share of each batch (e.g. 0.01, 0.05, 0.125, 0.25, 0.5)
replay_balance = 'windows'  # 'windows': uniform over the buffer; 'tasks': each earlier task an equal share
adaptive_lr_strength = 0.0  # update scale 1 / (1 + s * F / mean F)
protect_fraction = 0.0  # the top fraction of weights by importance whose updates are scaled by protect_scale
protect_scale = 0.0  # 0 freezes the protected weights, 0.1 damps them tenfold
stage_lr_schedule = 'rewarm'  # later stages: 'rewarm' (warm-up, decay to min_lr again) or 'constant' (min_lr)
stage_lr_peak = 1.0  # rewarm: later stages peak at stage_lr_peak * learning_rate (e.g. 1, 0.5, 0.25)
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
