# The 384-dim CPU benchmark model: nanoGPT's shakespeare-char architecture (6 layers, 6 heads, 384 dims, a
# 256-character context, no dropout; 10.65M parameters, 42 MB of float32 weights), the size where batch-1 decode
# reads its weights from memory as real deployments do. Its training budget is at most 25 minutes on one thread
# of a 2-core CPU: a training step (forward, backward, AdamW) of 8 sequences took 1.9 s of process CPU time on one
# thread (batch 16: 3.7 s, the same tokens per second), timed over 3 steps after a warm-up; 700 steps are 22
# minutes, which leaves room for a recipe whose step costs a little more. The strong baseline layers on it:
# $ python train_efficient.py config/train_bench384_cpu.py
# $ python train_efficient.py config/train_bench384_cpu.py config/strong_baseline.py --out_dir=out-bench384-strong

out_dir = 'out-bench384-baseline'
eval_interval = 250
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'
batch_size = 8  # the most steps in the budget: a smaller batch costs no tokens per second here
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0

learning_rate = 1e-3  # nanoGPT's rate for this size
max_iters = 700
lr_decay_iters = 700
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 70

device = 'cpu'
seed = 1337
