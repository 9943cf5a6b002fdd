#!/usr/bin/env bash
# Fills in launch/gke_jobset.yaml and applies it with kubectl, then streams the log of process 0.
#
#   launch/gke.sh --name=vit-b16 --image=IMAGE --accelerator=tpu-v5-lite-podslice --topology=4x4 \
#       --num_hosts=4 --chips_per_host=4 --config=configs/vit_b16.py --workdir=gs://bucket/runs/b16
#   launch/gke.sh --name=vit-l16 --image=IMAGE --accelerator=nvidia-h100-80gb --num_hosts=2 --chips_per_host=8 \
#       --config=configs/vit_b16.py --workdir=gs://bucket/runs/l16 -- --config.model_name=ViT-L_16
#
# IMAGE is a container with this package installed (and jax[tpu] or jax[cuda12]). The JobSet controller must be
# installed in the cluster (https://jobset.sigs.k8s.io).
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: launch/gke.sh --name=NAME --image=IMAGE --accelerator=ACCELERATOR --num_hosts=N --chips_per_host=K
                     --config=FILE[:ARG] --workdir=gs://... [options] [-- MAIN_FLAGS...]
  --accelerator        GKE accelerator label: tpu-v5-lite-podslice, tpu-v4-podslice, ... or nvidia-h100-80gb, ...
  --topology=AxB       TPU slice topology (TPU only), e.g. 4x4 for v5litepod-16
  --num_hosts=N        pods (= JAX processes), one per TPU host or GPU node
  --chips_per_host=K   TPU chips or GPUs per pod
  --port=P             coordinator port (default 8476)
  --max_restarts=R     JobSet restarts after a failure (default 3; runs resume from checkpoints)
  --dry-run            print the manifest and the commands, run nothing
USAGE
  exit 2
}

name="" image="" accelerator="" topology="" num_hosts="" chips_per_host="" config="" workdir=""
port=8476 max_restarts=3 dry_run=false
main_flags=()
[[ $# -gt 0 ]] || usage
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --image=*) image=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --topology=*) topology=${1#*=} ;;
    --num_hosts=*) num_hosts=${1#*=} ;;
    --chips_per_host=*) chips_per_host=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --dry-run) dry_run=true ;;
    -h|--help) usage ;;
    --) shift; main_flags+=("$@"); break ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
missing=()
for var in name image accelerator num_hosts chips_per_host config workdir; do
  [[ -n ${!var} ]] || missing+=("--$var")
done
if ((${#missing[@]})); then echo "error: missing ${missing[*]}" >&2; usage; fi
for var in num_hosts chips_per_host port max_restarts; do
  [[ ${!var} =~ ^[0-9]+$ ]] || { echo "error: --$var=${!var} is not a number" >&2; exit 2; }
done
[[ $workdir == gs://* ]] || { echo "error: --workdir=$workdir is not on gs://; every pod must reach it" >&2; exit 2; }

case $accelerator in
  tpu-*)
    [[ -n $topology ]] || { echo "error: --topology is required for TPU slices, e.g. --topology=4x4" >&2; exit 2; }
    node_selector="{cloud.google.com/gke-tpu-accelerator: $accelerator, cloud.google.com/gke-tpu-topology: $topology}"
    chip_resource=google.com/tpu ;;
  nvidia-*)
    node_selector="{cloud.google.com/gke-accelerator: $accelerator}"
    chip_resource=nvidia.com/gpu ;;
  *) echo "error: --accelerator=$accelerator is neither tpu-* nor nvidia-*" >&2; exit 2 ;;
esac

# The container's arguments as a YAML flow sequence of double-quoted strings.
main_args=""
for arg in "--config=$config" "--workdir=$workdir" "${main_flags[@]}"; do
  arg=${arg//\\/\\\\}
  main_args+="${main_args:+, }\"${arg//\"/\\\"}\""
done

# shellcheck disable=SC2016  # the variable names are for envsubst, not the shell
manifest=$(NAME=$name IMAGE=$image NUM_HOSTS=$num_hosts CHIPS_PER_HOST=$chips_per_host COORDINATOR_PORT=$port \
  MAX_RESTARTS=$max_restarts NODE_SELECTOR=$node_selector CHIP_RESOURCE=$chip_resource MAIN_ARGS="[$main_args]" \
  envsubst '${NAME} ${IMAGE} ${NUM_HOSTS} ${CHIPS_PER_HOST} ${COORDINATOR_PORT} ${MAX_RESTARTS} ${NODE_SELECTOR}
            ${CHIP_RESOURCE} ${MAIN_ARGS}' < "$(dirname "${BASH_SOURCE[0]}")/gke_jobset.yaml")

logs=(kubectl logs -f "jobs/$name-workers-0")
if $dry_run; then
  echo "$manifest"
  echo "# commands:"
  echo "kubectl apply -f -  # the manifest above, on stdin"
  print_command "${logs[@]}"
  exit 0
fi
kubectl apply -f - <<< "$manifest"
kubectl wait --for=condition=Ready "pod/$name-workers-0-0" --timeout=30m 2>/dev/null || true
"${logs[@]}"
