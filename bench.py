"""
Speed, compute, memory and quality of a model, each figure measured in one process: a table on stdout and,
with --json=PATH, every figure with the settings that produced it.
$ python bench.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --vocab_size=65   # random weights
$ python bench.py --ckpt=out-shakespeare-char/ckpt.pt --val_data=data/shakespeare_char --json=bench.json
Every row of the report is one function; the generic rows are here, each mechanism's beside it in bench_rows/.
A timed row hands its two paths to bench_rows.protocol.time_pair.
"""

import json
import pickle
import resource
import sys
import time
from dataclasses import asdict, fields
from types import SimpleNamespace

import torch

from bench_rows import MECHANISM_ROWS
from bench_rows.protocol import greedy, time_pair, time_rounds, val_memmap
from bench_rows.roofline import decode_sized_sweep, roofline
from bench_rows.sparse import teal_levels
from checkpoint import build_model, from_pretrained, is_pretrained, load_checkpoint, model_from_checkpoint
from common import REPO, autocast, fail, pick_device, pick_dtype, synchronizer
from configurator import configure_or_exit, describe
from early_exit import CRITERIA
from evaluate import bits, evaluate_loss, fixed_windows
from model import GPTConfig
from static_decode import StaticDecoder, why_not_static

# the model measured without --ckpt: random weights, shakespeare_char's size unless overridden
MODEL_ARGS = {**{f.name: f.default for f in fields(GPTConfig)},
              **dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False)}
DEFAULTS = dict(
    ckpt='',  # a checkpoint to measure, or GPT-2 weights ('gpt2', 'hf:<folder>'); empty: random weights of the args below
    data_root=f'{REPO}/data',  # where a nanoGPT checkpoint's data/<dataset>/meta.pkl is
    **MODEL_ARGS,
    new_tokens=250,  # N new tokens per decode run: the one-token prompt + N stay inside block_size 256
    runs=5,  # timed runs of each path, alternating A B A B, after a warm-up
    batch=16,  # batch of the batched decode and prefill rows
    rows='all',  # comma list of the rows to run (all: every row that applies to the model)
    device='auto',  # auto: cuda, then mps, then cpu
    dtype='auto',  # auto: bfloat16 autocast on a GPU that supports it, float16 on older GPUs, else float32
    compile=False,  # torch.compile the model
    threads=0,  # torch threads; 0 keeps torch's default
    seed=1337,  # random weights, prompts and prefill tokens
    val_data='',  # a dataset folder: adds the deterministic validation loss of its val.bin
    val_windows=0,  # score only the first val_windows fixed windows; 0: all of them
    train_batch=8,  # batch of the training-step timing (the CPU benchmark config's)
    json='',  # write every figure and the settings to this path
    baseline='',  # a cached model to compare against (e.g. out-bench-baseline/ckpt.pt); empty: those rows skip
    exit_sweep='max_prob:0.8,0.5,0.3;margin:0.6,0.3,0.1;saturation:0.995,0.99,0.98;learned:0.9,0.8,0.6',  # criterion:thresholds;...
    exit_windows=8,  # early exit: decode-consistent val loss over the first exit_windows fixed windows
    spec_sweep='1:4,2:4,2:6,3:6',  # self-speculative settings, draft_layers:draft_tokens[:draft_confidence],...
    long_T='1024,2048,4096',  # local attention: sequence lengths of the training-step row
    long_window=128,  # local attention: window of the training-step row
    long_tokens=16384,  # local attention: tokens of the long decode row (rolling vs full cache)
    stream_tokens=100000,  # local attention: tokens of the streaming row (rolling cache, past block_size)
    teal_sparsity='',  # TEAL on a dense checkpoint's MLPs: fractions of activations dropped, e.g. '0.25,0.5'; '': no row
)


