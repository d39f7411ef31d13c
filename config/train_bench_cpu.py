# The CPU benchmark model: the baseline every mechanism is trained against, with the same data, steps and
# seed. Six layers and a 256-character context (so decode of 250 new tokens stays inside block_size),
# small enough to train on 2 CPU cores in about 5-10 minutes.
# $ python train_efficient.py config/train_bench_cpu.py
# A mechanism's variant is this file plus its own keys, e.g.
# $ python train_efficient.py config/train_bench_cpu.py --model_type=efficient --out_dir=out-bench-X ...

out_dir = 'out-bench-baseline'
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

learning_rate = 2e-3  # a small model on few tokens: a high rate with warm-up trains fastest
max_iters = 1000
lr_decay_iters = 1000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
seed = 1337
