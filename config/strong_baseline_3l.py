# Recipe (mechanism keys only): the strong dense baseline at half its depth. Layer it on a size file:
# $ python train_efficient.py config/train_bench_cpu.py config/strong_baseline_3l.py
# The dense model a user could pick instead of EfficientGPT-8L: a decoded character runs 3 layers here against
# the 8-layer hourglass's 3 + 5/32, so the two cost about the same per character, and the loss says whether the
# hourglass's coarse stack buys more than it costs.
include('strong_baseline.py')
out_dir = 'out-bench-strong_3l'
n_layer = 3