def decode_pair(b, prompt, n):
    """Greedy decode of n tokens after prompt (B, T): model.generate's cached path vs its reference path."""
    def gen(use_cache):
        return lambda: b.model.generate(prompt, n, temperature=0, use_cache=use_cache)
    cached, reference, t = time_pair(gen(True), gen(False), b.runs, prompt.size(0) * n, b.sync)
    return dict(batch=prompt.size(0), prompt_tokens=prompt.size(1), new_tokens=n, cached_tok_s=t['a'],
                reference_tok_s=t['b'], ratio=t['ratio'], identical_tokens=torch.equal(cached, reference))


def prefill_pair(b, x):
    """One forward over x (B, T): into a fresh KV cache (the cached path) vs without one (reference)."""
    m = b.model
    _, _, t = time_pair(lambda: m(x, cache=m.new_cache(x.size(0))), lambda: m(x), b.runs, x.numel(), b.sync)
    return dict(batch=x.size(0), tokens=x.size(1), cached_tok_s=t['a'], reference_tok_s=t['b'], ratio=t['ratio'])


def decode(b):
    """decode, batch 1, cached / reference"""
    return decode_pair(b, b.prompt[:1], b.new_tokens)


def decode_batch(b):
    """decode, batched, cached / reference"""
    return decode_pair(b, b.prompt, b.new_tokens)


def past_block(b):
    """decode past block_size (2 * block_size tokens), batch 1, cached / reference"""
    # past block_size both paths recompute the cropped context every step; the cached one must still agree
    return decode_pair(b, b.prompt[:1], 2 * b.model.config.block_size)


def prefill(b):
    """prefill, batch 1, one forward over block_size tokens, cached / reference"""
    return prefill_pair(b, b.prefill_x[:1])


def prefill_batch(b):
    """prefill, batched, one forward over block_size tokens, cached / reference"""
    return prefill_pair(b, b.prefill_x)



def compute(b):
    """work per generated token (FLOPs, weight bytes, as executed) and KV cache, batch 1 greedy decode"""
    m, n = b.model, b.new_tokens
    stream, cache = greedy(m)
    for _ in stream(b.prompt[:1], n):
        pass
    ctx = (n + 1) / 2  # decoding N tokens feeds positions 0 .. N-1, which attend to 1 .. N positions
    cost = m.decode_cost(ctx)
    return dict(new_tokens=n, mean_ctx=ctx, flops_per_token=cost.flops, weight_bytes_per_token=cost.weight_bytes,
                flops_per_token_full_block=m.decode_cost(m.config.block_size).flops,
                kv_cache_positions=cache[-1].len, kv_cache_bytes=sum(c.nbytes for c in cache))


def static_decode(b):
    """decode through the static-shape step (static_decode.py; compiled with --compile) / generate(), batch 1 and
    batched, and each one's share of the roofline at batch 1 (GEMVs over the model's matrices timed in turn)"""
    if why_not_static(b.model):
        return None
    m, n, static = b.model, b.new_tokens, StaticDecoder(b.model, compile=b.compile)

    def gen(decoder, prompt):
        return lambda: decoder.generate(prompt, n, temperature=0)
    per_token = m.decode_cost((n + 1) / 2).weight_bytes
    sweep, read = decode_sized_sweep(m, n, per_token)
    outs, (fast, slow, speed), (ratio, _) = time_rounds([gen(static, b.prompt[:1]), gen(m, b.prompt[:1]), sweep],
                                                        b.runs, [n, n, read], b.sync)
    batch_static, batch_generate, batch = time_pair(gen(static, b.prompt), gen(m, b.prompt), b.runs,
                                                    b.prompt.numel() * n, b.sync)
    return dict(static_tok_s=fast['median'], generate_tok_s=slow['median'], ratio=ratio,
                identical_tokens=torch.equal(outs[0], outs[1]),
                static_roofline_fraction=fast['median'] * per_token / speed['median'],
                generate_roofline_fraction=slow['median'] * per_token / speed['median'],
                batch=b.prompt.size(0), batch_static_tok_s=batch['a'], batch_ratio=batch['ratio'],
                batch_identical_tokens=torch.equal(batch_static, batch_generate))


