"""The strong dense baseline's keys (qk_norm, mlp_act, zero_init_proj, tie_embeddings, value_embeds, smear,
logit_softcap) and training keys (optimizer='muon', lr_schedule='wsd'): off means nanoGPT, causal, cached decode
equals the reference, the cost model sees every new weight, and Muon resumes exactly."""

import pytest
import torch

from checkpoint import load_checkpoint
from model import GPT, GPTConfig, Muon, Optimizers
from model_efficient import EfficientGPT, EfficientGPTConfig
from test_train import tiny_data, train  # noqa: F401 (tiny_data is a fixture)

ALL = dict(qk_norm=True, mlp_act='relu2', zero_init_proj=True, tie_embeddings=False, value_embeds='0,-1', smear=True,
           logit_softcap=15.0)


def make(tiny_args, seed=0, big=True, **keys):
    """A tiny model; big: every weight redrawn larger (zero-initialised ones too), so every path shows."""
    torch.manual_seed(seed)
    model = EfficientGPT(EfficientGPTConfig(**{**tiny_args, **keys})).eval()
    if big:
        for p in model.parameters():
            p.data.normal_(0, 0.2)
    return model


def test_everything_off_initialises_and_computes_as_gpt(tiny_args):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**tiny_args)).eval()
    eff = make(tiny_args, big=False)
    assert list(eff.state_dict()) == list(gpt.state_dict())
    for (k, a), b in zip(gpt.state_dict().items(), eff.state_dict().values()):
        assert torch.equal(a, b), k  # same draws in the same order: the new keys take nothing from the RNG when off
    x = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(eff(x, x)[0], gpt(x, x)[0])
    assert isinstance(gpt.transformer.h[0].mlp.gelu, torch.nn.GELU)


def neutral_twin(tiny_args, key, value, neutralise):
    """The model with one key on, its new weights set so the key does nothing, against the model without it."""
    plain = make(tiny_args, pos_emb='rope')
    on = make(tiny_args, seed=1, pos_emb='rope', **{key: value})
    state = on.state_dict()
    state.update({k: v for k, v in plain.state_dict().items() if k in state})
    on.load_state_dict(state)
    neutralise(on, plain)
    x = torch.randint(0, 50, (2, 32))
    return on(x, x)[0], plain(x, x)[0]


def zero_tables(on, plain):
    for t in on.value_embeds.tables:
        t.weight.data.zero_()


def copy_head_to_wte(on, plain):
    on.transformer.wte.weight.data.copy_(plain.lm_head.weight)


def zero_smear(on, plain):
    on.smear.scale.data.zero_()


@pytest.mark.parametrize('key,value,neutralise', [
    ('value_embeds', 'all', zero_tables),  # zero rows add nothing to v
    ('tie_embeddings', False, copy_head_to_wte),  # two equal tables compute what one tied table does
    ('smear', True, zero_smear),  # λ = 0: the plain embedding
    ('logit_softcap', 1e6, lambda on, plain: None),  # c·tanh(x/c) -> x as c grows
    ('zero_init_proj', True, lambda on, plain: None),  # an init only: the same weights compute the same
])
def test_each_key_at_its_neutral_setting_computes_the_model_without_it(tiny_args, key, value, neutralise):
    a, b = neutral_twin(tiny_args, key, value, neutralise)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_zero_init_proj_starts_every_block_as_the_identity(tiny_args):
    model = make(tiny_args, big=False, zero_init_proj=True, dropout=0.0)
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if n.endswith('c_proj.weight'))
    h = torch.randn(1, 5, tiny_args['n_embd'])
    torch.testing.assert_close(model.transformer.h[0](h), h)


def test_qk_norm_normalises_each_head_and_relu2_is_relu_squared(tiny_args):
    model = make(tiny_args, qk_norm=True, mlp_act='relu2', pos_emb='rope')
    attn, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    qk = attn.rotate.norm(torch.randn(2, 3, 5, 16) * 7 + 3)
    torch.testing.assert_close(qk.pow(2).mean(-1), torch.ones(2, 3, 5), atol=1e-3, rtol=1e-3)
    u = torch.randn(10)
    torch.testing.assert_close(mlp.gelu(u), torch.relu(u) ** 2)
    full = make(tiny_args, qk_norm=True)  # learned positions: the full attention that normalises q and k
    assert type(full.transformer.h[0].attn).__name__ == 'RotarySelfAttention'


@pytest.mark.parametrize('keys', [dict(ALL, pos_emb='rope'), dict(ALL),
                                  dict(ALL, pos_emb='rope', enable_local_attention=True, local_attention_window=6)])
