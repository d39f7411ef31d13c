# Top-k sparse MLP variant of the CPU benchmark model (mechanism 2): every layer's MLP keeps the 10% of its
# 4 * 128 = 512 GELU units of largest magnitude per token (k = 51); same data, steps and seed as the baseline.
# $ python train_efficient.py config/train_bench_cpu.py config/train_bench_topk_cpu.py

out_dir = 'out-bench-topk'
model_type = 'efficient'
enable_sparse_activation = True
sparsity_ratio = 0.1  # k = round(0.1 * 4 * n_embd) units kept per token
sparse_layers = 'all'
