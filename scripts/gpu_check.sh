#!/usr/bin/env bash
# The CUDA check, about 8 minutes on one GPU: the baseline and EfficientGPT trained in bf16 with torch.compile,
# local attention's training path through FlexAttention (against full attention, same settings), and batch-1
# and batch-16 decode against the cached baseline, eager and compiled. DDP is covered by the gloo tests on CPU.
# Writes $OUT/gpu_check.json (OUT defaults to gpu_check/) with every figure and the logs beside it.
# $ bash scripts/gpu_check.sh
# A smoke test of the script itself on a CPU: DEVICE=cpu COMPILE=False ITERS=20 RUNS=1 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-1000}  # the benchmark configs' own training length
RUNS=${RUNS:-5}
COMPILE=${COMPILE:-True}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
# what it needs is on the machine: torch with a GPU, and the core dependencies (nothing is downloaded)
$PY -c "import numpy, tiktoken, tqdm, torch; assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA device'
print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

TRAIN="--device=$DEVICE --dtype=bfloat16 --compile=$COMPILE --progress=False --overwrite=True"
STEPS="--max_iters=$ITERS --lr_decay_iters=$ITERS --warmup_iters=$((ITERS / 10))"
# 1. the suite's two models, trained into the folders bench_suite.py reads (bf16 autocast, compiled)
$PY train_efficient.py config/train_bench_cpu.py $TRAIN $STEPS --eval_interval=100 > "$OUT/train_baseline.log" 2>&1
$PY train_efficient.py config/train_efficient_gpt.py $TRAIN $STEPS --eval_interval=100 > "$OUT/train_efficient_gpt.log" 2>&1
# 2. local attention's training path at T = 1024 (FlexAttention on CUDA) against full attention with rope
LONG="--block_size=1024 --max_iters=100 --lr_decay_iters=100 --warmup_iters=10 --log_interval=10 --eval_interval=1000 --final_eval_windows=4"
$PY train_efficient.py config/train_bench_cpu.py config/train_bench_local.py $TRAIN $LONG --out_dir="$OUT/local" > "$OUT/train_local.log" 2>&1
$PY train_efficient.py config/train_bench_cpu.py config/train_bench_rope.py $TRAIN $LONG --out_dir="$OUT/full" > "$OUT/train_full.log" 2>&1
# 3. decode against the cached baseline, eager, then both compiled
SUITE="--models=baseline,efficient_gpt --device=$DEVICE --runs=$RUNS"
$PY bench_suite.py $SUITE --json="$OUT/suite_eager.json" > "$OUT/suite_eager.log" 2>&1
$PY bench_suite.py $SUITE --compile=$COMPILE --json="$OUT/suite_compiled.json" > "$OUT/suite_compiled.log" 2>&1

$PY - "$OUT" <<'PY'
import json, re, sys
import torch
out = sys.argv[1]
def tok_s(log):  # the training's plain log lines: the median tokens/s of the second half (compilation excluded)
    rates = [float(r.replace(',', '')) for r in re.findall(r'([\d,]+) tok/s', open(f'{out}/{log}').read())]
    rates = sorted(rates[len(rates) // 2:])
    return rates[len(rates) // 2] if rates else None
def final(log):
    found = re.findall(r'final val loss over \d+ fixed windows of \d+ tokens: ([\d.]+)', open(f'{out}/{log}').read())
    return float(found[-1]) if found else None
suite = {k: json.load(open(f'{out}/suite_{k}.json')) for k in ('eager', 'compiled')}
report = dict(
    device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', torch=torch.__version__,
    training={m: dict(tok_s=tok_s(f'train_{m}.log'), final_val_loss=final(f'train_{m}.log'))
              for m in ('baseline', 'efficient_gpt')},
    local_attention_T1024=dict(local_tok_s=tok_s('train_local.log'), full_tok_s=tok_s('train_full.log')),
    decode={k: {name: dict(b1_tok_s=r['decode_tok_s'], b1_vs_cached=r['vs_cached']['median'], b16_tok_s=r['batch_tok_s'],
                           b16_vs_cached=r['batch_vs_cached']['median'], val_loss=r['val_loss'])
                for name, r in s['rows'].items()} for k, s in suite.items()},
    headers={k: s['header'] for k, s in suite.items()})
json.dump(report, open(f'{out}/gpu_check.json', 'w'), indent=1)
print(json.dumps(report, indent=1))
PY
