#!/bin/bash
# Multi-node on one machine: the same tldist job as 2 nodes x 1 task (gloo across the bridge between
# two network namespaces) and as 1 node x 2 tasks (gloo over loopback), alternating 2x1, 1x2, 1x2, 2x1,
# on the 2-node dev cluster (slurm/dev-cluster.sh, root). Prints the cluster start time, each job's
# submit -> end time and rank 0's logged global img/s (first log window left out).
#
#   bench/multinode.sh            (TLDIST_SLURM_STATE_DIR / TLDIST_SLURM_SUBNET to move the cluster)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n ${VIRTUAL_ENV:-} ]] || . .venv/bin/activate
export TLDIST_SLURM_NODES=2 TLDIST_SLURM_STATE_DIR=${TLDIST_SLURM_STATE_DIR:-/tmp/tldist-slurm-2nodes-bench}
t0=$(date +%s.%N); slurm/dev-cluster.sh start >/dev/null; t1=$(date +%s.%N)
trap 'slurm/dev-cluster.sh stop >/dev/null 2>&1' EXIT
printf 'cluster start: %.1f s\n' "$(echo "$t1 - $t0" | bc)"
export SLURM_CONF=$TLDIST_SLURM_STATE_DIR/slurm.conf WANDB_MODE=disabled
work=$(mktemp -d /tmp/tldist-multinode-bench.XXXXXX)
python - "$work" <<'PY'
import sys; sys.path.insert(0, "tests")
from pathlib import Path
from conftest import make_shard_set
make_shard_set(Path(sys.argv[1]) / "train", split="train", n=2000, shards=8)
PY
for layout in "2 1" "1 2" "1 2" "2 1"; do
  set -- $layout
  out=$work/run-$1x$2-$RANDOM
  s=$(date +%s.%N)
  jid=$(python -m tldist.cli submit configs/test_tiny.yaml "data.train=[$work/train]" "output_dir=$out" \
    model.pretrained=false data.image_size=32 data.batch_size=16 data.num_workers=1 train.max_steps=150 \
    train.log_every_steps=25 checkpoint.every_steps=1000 --nodes "$1" --tasks-per-node "$2" --cpus-per-task 1 \
    --time 15 | sed -n 's/submitted job \([0-9]*\).*/\1/p')
  while squeue -h -j "$jid" 2>/dev/null | grep -q .; do sleep 1; done
  e=$(date +%s.%N)
  rates=$(grep -ho '[0-9]* img/s' "$out/submitit/$jid/${jid}_0_log.out" | awk 'NR > 1 {print $1}' | tr '\n' ' ')
  printf 'nodes=%s tasks/node=%s job %s: submit->end %.1f s, img/s per window: %s\n' "$1" "$2" "$jid" \
    "$(echo "$e - $s" | bc)" "$rates"
done
rm -rf "$work"
