"""The combined EfficientGPT (config/train_efficient_gpt.py over config/train_bench_cpu.py) and the suite that
measures it (bench_suite.py)."""

import os
from dataclasses import fields
from subprocess import CompletedProcess

import numpy as np
import pytest
import torch

import bench_suite
from configurator import load_config_file
from evaluate import evaluate_loss, streaming_loss
from hierarchical_modules import groups_closed
from model import GPT, GPTConfig
from model_efficient import EfficientGPT, EfficientGPTConfig
from static_decode import StaticDecoder

CONFIG = load_config_file(os.path.join(bench_suite.REPO, 'config', 'train_efficient_gpt.py'))
BASE = load_config_file(os.path.join(bench_suite.REPO, bench_suite.SIZES[128][0]))
TRAIN = dict(weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.99)  # a checkpoint's optimizer settings
MECHANISM_KEYS = {f.name for f in fields(EfficientGPTConfig)} - {f.name for f in fields(GPTConfig)}


def test_sets_nothing_but_mechanisms_over_the_baseline():
    """It starts from config/train_bench_cpu.py and changes no data, step, seed or size, only the optimizer (the
    strong baseline's Muon): the comparison is fair."""
    changed = {k for k in CONFIG if CONFIG[k] != BASE.get(k)}
    assert changed - MECHANISM_KEYS == {'model_type', 'out_dir', 'optimizer', 'muon_lr_scale'}
    assert changed & MECHANISM_KEYS


def tiny_combined(**changes):
    """The combination's mechanism keys on a 4-layer model with a 32-token context (the shortened run keeps
    its shape: every layer but the last)."""
    keys = {k: CONFIG[k] for k in MECHANISM_KEYS if k in CONFIG}
    size = dict(n_layer=4, n_head=2, n_embd=32, block_size=32, vocab_size=50, dropout=0.0, bias=True)
    keys.update(dict(hierarchy_layers='0,1,2', hierarchy_factor=4, local_attention_window=6), **changes)
    torch.manual_seed(0)
    model = EfficientGPT(EfficientGPTConfig(**{**keys, **size})).eval()
    for p in model.parameters():  # larger weights: every path shows in the logits
        p.data.normal_(0, 0.2)
    return model


def test_combined_model_is_causal():
    model = tiny_combined()
    x = torch.randint(0, 50, (1, 32))
    logits, _ = model(x, x)
    for j in range(0, 32, 3):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 50
        torch.testing.assert_close(model(y, y)[0][:, :j], logits[:, :j], msg=f"position {j} leaks into earlier ones")


def test_combined_model_streams_past_block_size_like_its_reference():
    model = tiny_combined()
    assert model.streams
    idx = torch.tensor([[7], [3]])
    cached = model.generate(idx, 100, temperature=0)  # three block_sizes, no re-prefill
    assert torch.equal(cached, model.generate(idx, 100, temperature=0, use_cache=False))


def test_shortened_window_is_capped_at_the_groups_training_shows():
    model = tiny_combined(local_attention_window=64)
    short = groups_closed(32, 4)  # 8 groups in a block_size context
    assert [block.attn.window for block in model.transformer.h] == [short] * 3 + [64]
    cache = model.new_cache(1)
    assert [c.window for c in cache[:4]] == [short] * 3 + [64]
    x = torch.randint(0, 50, (1, 32))
    # inside the context the cap changes nothing: the same weights with full attention compute the same
    full = tiny_combined(enable_local_attention=False, local_attention_window=128)
    torch.testing.assert_close(model(x, x)[0], full(x, x)[0])


def test_suite_models_train_with_existing_recipes_into_their_own_folders():
    dirs = [bench_suite.out_dir_of(name, size, dataset) for name in bench_suite.MODELS for size in bench_suite.SIZES
            for dataset in bench_suite.DATASETS]
    assert len(set(dirs)) == len(dirs)
    for dataset, (files, _) in bench_suite.DATASETS.items():  # layered last, so the dataset is the one named
        for f in files:
            assert load_config_file(os.path.join(bench_suite.REPO, f))['dataset'] == dataset
    for size_file, _ in bench_suite.SIZES.values():
        assert load_config_file(os.path.join(bench_suite.REPO, size_file))['n_layer'] == BASE['n_layer']
    for files, _ in bench_suite.MODELS.values():  # recipes only: the size file sets data, steps, seed and size
        for f in files:
            assert open(os.path.join(bench_suite.REPO, f)).readline().startswith('# Recipe'), f


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    history = [dict(iter=i, tokens=i * 10, train_seconds=i / 10, val_loss=loss)
               for i, loss in ((0, 4.0), (100, 2.5), (200, 2.15), (300, 2.2), (400, 2.0))]
    figures = bench_suite.training_figures({'eval_history': history, 'final_val_loss': 2.01}, target=2.2)
    assert figures == dict(train_tok_s=100.0, iters_to_target=200, final_val_loss=2.01,
                           loss_curve=[(h['iter'], h['train_seconds'], h['val_loss']) for h in history])
    assert bench_suite.training_figures({'eval_history': history}, target=1.0)['iters_to_target'] is None
    assert bench_suite.training_figures({}, target=2.2)['iters_to_target'] is None
    # the report's time: the iterations at the step speed the suite measured, not the logged seconds
    assert bench_suite.measured_seconds(dict(figures, train_steps_s=4.0), figures['iters_to_target']) == 50.0
    assert bench_suite.measured_seconds(figures, figures['iters_to_target']) is None


