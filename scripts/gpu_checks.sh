#!/usr/bin/env bash
# Every GPU check and benchmark of issues 16 and 13 in one call, for a session that is lent a GPU machine for minutes:
#
#   bash scripts/gpu_checks.sh            # writes JSON and logs under $OUT (default out/gpu)
#
# Runs, in order of value (each step is bounded, and a failing step does not stop the others):
#   1. correctness on CUDA: the CUDA-capable tests (packed DKT, bf16 paths, device helpers) and a CPU-vs-CUDA
#      logits check of SAKT, DKT and AKT;
#   2. bench_vs_pykt --device cuda, fp32 and bf16, batch 64 and 256 (SAKT, DKT, AKT);
#   3. bench_vs_textbrewer --device cuda at B32/L64 and B128/L128;
#   4. issue 13's KD loss at B8/L1024/V32000 on CUDA (TRL, chunked, fused: peak memory and time);
#   5. bench_kt --accelerator gpu on ASSIST2009 (3 epochs): loop_efficiency of Trainer.fit against the model step.
# Needs the bench extra (pykt-toolkit, textbrewer; see setup.cfg) and ../shared/data.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
py=${PYTHON:-python}
step() {  # step NAME TIMEOUT_S COMMAND...: run one bounded step, log it, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$OUT/summary.log"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $?" | tee -a "$OUT/summary.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1

step tests 120 "$py" -m pytest -q -x tests/test_gpu_ready.py tests/test_akt_fast.py tests/test_kt_fast_paths.py
step cpu_vs_cuda 60 "$py" - <<'EOF'
import torch
from lit_kt import AKT, DKT, SAKT
torch.manual_seed(0)
B, L = 16, 200
ex = torch.randint(1, 111, (B, L)); resp = torch.randint(0, 2, (B, L))
lengths = torch.randint(5, L + 1, (B,)); real = torch.arange(L) < lengths[:, None]; ex[~real] = 0
for model in (SAKT(110, max_len=L, d_model=256, num_heads=8), DKT(110, hidden_size=200), AKT(110, d_model=256, num_heads=8)):
    model.eval()
    with torch.no_grad():
        cpu = model(ex, resp)
        gpu = model.cuda()(ex.cuda(), resp.cuda()).cpu()
    print(type(model).__name__, "max |cpu - cuda| at real positions:", float((cpu - gpu)[real].abs().max()))
EOF
for precision in 32 bf16; do
  for batch in 64 256; do
    step "pykt_${precision}_b${batch}" 240 "$py" scripts/bench_vs_pykt.py --device cuda --precision "$precision" \
      --models sakt,dkt,akt --batch-size "$batch" --threads 0 --steps 30 --warmup 5 \
      --json "$OUT/pykt_${precision}_b${batch}.json"
  done
done
step tb_b32_l64 240 "$py" scripts/bench_vs_textbrewer.py --device cuda --batch-size 32 --max-length 64 --steps 30 \
  --warmup 5 --threads 0 --json "$OUT/tb_b32_l64.json"
step tb_b128_l128 240 "$py" scripts/bench_vs_textbrewer.py --device cuda --batch-size 128 --max-length 128 --steps 30 \
  --warmup 5 --threads 0 --json "$OUT/tb_b128_l128.json"
step kd_lm_loss 300 "$py" scripts/bench_kd_lm_loss.py --device cuda --json "$OUT/kd_lm_loss_cuda.json"
step kt_loop_sakt 300 "$py" scripts/bench_kt.py --data-dir ../shared/data/kt/assist2009 --model sakt --accelerator gpu \
  --batch-size 256 --d-model 256 --max-len 200 --epochs 3 --json "$OUT/kt_loop_sakt.json"
cat "$OUT/summary.log"
