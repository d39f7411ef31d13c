# Recipe (mechanism keys only): the hourglass, k = 4. Layer it on a size file, e.g. config/train_bench_cpu.py.
# As config/bench_hourglass_k2.py, shortened by 4: layers 1-4 of 6 see one position per 4 characters, about a word; a decoded token runs 2 + 4/4 = 3 layer-equivalents instead of 6.
# $ python train_efficient.py config/train_bench_cpu.py config/bench_hourglass_k4.py
out_dir = 'out-bench-hourglass-k4'
model_type = 'efficient'
enable_hierarchical = True
hierarchy_factor = 4
hierarchy_layers = '1:-1'  # every layer but the first and the last