def val_loss(b):
    """validation loss over fixed windows"""
    if not b.val_data:
        return None
    data = val_memmap(b.val_data)
    T, V, windows = b.model.config.block_size, b.model.config.vocab_size, b.val_windows or None
    if int(data.max()) >= V:
        fail(f"{b.val_data}/val.bin holds token {int(data.max())}, past the model's vocab_size {V}")
    loss = evaluate_loss(b.model, data, T, b.batch, windows, b.device)  # runs inside main's autocast
    return dict(val_data=b.val_data, windows=len(fixed_windows(data, T, windows)), block_size=T,
                val_loss=loss, val_bits=bits(loss))


def decode_profile(b):
    """where batch-1 decode time goes: wall time per token, the part spent inside aten ops (the rest is
    Python, module calls and dispatch), and the ops with the most self time per token (torch.profiler)"""
    from torch.profiler import ProfilerActivity, profile
    n = b.new_tokens
    b.model.generate(b.prompt[:1], n, temperature=0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        b.model.generate(b.prompt[:1], n, temperature=0)
        wall = time.perf_counter() - t0
    ops = sorted((e for e in prof.key_averages() if e.key.startswith('aten::')), key=lambda e: -e.self_cpu_time_total)
    inside = sum(e.self_cpu_time_total for e in ops) / 1e6  # seconds
    figures = dict(wall_us_per_token=1e6 * wall / n, aten_us_per_token=1e6 * inside / n,
                   aten_ops_per_token=sum(e.count for e in ops) / n, outside_ops_fraction=1 - inside / wall)
    for e in ops[:8]:
        figures[f"{e.key.removeprefix('aten::')}_us_per_token"] = e.self_cpu_time_total / n
    return figures


def memory(b):
    """peak memory of the process (after every row above)"""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = dict(peak_rss_bytes=rss * (1 if sys.platform == 'darwin' else 1024))
    if b.device.startswith('cuda'):
        peak['cuda_max_allocated_bytes'] = torch.cuda.max_memory_allocated()
    return peak


# name -> function(bench) -> dict of figures, or None where the row does not apply; its docstring is the row's
# title. Rows run in this order; memory stays last so that its peak covers all of them.
ROWS = {f.__name__: f for f in (decode, decode_batch, prefill, prefill_batch, past_block, compute, roofline,
                                static_decode, val_loss,
                                *MECHANISM_ROWS, decode_profile, memory)}


def fmt(key, v):
    if isinstance(v, dict) and 'median' not in v:  # one setting of a sweep: its figures on one line
        return ', '.join(f"{k} {fmt(k, x)}" for k, x in v.items())
    if isinstance(v, dict):  # stats of timed runs
        return f"{fmt(key, v['median'])}  ({fmt(key, v['min'])} - {fmt(key, v['max'])})"
    if isinstance(v, bool):
        return 'yes' if v else ('NO' if key == 'identical_tokens' else 'no')  # a parity failure should stand out
    if key.endswith('_bytes'):
        return f"{v / 2**20:.2f} MiB"
    if 'flops' in key:
        return f"{v / 1e6:.2f} MFLOP"
    if isinstance(v, float):
        return (f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}") + ('x' if key.startswith('ratio') else '')
    return f"{v:,}" if key.startswith('params') else str(v)


def load_model(config, ckpt):
    """The model of checkpoint ckpt, or with none a GPT with random weights from the model args."""
    try:
        if not ckpt:
            return build_model('gpt', {k: config[k] for k in MODEL_ARGS})
        if is_pretrained(ckpt):
            return from_pretrained(ckpt)[0]
        return model_from_checkpoint(load_checkpoint(ckpt), config['data_root'])[0]
    except (ValueError, OSError, pickle.UnpicklingError) as e:  # CheckpointError is a ValueError
        fail(e)


def sweeps(config):
    """The early-exit and speculative sweeps as (criterion, threshold) and (draft_layers, draft_tokens) pairs."""
    try:
        exits = [(c, float(t)) for part in config['exit_sweep'].split(';') for c, ts in [part.split(':')]
                 for t in ts.split(',')]
        spec = [(int(s.split(':')[0]), int(s.split(':')[1]), *map(float, s.split(':')[2:]))
                for s in config['spec_sweep'].split(',')]
    except ValueError:
        fail(f"--exit_sweep={config['exit_sweep']!r} / --spec_sweep={config['spec_sweep']!r}: write them like "
             f"{DEFAULTS['exit_sweep']!r} and {DEFAULTS['spec_sweep']!r}")
    if bad := [c for c, _ in exits if c not in CRITERIA]:
        fail(f"--exit_sweep: unknown criteria {', '.join(bad)}; use {', '.join(CRITERIA)}")
    if any(len(p) not in (2, 3) or min(p[:2]) < 1 for p in spec):
        fail(f"--spec_sweep={config['spec_sweep']!r}: each setting is draft_layers:draft_tokens[:draft_confidence], "
             f"the first two >= 1")
    return exits, spec


def main():
    config = configure_or_exit(DEFAULTS, sys.argv[1:], __doc__, describe(__file__))
    rows = list(ROWS) if config['rows'] == 'all' else config['rows'].split(',')
    if unknown := [r for r in rows if r not in ROWS]:
        fail(f"unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    for key in ('new_tokens', 'runs', 'batch', 'train_batch', 'exit_windows'):
        if config[key] < 1:
            fail(f"--{key} must be at least 1, not {config[key]}")
    exit_sweep, spec_sweep = sweeps(config)
    if config['threads']:
        torch.set_num_threads(config['threads'])
    device = pick_device(config['device'])
    dtype = pick_dtype(config['dtype'], device)
    torch.manual_seed(config['seed'])
    model = load_model(config, config['ckpt']).eval().to(device)
    if config['compile']:
        model.compile()  # compiles model(...), which both generation paths call
    V, T = model.config.vocab_size, model.config.block_size
    baseline = load_model(config, config['baseline']).eval().to(device) if config['baseline'] else None
    g = torch.Generator().manual_seed(config['seed'])
    b = SimpleNamespace(
        model=model, device=device, runs=config['runs'], batch=config['batch'], new_tokens=config['new_tokens'],
        long_T=config['long_T'], long_window=config['long_window'], long_tokens=config['long_tokens'],
        stream_tokens=config['stream_tokens'],
        val_data=config['val_data'], val_windows=config['val_windows'],
        baseline=baseline, baseline_path=config['baseline'], train_batch=config['train_batch'],
        exit_windows=config['exit_windows'], seed=config['seed'], exit_sweep=exit_sweep, spec_sweep=spec_sweep,
        teal_sparsity=teal_levels(config['teal_sparsity']),
        prompt=torch.randint(V, (config['batch'], 1), generator=g).to(device),  # one-token prompts (B, 1)
        prefill_x=torch.randint(V, (config['batch'], T), generator=g).to(device),  # (B, block_size)
        sync=synchronizer(device), compile=config['compile'],
    )
    setup = dict(command=' '.join(['python bench.py', *sys.argv[1:]]), model=config['ckpt'] or 'random weights',
                 model_type=type(model).__name__, params=model.get_num_params(non_embedding=False),
                 params_non_embedding=model.get_num_params(), device=device, dtype=dtype,
                 threads=torch.get_num_threads(), torch=torch.__version__, compile=config['compile'],
                 block_size=T, new_tokens=config['new_tokens'], batch=config['batch'], runs=config['runs'],
                 seed=config['seed'], prompt=b.prompt[:, 0].tolist())
    for k, v in setup.items():
        print(f"{k + ':':24} {fmt(k, v)}")
    results = {}
    with torch.no_grad(), autocast(device, dtype):
        for name in rows:
            figures = ROWS[name](b)
            if figures is None:
                continue
            results[name] = figures
            print(f"\n{name}: {ROWS[name].__doc__}")
            for k, v in figures.items():
                print(f"  {k:32} {fmt(k, v)}", flush=True)
    if config['json']:
        with open(config['json'], 'w') as f:
            json.dump(dict(settings=config, setup=setup, model_args=asdict(model.config), rows=results), f, indent=1)
        print(f"\nwrote {config['json']}")


if __name__ == '__main__':
    main()