def test_causal_with_every_key_on(tiny_args, keys):
    model = make(tiny_args, **keys)
    x = torch.randint(0, 50, (1, 30))
    a = model(x, x)[0]
    for j in (0, 9, 17, 29):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 50
        b = model(y, y)[0]
        torch.testing.assert_close(b[:, :j], a[:, :j], msg=f"position {j} leaks into earlier ones")
        assert not torch.allclose(b[:, j:], a[:, j:])


@pytest.mark.parametrize('keys', [dict(ALL, pos_emb='rope'), dict(ALL),
                                  dict(ALL, pos_emb='rope', enable_local_attention=True, local_attention_window=6)])
def test_cached_decode_equals_the_reference_past_block_size(tiny_args, keys):
    model = make(tiny_args, **keys)
    idx = torch.randint(0, 50, (2, 3))
    cache = model.new_cache(2)
    with torch.no_grad():
        for _ in range(75):  # block_size 32: crosses it twice (a crop and re-prefill, or streaming)
            fast = model.next_logits(idx, cache)
            torch.testing.assert_close(fast, model.next_logits(idx), atol=1e-5, rtol=1e-4)
            idx = torch.cat([idx, torch.multinomial(torch.softmax(fast, -1), 1)], dim=1)
    greedy = model.generate(idx[:1, :1], 80, temperature=0)
    assert torch.equal(greedy, model.generate(idx[:1, :1], 80, temperature=0, use_cache=False))


def test_pondering_layers_with_every_key_decode_as_their_reference(tiny_args):
    """ACT propagates K/V for the steps a halted token skips: through the value rows and the qk norm too."""
    model = make(tiny_args, **ALL, pos_emb='rope', adaptive_compute='act', act_layers='all', act_epsilon=0.3)
    out = model.generate(torch.tensor([[4]]), 40, temperature=0)
    assert torch.equal(out, model.generate(torch.tensor([[4]]), 40, temperature=0, use_cache=False))


def test_smear_state_rolls_back_within_its_margin(tiny_args):
    model = make(tiny_args, smear=True, pos_emb='rope')
    idx = torch.randint(0, 50, (1, 20))
    cache = model.new_cache(1, rollback=3)
    with torch.no_grad():
        model(idx[:, :15], cache=cache)
        first = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(15, 20)]
        model.truncate_cache(cache, 17)
        again = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(17, 20)]
    torch.testing.assert_close(torch.cat(again), torch.cat(first[2:]))
    with pytest.raises(ValueError, match='roll the smear state back'):
        cache[tiny_args['n_layer']].truncate(10)


def test_decode_cost_counts_every_new_weight(tiny_args):
    C, L = tiny_args['n_embd'], tiny_args['n_layer']
    plain = make(tiny_args, pos_emb='rope')
    model = make(tiny_args, **ALL, pos_emb='rope')
    extra = model.decode_cost(10).weight_bytes - plain.decode_cost(10).weight_bytes
    # an untied token row, two value-embedding rows, and the smear gate and its λ, float32
    assert extra == 4 * (C + 2 * C + 12 + 1)
    for m in (plain, model):  # lookups read bytes, not FLOPs: the FLOPs are still 2 per counted parameter
        assert m.decode_cost(10).flops == 2 * m.get_num_params() + 4 * L * C * 10
    assert model.get_num_params(non_embedding=False) - model.get_num_params() == 3 * 50 * C