def test_model_sets_expand_and_the_baselines_come_first_once(tmp_path):
    headline = ['strong_3l', 'efficient_gpt', 'efficient_gpt_8l']
    assert bench_suite.model_names(bench_suite.DEFAULTS['models']) == bench_suite.BASELINES + headline
    assert bench_suite.model_names('all') == list(bench_suite.MODELS)
    assert bench_suite.model_names('topk,strong,headline,topk') == ['baseline', 'strong', 'topk', *headline]
    (tmp_path / 'ckpt.pt').touch()  # a folder holding a checkpoint is measured as it is, from there
    assert bench_suite.model_names(f'{tmp_path},topk') == bench_suite.BASELINES + [str(tmp_path), 'topk']
    assert bench_suite.out_dir_of(str(tmp_path), 384) == str(tmp_path)


def test_the_suite_resumes_a_training_that_stopped_early_and_keeps_a_finished_one(tmp_path, monkeypatch, capsys):
    def checkpoint(name, iters):
        os.makedirs(tmp_path / name)
        torch.save(dict(model={}, model_args={}, iter_num=iters, config=dict(max_iters=10)), tmp_path / name / 'ckpt.pt')
    checkpoint('strong', 4)  # interrupted: Ctrl-C writes a checkpoint
    checkpoint('topk', 10)
    commands = []
    monkeypatch.setattr(bench_suite, 'out_dir_of', lambda name, size, dataset: str(tmp_path / name))
    monkeypatch.setattr(bench_suite.subprocess, 'run', lambda cmd, **kw: commands.append(cmd) or CompletedProcess(cmd, 0))
    cfg = dict(size=128, dataset='shakespeare_char', jobs=1, device='cpu', dtype='float32')
    bench_suite.train_missing(['baseline', 'strong', 'topk'], cfg)
    trained = {next(a for a in c if a.startswith('--out_dir=')).rsplit('/', 1)[-1]: c for c in commands}
    assert sorted(trained) == ['baseline', 'strong']  # the finished one is measured as it is
    assert '--init_from=resume' in trained['strong'] and '--init_from=resume' not in trained['baseline']
    checkpoint('mine', 4)  # a folder of the user's: the suite has no recipe to resume it with
    with pytest.raises(SystemExit):
        bench_suite.train_missing([str(tmp_path / 'mine')], cfg)
    assert 'stopped before max_iters' in capsys.readouterr().err
    (tmp_path / 'topk' / 'ckpt.pt').write_text('not a checkpoint')
    with pytest.raises(SystemExit):
        bench_suite.train_missing(['topk'], cfg)
    assert 'is not a checkpoint this project wrote' in capsys.readouterr().err


@pytest.mark.parametrize('arg, unknown', [('--models=baseline,hourglas', 'hourglas'), ('--models=tests', 'tests'),
                                          ('--dataset=shakespear', 'shakespear')])
def test_unknown_model_or_dataset_is_an_error(arg, unknown, capsys, monkeypatch):
    monkeypatch.setattr('sys.argv', ['bench_suite.py', arg])
    with pytest.raises(SystemExit):
        bench_suite.main()
    assert unknown in capsys.readouterr().err


