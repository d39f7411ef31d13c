# Recipe (mechanism keys only): EfficientGPT spending what its hourglass saves on depth, MEGABYTE-style
# (Yu et al. 2023: a large global model over patches, a smaller local model over the bytes). Layer it on a size
# file: $ python train_efficient.py config/train_bench_cpu.py config/efficient_gpt_8l.py
include('efficient_gpt.py')  # hourglass k = 32 with no full-resolution layer before it, rope, 64-token windows, Muon x2
out_dir = 'out-efficient-gpt-8l'
# 8 layers instead of 6: layers 0-4 run once per 32 characters, and 3 full-resolution local layers after them
# instead of 1 (a decoded character runs 3 + 5/32 layers): 1.6187 against the 6-layer combination's 1.7456 at
# 128 dims (docs/combination.md)
n_layer = 8
hierarchy_layers = ':-3'