@pytest.mark.parametrize('keys,message', [
    (dict(mlp_act='swish'), 'mlp_act'),
    (dict(logit_softcap=-1.0), 'logit_softcap'),
    (dict(value_embeds='7'), 'layer pattern'),
    (dict(value_embeds='0', enable_hierarchical=True, hierarchy_layers='0'), 'shortened'),
    (dict(smear=True, adaptive_compute='mod', mod_layers='0'), "adaptive_compute='mod'"),
])
def test_config_rejects_bad_values(tiny_args, keys, message):
    with pytest.raises(ValueError, match=message):
        EfficientGPTConfig(**{**tiny_args, **keys})


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_args):
    model = make(tiny_args, **ALL, pos_emb='rope', big=False)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', 'muon')
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g['params']}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith('transformer.h.') and p.dim() == 2}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g['params']}
    assert {'transformer.wte.weight', 'lm_head.weight', 'smear.gate.weight'} <= in_adamw
    assert not in_muon & in_adamw and len(in_muon | in_adamw) == len(names)
    assert len(opt.param_groups) == 3
    assert type(model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')) is torch.optim.AdamW
    assert isinstance(opt, Optimizers)


def test_muon_steps_at_its_scaled_rate_and_the_schedule_keeps_its_value(tiny_args):
    model = make(tiny_args, pos_emb='rope', big=False)
    twin = make(tiny_args, pos_emb='rope', big=False)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', 'muon', muon_lr_scale=3.0)
    w = model.transformer.h[0].mlp.c_fc.weight
    alone = Muon([twin.transformer.h[0].mlp.c_fc.weight], lr=3e-3, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')
    x = torch.randint(0, 50, (2, 16))
    for m in (model, twin):
        m(x, x)[1].backward()
    opt.step()
    alone.step()
    torch.testing.assert_close(w, twin.transformer.h[0].mlp.c_fc.weight)
    assert [g['lr'] for g in opt.param_groups] == [1e-3] * 3


@pytest.mark.parametrize('adjust_lr_fn', ['match_rms_adamw', None])
def test_muon_is_torchs_step_with_the_iteration_in_float32_on_cpu(adjust_lr_fn):
    # in bfloat16 the step is torch.optim.Muon's to the bit; the float32 iteration (the CPU default) is the same
    # update within bfloat16's rounding
    torch.manual_seed(0)
    start = [torch.randn(24, 40), torch.randn(40, 24)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    ours16, ours32, torchs = ([w.clone().requires_grad_() for w in start] for _ in range(3))
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    opts = [Muon(ours16, ns_dtype=torch.bfloat16, **kw), Muon(ours32, **kw), torch.optim.Muon(torchs, **kw)]
    for step_grads in grads:
        for ws, opt in zip((ours16, ours32, torchs), opts):
            for w, g in zip(ws, step_grads):
                w.grad = g.clone()
            opt.step()
    for a, b, c, w0 in zip(ours16, ours32, torchs, start):
        assert torch.equal(a, c)
        assert not torch.equal(b, c)
        assert (b - c).norm() < 0.05 * (c - w0).norm()


def test_muon_and_wsd_resume_exactly(tmp_path, tiny_data):  # noqa: F811
    keys = ['--model_type=efficient', '--pos_emb=rope', '--qk_norm=True', '--smear=True', '--value_embeds=0',
            '--optimizer=muon', '--lr_schedule=wsd', '--eval_interval=6', '--final_eval_windows=0']
    train(tmp_path / 'straight', tiny_data, '--max_iters=12', *keys)
    train(tmp_path / 'split', tiny_data, '--max_iters=6', *keys)
    train(tmp_path / 'split', tiny_data, '--max_iters=12', '--init_from=resume', *keys)
    a = load_checkpoint(str(tmp_path / 'straight' / 'ckpt.pt'))
    b = load_checkpoint(str(tmp_path / 'split' / 'ckpt.pt'))
    assert a['iter_num'] == b['iter_num'] == 12 and len(a['optimizer']['optimizers']) == 2
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_wsd_holds_the_peak_then_decays_linearly(tmp_path, tiny_data):  # noqa: F811
    r = train(tmp_path / 'out', tiny_data, '--max_iters=40', '--lr_schedule=wsd', '--wsd_decay_frac=0.25',
              '--learning_rate=1e-3', '--min_lr=1e-4', '--eval_interval=40', '--final_eval_windows=0')
    lrs = [float(line.rsplit('lr ', 1)[1].split(',')[0]) for line in r.stdout.splitlines() if line.startswith('iter ')]
    # TINY: warm-up 2, lr_decay_iters 40: stable to iteration 30, then linear to min_lr
    assert lrs[5:29] == [1e-3] * 24 and lrs[34] == pytest.approx(1e-3 - 0.9e-3 * 4 / 10, abs=1e-5)


def test_bad_optimizer_or_schedule_is_an_error(tmp_path, tiny_data):  # noqa: F811
    for arg in ('--optimizer=sgd', '--lr_schedule=linear', '--wsd_decay_frac=0'):
        r = train(tmp_path / 'out', tiny_data, arg, check=False)
        assert r.returncode == 2 and arg[2:].split('=')[0] in r.stderr


@pytest.mark.parametrize('norm', [None, 'layer'])
def test_rotary_decode_matmul_equals_the_batched_rotation(norm):
    from local_attention import Rotary, head_norm
    rot = Rotary(16, table_len=40, norm=head_norm if norm else None)
    qk = torch.randn(2, 1, 3, 40, 16) * 3
    batched = rot.position(qk)
    for t in (0, 1, 17, 39):
        torch.testing.assert_close(rot.position(qk[..., t:t + 1, :], t), batched[..., t:t + 1, :])
    past = rot.position(qk[..., :1, :], 45)  # past the table: computed, not tabled
    torch.testing.assert_close(past, Rotary(16, table_len=50, norm=rot.norm).position(qk[..., :1, :], 45))
