# Recipe (mechanism keys only): mixture of experts. Layer it on a size file, e.g. config/train_bench_cpu.py.
# Every layer's MLP becomes 4 full-size
# expert MLPs with a top-1 router, so a token runs the FLOPs of one dense MLP (plus the 4-logit router);
# same data, steps and seed as the baseline. Top-2: add --experts_top_k=2 --out_dir=out-bench-moe-top2.
# $ python train_efficient.py config/train_bench_cpu.py config/train_bench_moe_cpu.py

out_dir = 'out-bench-moe-top1'
model_type = 'efficient'
enable_dynamic_routing = True
num_experts = 4
experts_top_k = 1
router_aux_loss_weight = 0.01  # Switch's value: balances the experts without overriding the LM loss
router_z_loss_weight = 0.001  # ST-MoE's value
moe_layers = 'all'
