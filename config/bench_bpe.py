# Dataset (layer it last, over a size file and a recipe): the benchmark on Tiny Shakespeare in GPT-2 BPE word
# pieces instead of characters, as `python bench_suite.py --dataset=shakespeare` trains it.
# $ python train_efficient.py config/train_bench_cpu.py config/bench_bpe.py --out_dir=out-bench-bpe-baseline
# The vocabulary grows from 65 to 50,257: at 128 dims the output head (6.4M weights) outweighs the six layers
# (1.2M), and a training step costs about four times the character model's.

dataset = 'shakespeare'
# 302K training tokens: 500 steps of 8 x 256 are 3.4 epochs, before a small model starts to memorise the split
max_iters = 500
lr_decay_iters = 500
warmup_iters = 50
