# EfficientGPT, the combination: the CPU benchmark model (config/train_bench_cpu.py: same data, steps, seed,
# schedule and size) with the mechanisms that pay at batch-1 decode, chosen by measurement (README, "Results").
# $ python train_efficient.py config/train_efficient_gpt.py
# $ python sample.py --out_dir=out-efficient-gpt
out_dir = 'out-efficient-gpt'
eval_interval = 250
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'
batch_size = 8
block_size = 256

n_layer = 6
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 1000
lr_decay_iters = 1000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
seed = 1337

model_type = 'efficient'
# Hourglass: layers 0-4 run on groups of 16 characters, once per group at decode; only layer 5 sees every
# character. A decoded token runs 1 + 5/16 layers instead of 6. k = 16 was the fastest setting tried
# within 2% of the baseline's loss (k = 8 and 32, and a full-resolution layer 0, are in the README).
enable_hierarchical = True
hierarchy_factor = 16
hierarchy_layers = '0,1,2,3,4'
# Rotary positions and a 64-token window in every layer (the shortened ones read 64 groups): the quality the
# coarse layers cost is won back by rope, and the rolling caches let generation stream past block_size at
# constant memory and cost per token.
pos_emb = 'rope'
enable_local_attention = True
local_attention_window = 64
# Left off, each measured alone on this model (README): top-k and MoE MLPs slow batch-1 decode at 128
# dims (the gathered down-projection and the router cost more than they skip); ACT slows it too (0.65x);
# early exit does not combine with the hourglass or rope (its decoder steps full-resolution layers with
# plain caches), and alone it reached 2.19x only at +4.5% loss.
