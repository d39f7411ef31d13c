# Recipe (mechanism keys only): EfficientGPT spending what its hourglass saves on depth, MEGABYTE-style
# (Yu et al. 2023: a large global model over patches, a smaller local model over the bytes). Layer it on a size
# file: $ python train_efficient.py config/train_bench_cpu.py config/efficient_gpt_8l.py
include('efficient_gpt.py')  # hourglass k = 32, rope, 64-token windows, Muon x2
out_dir = 'out-efficient-gpt-8l'
# 8 layers instead of 6, 3 of them at full resolution: layer 0 reads every character, layers 1-5 run once per
# 32 characters on its pooled output, layers 6-7 read every character again (a decoded character runs 3 + 5/32
# layers). Full-resolution layers are what buy quality: with 1, 2, 3 and 4 of them after the coarse stack the loss
# was 1.7468, 1.6623, 1.6089 and 1.5909 at 128 dims, while 11 coarse layers instead of 5 gained nothing (1.7530).
# Of the three ways to place 3 (0, 1 or 2 before the coarse stack), one before it was best: 1.6018, against the
# strong baseline's 1.5429, at 2.05x its batch-1 decode (and with a second seed 1.6167 against 1.6296 all after;
# docs/combination.md). The strong baseline cut to 3 layers (config/strong_baseline_3l.py) runs as much per
# character and trains better: 1.5866 at 128 dims, 1.5661 against this model's 1.6245 at 384.
n_layer = 8
hierarchy_layers = '1:-2'
