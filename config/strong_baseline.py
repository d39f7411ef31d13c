# Recipe (mechanism keys only): the strong dense baseline. Layer it on a size file, e.g.
# $ python train_efficient.py config/train_bench_cpu.py config/strong_baseline.py
# Full attention with rotary positions, trained with Muon for the hidden matrices; each piece was tried one at a
# time on the 128-dim CPU benchmark (docs/strong_baseline.md), and these are the ones that paid.

out_dir = 'out-bench-strong'
model_type = 'efficient'
pos_emb = 'rope'  # rotary positions: 1.7258 against learned positions' 2.0868 (whole val split)
optimizer = 'muon'  # torch.optim.Muon for the 2-D hidden matrices, AdamW for the rest: 1.5469 with the scale below
muon_lr_scale = 5.0  # Muon's rate over AdamW's: 5 was the better of 1, 5 and 10 after 250 iterations
