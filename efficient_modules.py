"""
The interchangeable parts of an EfficientGPT block. Each slot has a registry, and a block fills its
slots once in __init__ from the layer plan (model_efficient.LayerPlan):

    ATTN[kind](config, layer) -> module with forward(x, cache=None) -> y          x, y: (B, T, C)
    FFN[kind](config, layer)  -> module with forward(x) -> y                      x, y: (B, T, C)

A module that adds a training loss stores it in `self.aux = {name: (weight, value)}` during forward;
EfficientGPT.aux_losses() gathers them and the training script adds Σ weight·value to the LM loss.
"""

from model import MLP, CausalSelfAttention

ATTN = {
    'full': lambda config, layer: CausalSelfAttention(config),
}

FFN = {
    'dense': lambda config, layer: MLP(config),
}
