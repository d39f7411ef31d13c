# Recipe (mechanism keys only): early exit. Layer it on a size file, e.g. config/train_bench_cpu.py, which
# sets everything else (same data, steps and seed as the baseline).
# $ python train_efficient.py config/train_bench_cpu.py config/train_bench_early_exit.py
# Measured with the bench.py command in docs/early_exit.md.

out_dir = 'out-bench-early-exit'
model_type = 'efficient'
enable_early_exit = True
# Every layer but the last may exit and gets an exit loss: on characters, which depth suffices varies a lot
# from token to token, and each exit check (ln_f + a 65-wide head) costs far less than a layer.
exit_layers = 'all'
# LayerSkip's early-exit loss: the exits share this total weight in proportion to depth (1/15 .. 5/15 for
# the 5 exits of 6 layers), on top of the final layer's weight 1. Without it a shallow layer read through
# the final head is a poor predictor (logit lens), so exits would be rare or costly in loss.
early_exit_loss_weight = 1.0
# Decode-time settings (no effect on training; bench.py sweeps them): the learned classifier (CALM) exits
# when it predicts the exit's argmax agrees with the final layer's with this probability.
exit_criterion = 'learned'
exit_threshold = 0.9
# Self-speculative decode: draft 4 tokens with the first 2 layers, verify with the other 4 in one pass.
spec_exit_layer = 2
spec_draft_tokens = 4
