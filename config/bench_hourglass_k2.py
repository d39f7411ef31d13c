# Recipe (mechanism keys only): the hourglass, k = 2. Layer it on a size file, e.g. config/train_bench_cpu.py.
# The first and the last layer at full resolution, the ones between at half resolution (1/4/1 of 6). 1/4/1 rather than 2/2/2: with 2/2/2 a
# decoded token still runs 5 of 6 layer-equivalents (at most 1.2x); with 1/4/1 it runs 2 + 4/2 = 4.
# $ python train_efficient.py config/train_bench_cpu.py config/bench_hourglass_k2.py
out_dir = 'out-bench-hourglass-k2'
model_type = 'efficient'
enable_hierarchical = True
hierarchy_factor = 2
hierarchy_layers = '1:-1'  # every layer but the first and the last
