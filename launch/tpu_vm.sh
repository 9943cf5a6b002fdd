#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host or a pod slice): create it (directly or as a queued resource), install this
# package on every worker, run `python -m vit_jax.main` on every worker, stream worker 0's log, delete on request.
#
#   launch/tpu_vm.sh --name=vit-b16 --zone=us-central2-b --accelerator_type=v4-32 \
#       --config=configs/vit_b16.py --workdir=gs://my-bucket/runs/vit_b16 -- --config.batch=4096
#
# Every worker runs the same command; JAX finds the other workers by itself (vit_jax.distributed detects the TPU
# VM), so no coordinator flags are needed. The workdir must be on gs://: every worker writes its part of each
# orbax checkpoint there, and worker 0 the logs, metrics and model.npz.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator_type=TYPE --config=FILE[:ARG] --workdir=gs://...
                        [options] [-- MAIN_FLAGS...]
  --name, --zone, --accelerator_type   the TPU VM, e.g. --accelerator_type=v4-32 or v5litepod-64
  --config, --workdir                  passed to python -m vit_jax.main (workdir on gs://)
  --project=P                          gcloud project (default: gcloud's configured one)
  --version=V                          TPU software version (default tpu-ubuntu2204-base)
  --queued                             create a queued resource (waits for capacity) instead of a VM
  --spot                               spot capacity
  --package=SPEC                       pip spec to install on the workers (default: this checkout's git HEAD,
                                       copied to every worker)
  --steps=LIST                         comma-separated subset of create,install,run,delete
                                       (default create,install,run)
  --delete                             also delete the VM when the run ends (adds the delete step)
  --dry-run                            print the commands, run nothing
MAIN_FLAGS after -- go to vit_jax.main, e.g. --config.batch=4096
EOF
  exit 2
}

name="" zone="" accelerator_type="" config="" workdir="" project="" version=tpu-ubuntu2204-base
queued=false spot=false package="" steps=create,install,run dry_run=false
main_flags=()
[[ $# -gt 0 ]] || usage
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --queued) queued=true ;;
    --spot) spot=true ;;
    --package=*) package=${1#*=} ;;
    --steps=*) steps=${1#*=} ;;
    --delete) steps="$steps,delete" ;;
    --dry-run) dry_run=true ;;
    -h|--help) usage ;;
    --) shift; main_flags+=("$@"); break ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done

missing=()
for var in name zone accelerator_type; do [[ -n ${!var} ]] || missing+=("--$var"); done
if [[ ,$steps, == *,run,* ]]; then
  for var in config workdir; do [[ -n ${!var} ]] || missing+=("--$var"); done
fi
if ((${#missing[@]})); then echo "error: missing ${missing[*]}" >&2; usage; fi
if [[ -n $workdir && $workdir != gs://* ]]; then
  echo "error: --workdir=$workdir is not on gs://; every worker must reach it, e.g. gs://my-bucket/runs/x" >&2
  exit 2
fi
for step in ${steps//,/ }; do
  case $step in create|install|run|delete) ;; *) echo "error: unknown step '$step' in --steps" >&2; exit 2 ;; esac
done

gcloud_flags=("--zone=$zone")
[[ -z $project ]] || gcloud_flags+=("--project=$project")
remote_dir=vit_jax
log=vit_jax_run.log

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$1"; }

step_create() {
  local extra=()
  $spot && extra+=(--spot)
  if $queued; then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${gcloud_flags[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$version" "${extra[@]}"
    # Capacity may take a while: poll until the slice is ACTIVE (FAILED or SUSPENDED end the wait).
    local state_cmd=(gcloud compute tpus queued-resources describe "$name" "${gcloud_flags[@]}"
                     --format='value(state.state)')
    if $dry_run; then echo "$(print_command "${state_cmd[@]}")  # every 30 s until ACTIVE"; return; fi
    local state
    while state=$("${state_cmd[@]}") && [[ $state != ACTIVE ]]; do
      case $state in FAILED|SUSPENDED) echo "error: queued resource $name is $state" >&2; exit 1 ;; esac
      echo "tpu_vm.sh: queued resource $name is $state; waiting" >&2
      sleep 30
    done
  else
    run gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}" --accelerator-type="$accelerator_type" \
      --version="$version" "${extra[@]}"
  fi
}

step_install() {
  local spec=$package
  if [[ -z $spec ]]; then
    local tarball=/tmp/vit_jax_src.tar.gz
    run git archive --format=tar.gz --prefix="$remote_dir/" -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:vit_jax_src.tar.gz" "${gcloud_flags[@]}" --worker=all
    ssh_all "rm -rf $remote_dir && tar xzf vit_jax_src.tar.gz"
    spec="./$remote_dir"
  fi
  ssh_all "python3 -m pip install -q -U \"jax[tpu]\" $(print_command "$spec")"
}

step_run() {
  local cmd
  cmd=$(print_command python3 -m vit_jax.main "--config=$config" "--workdir=$workdir" "${main_flags[@]}")
  # Detached on every worker, so a dropped ssh connection does not stop the run.
  ssh_all "cd $remote_dir 2>/dev/null || true; nohup $cmd > ~/$log 2>&1 & echo \$! > ~/$log.pid"
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=0 \
    --command="tail -n +1 --pid=\$(cat ~/$log.pid) -f ~/$log"
}

step_delete() {
  if $queued; then
    run gcloud compute tpus queued-resources delete "$name" "${gcloud_flags[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet
  fi
}

for step in ${steps//,/ }; do "step_$step"; done
