"""The static-shape decode step against the models' own decode: the same logits at every step and the same greedy
tokens, inside and past block_size, for nanoGPT's GPT and the strong baseline's rotary model."""

import pytest
import torch

from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from static_decode import StaticDecoder, why_not_static

ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)


def dense_models():
    torch.manual_seed(0)
    return {'gpt': GPT(GPTConfig(**ARGS, bias=True)).eval(),
            'rope': EfficientGPT(EfficientGPTConfig(**ARGS, bias=False, pos_emb='rope')).eval(),
            'gelu_tanh': EfficientGPT(EfficientGPTConfig(**ARGS, mlp_act='gelu_tanh')).eval()}


@pytest.mark.parametrize('name', list(dense_models()))
def test_static_step_logits_equal_the_models_cached_decode(name):
    model = dense_models()[name]
    static = StaticDecoder(model)
    x = torch.randint(50, (2, 30))  # past block_size 16: both recompute the cropped context there
    caches, ref_caches = model.new_cache(2), model.new_cache(2)
    with torch.inference_mode():
        for t in range(3, 31):  # a 3-token prompt, then one token at a time
            got, want = static.next_logits(x[:, :t], caches), model.next_logits(x[:, :t], ref_caches)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', list(dense_models()))
def test_static_generate_equals_generate(name):
    model = dense_models()[name]
    prompt = torch.randint(50, (2, 2))
    want = model.generate(prompt, 25, temperature=0)
    assert torch.equal(StaticDecoder(model).generate(prompt, 25, temperature=0), want)


def test_models_the_static_step_cannot_run_are_refused_with_the_reason():
    local = EfficientGPT(EfficientGPTConfig(**ARGS, enable_local_attention=True, local_attention_window=4))
    hourglass = EfficientGPT(EfficientGPTConfig(**ARGS, enable_hierarchical=True, hierarchy_factor=2, hierarchy_layers='0'))
    assert 'layer 0' in why_not_static(local) and 'hourglass' in why_not_static(hourglass)
    assert why_not_static(dense_models()['rope']) == ''
    with pytest.raises(ValueError, match='dense models only'):
        StaticDecoder(hourglass)
