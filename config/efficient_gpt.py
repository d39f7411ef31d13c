# Recipe (mechanism keys only): EfficientGPT, the combination. Layer it on a size file, or run a headline file:
# config/train_efficient_gpt.py (128 dims) or config/train_efficient_gpt384.py (384 dims).
# The mechanisms that pay at batch-1 decode, chosen by measurement (docs/combination.md).
out_dir = 'out-efficient-gpt'
model_type = 'efficient'
# Hourglass with no full-resolution layer before it: layers 0-4 read the token embeddings mean-pooled in
# groups of 32 characters and run once per group at decode; only layer 5 sees every character. A decoded
# token runs 1 + 5/32 layers instead of 6. k = 32 was the fastest setting tried within 2% of the baseline's
# loss (k = 4, 8, 16, and a full-resolution layer 0, are in docs/combination.md).
enable_hierarchical = True
hierarchy_factor = 32
hierarchy_layers = ':-1'  # every layer but the last
# Rotary positions and a 64-character window in every layer (the shortened layers' window is capped at the
# 256 / 32 = 8 groups of one context): rope wins back the quality the coarse layers cost, and the rolling
# caches let generation stream past block_size at constant memory and cost per token.
pos_emb = 'rope'
enable_local_attention = True
local_attention_window = 64
# Muon for the hidden matrices, as the strong baseline, at 2x AdamW's rate: 1.7456 against AdamW's 1.8204 at 128
# dims, and at 384 dims AdamW at nanoGPT's 1e-3 never left the unigram loss (3.35) while Muon x2 trains. 5x (the
# strong baseline's) diverges on the hourglass (docs/combination.md)
optimizer = 'muon'
muon_lr_scale = 2.0
# Left off, each measured alone on this model (docs/): top-k and MoE MLPs slow batch-1 decode at 128
# dims (0.80x and 0.60x: the gathered down-projection and the router cost more than they skip); ACT slows
# it too (0.68x); early exit alone reached 2.09x only at +4.5% loss.
