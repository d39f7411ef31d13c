# Recipe (mechanism keys only): top-k sparse MLPs. Layer it on a size file, e.g. config/train_bench_cpu.py.
# Every layer's MLP keeps the 10% of its 4 * n_embd GELU units with the largest pre-activations per token
# (k = 51 of 512 at 128 dims).
# $ python train_efficient.py config/train_bench_cpu.py config/train_bench_topk_cpu.py

out_dir = 'out-bench-topk'
model_type = 'efficient'
enable_sparse_activation = True
sparsity_ratio = 0.1  # k = round(0.1 * 4 * n_embd) units kept per token
sparse_layers = 'all'
