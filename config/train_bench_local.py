# Recipe (mechanism keys only): local attention with rotary positions. Layer it on a size file, e.g.
# config/train_bench_cpu.py. Every layer attends to a 64-token sliding window (a quarter of block_size 256), with rotary positions, so
# the same model can stream past block_size at constant memory. The baseline has learned positions and full
# attention; config/train_bench_rope.py separates the two changes (full attention, rotary positions).
# $ python train_efficient.py config/train_bench_cpu.py config/train_bench_local.py

out_dir = 'out-bench-local'
model_type = 'efficient'
enable_local_attention = True
local_attention_window = 64  # w: each query sees itself and the 63 characters before it
global_layers = 'none'  # no layer keeps full attention
pos_emb = 'rope'
