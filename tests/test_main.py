"""`python -m vit_jax.main` as a user runs it: kill -9 and resume, SIGTERM, and the error paths (subprocesses)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # trains or starts subprocesses throughout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quickstart config cut down to a 1-layer model and a few dozen steps.
TINY = ["--config=configs/quickstart.py", "--config.model.transformer.num_layers=1", "--config.batch=32",
        "--config.warmup_steps=2", "--config.progress_every=2", "--config.eval_every=0",
        "--config.checkpoint_every=4", "--config.peak_flops=1e12"]


def _command(workdir, *flags):
  return [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}", *TINY, *flags]


def _run(workdir, *flags, timeout=240):
  return subprocess.run(_command(workdir, *flags), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [(r["step"], r["train_loss"], r["learning_rate"]) for r in records]


def _wait_for(predicate, process, timeout=120):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, f"exited early: {process.communicate()[1][-2000:]}"
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


def _checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(path) if name.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = _run(workdir, "--config.total_steps=40")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_a_complete_run_gets_its_curves(uninterrupted):
  assert os.path.getsize(os.path.join(uninterrupted, "curves.png")) > 10_000


def test_kill_9_then_resume_reproduces_the_losses(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  process = subprocess.Popen(_command(workdir, "--config.total_steps=40"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: _checkpoint_steps(workdir), process)
  process.kill()
  process.communicate()
  assert not os.path.exists(os.path.join(workdir, "model.npz")), "killed too late to test resuming"
  result = _run(workdir, "--config.total_steps=40")
  assert result.returncode == 0, result.stderr[-3000:]
  assert _losses(workdir) == _losses(uninterrupted)
  assert os.path.exists(os.path.join(workdir, "model.npz"))


def test_sigterm_saves_a_checkpoint_and_exits_0(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  process = subprocess.Popen(_command(workdir, "--config.total_steps=40", "--config.checkpoint_every=1000"),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")), process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=30)
  assert process.returncode == 0, stderr[-3000:]
  steps = _checkpoint_steps(workdir)
  assert steps and steps[-1] < 40
  assert not os.path.exists(os.path.join(workdir, "model.npz"))
  result = _run(workdir, "--config.total_steps=40", "--config.checkpoint_every=1000")  # resumes from there
  assert result.returncode == 0, result.stderr[-3000:]
  assert _losses(workdir) == _losses(uninterrupted)


def test_incompatible_workdir_names_the_keys(uninterrupted):
  result = _run(uninterrupted, "--config.total_steps=40", "--config.batch=64", "--config.seed=3")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: workdir")
  assert "batch (was 32, now 64)" in result.stderr and "seed (was 0, now 3)" in result.stderr


@pytest.mark.parametrize("flags, expected", [
    (["--config.batchh=64"], 'Did you mean "batch"'),
    (["--config.trainer=byol"], "unknown trainer 'byol'; use one of supervised, masked_patch, mae"),
    (["--config.loss=hinge"], "unknown loss 'hinge'; use one of softmax_xent, sigmoid_xent"),
    (["--config.model_name=ViT-B_61"], "unknown model name 'ViT-B_61'"),
    (["--config.mesh.data=3"], "multiply to 3 but there are 8 devices"),
    (["--config.dtype=fp16"], "unknown dtype 'fp16'; use one of auto, float32, bfloat16"),
    (["--config.batch=36"], "batch=36 is not divisible by the 8 data-parallel devices"),
    (["--config.pretrained_path=/nonexistent/ViT-B_16.npz"],
     "does not exist; download a zoo file, e.g. `wget https://storage.googleapis.com/vit_models/"),
    (["--workdir=/dev/null/run"], "workdir /dev/null/run is not writable"),
    (["--config.base_lr=0"], "base_lr=0.0 must be positive"),
    (["--config.label_smoothing=1.0"], "label_smoothing=1.0 must be in [0, 1)"),
    (["--config.pp.randaug=-1,5"], "config.pp.randaug=(-1, 5): N must be an int >= 0"),
    (["--config.pp.randaug=2,31"], "config.pp.randaug=(2, 31): M must be in [0, 30]"),
    (["--config.model.stochastic_depth=1.0"], "stochastic_depth=1.0 must be in [0, 1)"),
    (["--config.ema_decay=1.0"], "ema_decay=1.0 must be in [0, 1)"),
    (["--config.layer_decay=0"], "config.layer_decay=0.0 must be in (0, 1]"),
    (["--config.layer_decay=1.5"], "config.layer_decay=1.5 must be in (0, 1]"),
    (["--config.lr_mults=(('heads/.*', 1.0),)"], "config.lr_mults regex 'heads/.*' matches no parameter path"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, flags, expected):
  result = _run(str(tmp_path / "run"), *flags, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "run")  # nothing written


def test_sigint_saves_a_checkpoint_exits_130_and_the_run_resumes_exactly(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  process = subprocess.Popen(_command(workdir, "--config.total_steps=40", "--config.checkpoint_every=1000"),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")), process)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=30)
  assert process.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  assert "SIGINT: saving a checkpoint at the current step" in stderr
  steps = _checkpoint_steps(workdir)
  assert steps and steps[-1] < 40
  result = _run(workdir, "--config.total_steps=40", "--config.checkpoint_every=1000")
  assert result.returncode == 0, result.stderr[-3000:]
  assert _losses(workdir) == _losses(uninterrupted)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_and_compilation_exits_within_seconds(tmp_path, signum, code):
  workdir = str(tmp_path)
  process = subprocess.Popen(_command(workdir, "--config.total_steps=40"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "lock")), process)  # past the flags, before the loop
  start = time.time()
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=30)
  assert process.returncode == code, stderr[-3000:]
  assert time.time() - start < 10
  assert "Traceback" not in stderr and "no unsaved training state; exiting now" in stderr
  assert not _checkpoint_steps(workdir)


def test_a_second_run_in_a_live_workdir_stops_at_once_naming_the_first(tmp_path):
  workdir = str(tmp_path)
  first = subprocess.Popen(_command(workdir, "--config.total_steps=100000"), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")), first)
    second = _run(workdir, "--config.total_steps=40", timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    error_lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "in use by another run (host " in error_lines[0], second.stderr[-3000:]
    assert f"pid {first.pid}" in error_lines[0]
    assert first.poll() is None  # untouched by the second
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
  finally:
    first.kill()
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["total_steps"] == 100000  # the second run wrote nothing


def test_a_rerun_draws_the_missing_curves_of_a_complete_run(uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, workdir)
  os.remove(os.path.join(workdir, "curves.png"))  # killed between model.npz and curves.png
  result = _run(workdir, "--config.total_steps=40")
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "curves.png"))
