#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md: the speed issue's targets, one JSON line per run appended to OUT_FILE.
# Each suite fits in one 10-minute call of a lent GPU machine (compiles included).
#
#   launch/gpu_benchmarks.sh b16 results.jsonl      # ViT-B/16 224 px: train and infer, unfused and fused attention
#   launch/gpu_benchmarks.sh large results.jsonl    # ViT-L/16 and H/14, remat, at the largest batch that fits
#
# A run that fails is recorded as {"error": ..., "command": ...} and the suite goes on; the exit status is 1 if
# any failed.
set -uo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'EOF'
usage: launch/gpu_benchmarks.sh SUITE OUT_FILE [--dry-run]
  SUITE      b16 (ViT-B/16 train and infer) or large (ViT-L/16 and H/14 at the largest batch that fits)
  OUT_FILE   JSON lines are appended here
  --dry-run  print the commands, run nothing
environment: PYTHON (default python3)
EOF
  exit 2
}

[[ $# -ge 2 ]] || usage
suite=$1
out_file=$2
dry_run=false
[[ ${3:-} == --dry-run ]] && dry_run=true
python=${PYTHON:-python3}
common=(--dtype=bfloat16 --num_classes=1000 --image_size=224 --warmup=3 --steps=10)

case $suite in
  b16)
    runs=("--model_name=ViT-B_16 --mode=train --batch=256"
          "--model_name=ViT-B_16 --mode=train --batch=256 --fused_attention"
          "--model_name=ViT-B_16 --mode=infer --batch=1024"
          "--model_name=ViT-B_16 --mode=infer --batch=1024 --fused_attention")
    ;;
  large)
    runs=("--model_name=ViT-L_16 --mode=train --batch=0 --remat=full --fused_attention"
          "--model_name=ViT-H_14 --mode=train --batch=0 --remat=full --scan_layers --fused_attention")
    ;;
  *) echo "error: unknown SUITE '$suite'; use b16 or large" >&2; usage ;;
esac

failed=0
for flags in "${runs[@]}"; do
  read -ra words <<<"$flags"
  command=("$python" -m vit_jax.tools.benchmark "${common[@]}" "${words[@]}")
  if $dry_run; then
    print_command "${command[@]}"
    continue
  fi
  echo "running: $(print_command "${command[@]}")" >&2
  if ! line=$("${command[@]}" | tail -n 1); then
    failed=1
    line=$("$python" -c 'import json, sys; print(json.dumps({"error": "failed", "command": sys.argv[1]}))' \
           "$(print_command "${command[@]}")")
  fi
  echo "$line" | tee -a "$out_file"
done
exit $failed
