# EfficientGPT, the combination (config/efficient_gpt.py), on the 384-dim CPU benchmark model, where batch-1
# decode reads its weights from memory.
# $ python train_efficient.py config/train_efficient_gpt384.py
# $ python sample.py --out_dir=out-efficient-gpt384
include('train_bench384_cpu.py')  # the 384-dim baseline's data, steps, seed, schedule and size
include('efficient_gpt.py')
out_dir = 'out-efficient-gpt384'
