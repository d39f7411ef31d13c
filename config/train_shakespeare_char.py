# nanoGPT's GPU settings for the character-level Shakespeare model: a 6-layer, 384-dim GPT with block 256.
# About 3 minutes on one A100; on a CPU use config/train_shakespeare_char_cpu.py instead.
# $ python train_efficient.py config/train_shakespeare_char.py

out_dir = 'out-shakespeare-char'
eval_interval = 250  # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # with baby networks we can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000  # make equal to max_iters usually
min_lr = 1e-4  # learning_rate / 10 usually
beta2 = 0.99  # a bit bigger because the number of tokens per iter is small
warmup_iters = 100  # not super necessary potentially
