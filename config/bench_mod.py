# Recipe (mechanism keys only): Mixture-of-Depths. Layer it on a size file, e.g. config/train_bench_cpu.py.
# Every other layer (1, 3, 5 of the benchmark's 6) is routed: in training the top half of each sequence's tokens
# run it and the rest skip it; at decode a token runs it when its router's sigmoid > 0.5 (trained to predict
# top-k membership), so a token runs about 4.5 of the 6 layers.
# $ python train_efficient.py config/train_bench_cpu.py config/bench_mod.py
out_dir = 'out-bench-mod'
model_type = 'efficient'
adaptive_compute = 'mod'
mod_layers = 'every:2'
mod_capacity = 0.5
mod_router_loss_weight = 0.1
