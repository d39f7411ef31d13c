# EfficientGPT, the combination (config/efficient_gpt.py), on the 128-dim CPU benchmark model.
# $ python train_efficient.py config/train_efficient_gpt.py
# $ python sample.py --out_dir=out-efficient-gpt
include('train_bench_cpu.py')  # the baseline's data, steps, seed, schedule and size: the comparison is fair
include('efficient_gpt.py')
out_dir = 'out-efficient-gpt'
