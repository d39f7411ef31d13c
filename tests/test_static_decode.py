"""The static-shape decode step against the models' own decode: the same logits at every step and the same greedy
tokens, inside and past block_size, for nanoGPT's GPT, the strong baseline's rotary model, local attention and
EfficientGPT's combination (the hourglass with every layer local and rotary, which streams past block_size)."""

import os

import pytest
import torch

from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from static_decode import StaticDecoder, why_not_static

ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
LOCAL = dict(enable_local_attention=True, pos_emb='rope')
# config/efficient_gpt.py and efficient_gpt_8l.py at tiny sizes: no full-resolution layer before the shortened ones
COMBINED = dict(LOCAL, enable_hierarchical=True, hierarchy_layers=':-1')


def dense_models():
    torch.manual_seed(0)
    return {'gpt': GPT(GPTConfig(**ARGS, bias=True)).eval(),
            'rope': EfficientGPT(EfficientGPTConfig(**ARGS, bias=False, pos_emb='rope')).eval(),
            'gelu_tanh': EfficientGPT(EfficientGPTConfig(**ARGS, mlp_act='gelu_tanh')).eval()}


def efficient_models():
    """Streaming (rotary, every layer local) and not (learned positions, a full layer, full-attention hourglass)."""
    configs = {
        'local_sinks': dict(ARGS, **LOCAL, local_attention_window=4, attention_sinks=2),
        'local_learned': dict(ARGS, enable_local_attention=True, local_attention_window=4),
        'local_global': dict(ARGS, **LOCAL, local_attention_window=4, global_layers='0'),
        'efficient_gpt': dict(ARGS, **COMBINED, hierarchy_factor=4, local_attention_window=8),
        'efficient_gpt_8l': dict(ARGS, **dict(COMBINED, hierarchy_layers=':-3'), n_layer=4, hierarchy_factor=2,
                                 local_attention_window=4, block_size=32),
        'hourglass_middle': dict(ARGS, **dict(COMBINED, hierarchy_layers='1:-1'), n_layer=3, hierarchy_factor=2,
                                 local_attention_window=4),
        'hourglass_full': dict(ARGS, n_layer=3, enable_hierarchical=True, hierarchy_layers='1:-1', hierarchy_factor=4),
    }
    torch.manual_seed(0)
    return {name: EfficientGPT(EfficientGPTConfig(**c)).eval() for name, c in configs.items()}


MODELS = {**dense_models(), **efficient_models()}


@pytest.mark.parametrize('prompt', [3, 4])  # with the hourglass: inside a group, and the last one closed (k = 2, 4)
@pytest.mark.parametrize('name', list(MODELS))
def test_static_step_logits_equal_the_models_cached_decode(name, prompt):
    model = MODELS[name]
    static, T = StaticDecoder(model), model.config.block_size
    x = torch.randint(50, (2, 3 * T))  # past block_size: a streaming model keeps stepping, the others recompute
    state, ref_caches = static.new_state(2), model.new_cache(2)
    with torch.inference_mode():
        for t in range(prompt, 3 * T + 1):  # the prompt, then one token at a time
            got, want = static.next_logits(x[:, :t], state), model.next_logits(x[:, :t], ref_caches)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', list(MODELS))
def test_static_generate_equals_generate(name):
    model = MODELS[name]
    prompt = torch.randint(50, (2, 2))
    new = 2 * model.config.block_size + 5
    want = model.generate(prompt, new, temperature=0)
    assert torch.equal(StaticDecoder(model).generate(prompt, new, temperature=0), want)


def test_models_the_static_step_cannot_run_are_refused_with_the_reason():
    refused = {'top-k': dict(enable_sparse_activation=True), 'mixture-of-experts': dict(enable_dynamic_routing=True),
               'ACT': dict(adaptive_compute='act', act_layers='0'), 'Mixture-of-Depths': dict(adaptive_compute='mod'),
               'qk_norm': dict(qk_norm=True), 'early exit': dict(enable_early_exit=True),
               'value embeddings': dict(value_embeds='0'), 'smear': dict(smear=True),
               'soft-capped head': dict(logit_softcap=30.0), 'GELU': dict(mlp_act='relu2')}
    for reason, keys in refused.items():
        model = EfficientGPT(EfficientGPTConfig(**ARGS, **keys))
        assert reason in why_not_static(model), reason
        with pytest.raises(ValueError, match='static decode runs'):
            StaticDecoder(model)
    assert all(why_not_static(m) == '' for m in MODELS.values())


@pytest.mark.skipif(os.environ.get('STATIC_COMPILE_TEST') != '1',
                    reason='compiles two graphs on CPU (~30 s): set STATIC_COMPILE_TEST=1')
def test_compiled_steps_make_one_graph_per_step_kind_and_never_recompile():
    from torch._dynamo.utils import counters
    model = MODELS['efficient_gpt']
    torch._dynamo.reset()
    counters.clear()
    prompt = torch.randint(50, (2, 3))
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation raises
        got = StaticDecoder(model, compile=True).generate(prompt, 3 * model.config.block_size, temperature=0)
    assert counters['stats']['unique_graphs'] == 2  # the step that reads its group's update, the one that closes it
    assert torch.equal(got, model.generate(prompt, 3 * model.config.block_size, temperature=0))
