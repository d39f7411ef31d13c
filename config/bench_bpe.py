# Dataset (layer it last, over a size file and a recipe): the benchmark on Tiny Shakespeare in GPT-2 BPE word
# pieces instead of characters, as `python bench_suite.py --dataset=shakespeare` trains it.
# $ python train_efficient.py config/train_bench_cpu.py config/bench_bpe.py --out_dir=out-bench-bpe-baseline
# The vocabulary grows from 65 to 50,257: at 128 dims the output head (6.4M weights) outweighs the six layers
# (1.2M), and a training step costs about six times the character model's (630 against 3,900 tokens/s, two at once).

dataset = 'shakespeare'
# 302K training tokens: 300 steps of 8 x 256 are 2 epochs, before a small model starts to memorise the split
max_iters = 300
lr_decay_iters = 300
warmup_iters = 30
