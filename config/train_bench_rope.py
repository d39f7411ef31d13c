# Full attention with rotary positions: the CPU benchmark with only the position encoding of the local
# variant changed, to tell the effect of the window from the effect of rope (issue 5).
# $ python train_efficient.py config/train_bench_cpu.py config/train_bench_rope.py

out_dir = 'out-bench-rope'
model_type = 'efficient'
pos_emb = 'rope'
