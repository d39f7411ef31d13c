# Recipe (mechanism keys only): ACT. Layer it on a size file, e.g. config/train_bench_cpu.py.
# Layer 3 ponders, running its block up to 3 times per token (at most 8 layer applications per token
# instead of 6 on the benchmark's 6 layers). One pondering layer
# keeps the training cost on 2 CPU cores affordable; tau = 0.01 is inside Graves' useful range.
# $ python train_efficient.py config/train_bench_cpu.py config/bench_act.py
out_dir = 'out-bench-act'
model_type = 'efficient'
adaptive_compute = 'act'
act_layers = '3'
max_pondering_steps = 3
ponder_cost = 0.01
act_epsilon = 0.01
