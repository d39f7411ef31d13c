# nanoGPT's CPU settings for the character-level Shakespeare model (its README's "macbook" run):
# a baby GPT that trains in a few minutes on a laptop CPU and reaches val loss ~1.88-1.90.
# $ python train_efficient.py config/train_shakespeare_char_cpu.py

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64  # context of up to 64 previous characters

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000  # make equal to max_iters usually
min_lr = 1e-4  # learning_rate / 10 usually
beta2 = 0.99  # a bit bigger because the number of tokens per iter is small
warmup_iters = 100

device = 'cpu'
compile = False
