# Recipe (mechanism keys only): full attention with rotary positions. Layer it on a size file, e.g.
# config/train_bench_cpu.py: only the position encoding of the local variant changed, to tell the effect of
# the window from the effect of rope.
# $ python train_efficient.py config/train_bench_cpu.py config/train_bench_rope.py

out_dir = 'out-bench-rope'
model_type = 'efficient'
pos_emb = 'rope'
