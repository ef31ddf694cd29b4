#!/usr/bin/env bash
# `lit-kt fit` / `lit-kd fit` on NNODES nodes x NPROC_PER_NODE processes with torchrun (DDP). Run the same command on
# every node, each with its own NODE_RANK; see docs/distributed.md.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=4 scripts/torchrun_fit.sh lit-kt configs/sakt_synthetic.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=4 scripts/torchrun_fit.sh lit-kt configs/sakt_synthetic.yaml
#
# Arguments after the config go to the CLI (e.g. `--trainer.accelerator cpu`, or `--ckpt_path last` to resume).
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1; node 0's address, reachable from every node),
# MASTER_PORT (29500), NPROC_PER_NODE (1; one process per GPU), MAX_RESTARTS (0; torchrun restarts the workers of
# this node that many times after a failure, e.g. with `--ckpt_path last`; then the c10d rendezvous at
# MASTER_ADDR:MASTER_PORT with RDZV_ID, node ranks assigned by torchrun).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 lit-kt|lit-kd CONFIG [CLI ARGS...]" >&2
  exit 2
fi
cli=$1
config=$2
shift 2
nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-1}
restarts=${MAX_RESTARTS:-0}
addr=${MASTER_ADDR:-127.0.0.1}
port=${MASTER_PORT:-29500}
if [ "$restarts" -gt 0 ]; then
  # Restarts: the c10d rendezvous (the static one could hang in init_process_group after a restart), with one store
  # per attempt so that restarted workers never read the failed attempt's addresses (pytorch/pytorch#135712).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$addr:$port" --rdzv-id "${RDZV_ID:-lit-kdkt}")
else
  rdzv=(--node-rank "${NODE_RANK:-0}" --master-addr "$addr" --master-port "$port")
fi
exec torchrun \
  --nnodes "$nnodes" --nproc-per-node "$nproc" "${rdzv[@]}" \
  --max-restarts "$restarts" \
  --no-python "$cli" fit --config "$config" \
  --trainer.strategy ddp --trainer.num_nodes "$nnodes" --trainer.devices "$nproc" "$@"