def test_report_of_an_earlier_run(tmp_path, capsys, monkeypatch):
    def ratio(x):
        return dict(median=x, min=x, max=x)
    row = dict(decode_tok_s=1000.0, vs=dict(baseline=ratio(2.5), strong=ratio(2.0), strong_static=ratio(1.6)),
               batch_tok_s=9000.0,
               batch_vs=dict(baseline=ratio(1.5), strong=ratio(1.2)), val_loss=2.0, bits=2.885, flops_per_token=2e6,
               weight_bytes_per_token=4e6, kv_cache_bytes=4096, train_tok_s=7000.0, iters_to_target=300,
               train_steps_s=2.5)
    base = dict(row, vs=dict(baseline=ratio(1.0), strong=ratio(0.8)))
    strong = dict(row, decode_tok_s=1250.0, val_loss=1.8, vs=dict(baseline=ratio(1.25), strong=ratio(1.0)))
    reference = dict(b1_tok_s=150.0, b1_vs_cached=ratio(0.14), batch_tok_s=300.0, batch_vs_cached=ratio(0.03),
                     past_tok_s=70.0, past_vs_cached=ratio(0.7), read_bytes_s=8e9)
    results = dict(config=dict(bench_suite.DEFAULTS), header='a header', reference=reference, target_loss=1.8,
                   rows=dict(baseline=base, strong=strong,
                             efficient_gpt=dict(row, val_loss=2.02, past_tok_s=2100.0, past_vs_reference=ratio(30.0),
                                                stream_loss_past_block=1.9, window_loss_past_block=1.95)))
    (tmp_path / 'r.json').write_text(__import__('json').dumps(results))
    monkeypatch.setattr('sys.argv', ['bench_suite.py', f"--report={tmp_path / 'r.json'}"])
    bench_suite.main()
    out = capsys.readouterr().out
    # ratios and loss changes against both baselines; 1,000 tok/s * 4 MB / 8 GB/s is half the roofline
    assert '| efficient_gpt | 1,000 | 2.50x (2.50-2.50) | 2.00x (2.00-2.00) | 1.60x (1.60-1.60) | 50% |' in out
    assert '| 1.50x (1.50-1.50) | 1.20x (1.20-1.20) | — | 2.0200 |' in out  # batched: no static-step ratio in this run
    assert '| 2.0200 | +1.0% | +12.2% |' in out
    assert '| 300 it, 120 s |' in out  # 300 iterations at 2.5 steps/s
    assert '| uncached reference' in out and '0.14x' in out and '| efficient_gpt | 2,100 | 30.0x' in out
    # a second run adds its models; the baselines stay the first run's
    second = dict(results, header='another header', rows=dict(baseline=dict(base, decode_tok_s=5.0),
                                                               act=dict(row, decode_tok_s=600.0)))
    (tmp_path / 's.json').write_text(__import__('json').dumps(second))
    monkeypatch.setattr('sys.argv', ['bench_suite.py', f"--report={tmp_path / 'r.json'},{tmp_path / 's.json'}"])
    bench_suite.main()
    out = capsys.readouterr().out
    assert 'a header\nanother header' in out and '| act | 600 |' in out and '| efficient_gpt | 1,000 |' in out
    assert '| baseline | 1,000 |' in out


def test_streaming_loss_scores_what_the_whole_text_forward_scores():
    model = tiny_combined()
    data = np.random.default_rng(0).integers(0, 50, 101).astype(np.uint16)
    inside, past = streaming_loss(model, data, 100, chunk=7)  # block_size 32: 68 positions past it
    x = torch.from_numpy(data.astype(np.int64))
    logits, _ = model(x[None, :100], x[None, 1:101])  # uncached, whole text (a streaming model has no limit)
    losses = torch.nn.functional.cross_entropy(logits[0], x[1:101], reduction='none')
    assert inside == pytest.approx(losses[:32].mean().item(), rel=1e-4)
    assert past == pytest.approx(losses[32:].mean().item(), rel=1e-4)


def test_suite_row_of_a_streaming_model_against_the_baseline():
    model, data = tiny_combined(), (np.arange(400) % 50).astype(np.uint16)
    torch.manual_seed(1)
    base = EfficientGPT(EfficientGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50)).eval()
    strong = EfficientGPT(EfficientGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50,
                                             pos_emb='rope')).eval()
    cfg = dict(bench_suite.DEFAULTS, new_tokens=8, batch=2, runs=1, reference_runs=1, past_tokens=40, val_windows=2,
               stream_eval_tokens=64, device='cpu')
    prompts = torch.randint(50, (2, 1))
    with torch.no_grad():
        x, before = torch.randint(50, (2, 32)), [p.clone() for p in model.parameters()]
        steps = {name: bench_suite.training_step(m, dict(config=TRAIN), x)
                 for name, m in (('efficient_gpt', model), ('baseline', base), ('strong', strong))}
        rivals = dict(baseline=base, strong=strong, strong_static=StaticDecoder(strong))
        row = bench_suite.measure('efficient_gpt', model, rivals, data, cfg, prompts, lambda: None, {}, steps,
                                  StaticDecoder(model))  # its own static step against the strong one's
        base_row = bench_suite.measure('baseline', base, rivals, data, cfg, prompts, lambda: None, {})
        ref = bench_suite.reference(base, cfg, prompts, lambda: None)
    # the loss read through the cached decode is the forward's: the model decodes what it trained
    assert row['val_loss'] == pytest.approx(evaluate_loss(model, data, 32, 2, 2), rel=1e-4)
    # the shortened layers run once per k tokens: less work than the same layers at full resolution
    assert row['flops_per_token'] == model.decode_cost(4.5).flops < GPT.decode_cost(model, 4.5).flops
    assert row['past_vs_reference']['median'] > 0 and 'stream_loss_past_block' in row and row['kv_cache_bytes'] > 0
    assert {'b1_vs_cached', 'batch_vs_cached', 'past_vs_cached'} <= ref.keys() and ref['read_bytes_s'] > 0
    assert row['vs'].keys() == row['batch_vs'].keys() == {'baseline', 'strong', 'strong_static'}
    assert base_row['vs']['baseline']['median'] == 1.0 and base_row['vs']['strong']['runs'] != [1.0]
    assert row['vs']['strong_static']['runs'] != [1.0] and base_row['vs']['strong_static']['runs'] != [1.0]
    assert row['train_step_vs'].keys() == {'baseline', 'strong'} and row['train_steps_s'] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the steps trained copies
