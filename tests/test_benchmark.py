"""The benchmark CLI runs the real train step and inference and reports consistent figures (no speed asserted)."""
import json
import os
import subprocess
import sys

import pytest


def run_benchmark(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", "vit_jax.benchmark", "--model_name=testing", "--image_size=32",
                         "--batch=4", "--num_classes=10", "--steps=2", "--warmup=1", *args],
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("mode,extra", [("train", ["--scan_layers", "--remat=full", "--mesh.fsdp=2"]),
                                        ("infer", ["--dtype=float32", "--fused_attention"])])
def test_benchmark_reports_one_json_line(mode, extra):
  result = run_benchmark(f"--mode={mode}", *extra)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["mode"] == mode and report["devices"] == 2
  # step_ms is rounded to 0.01 ms: a sub-millisecond step leaves a few percent of rounding in the ratio.
  assert report["step_ms"] > 0 and report["img_per_sec"] == pytest.approx(4 / report["step_ms"] * 1e3, rel=0.05)
  assert 0 < report["mfu"] == pytest.approx(report["tflops_per_sec"] / report["peak_tflops_per_sec"], rel=0.05)
  # The analytic count and XLA's agree for a plain ViT (XLA also counts softmax, norms and the optimizer).
  assert report["xla_gflops_per_step"] == pytest.approx(report["model_gflops_per_step"], rel=0.3)
  if mode == "train":
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and report["scan_layers"]


def test_benchmark_bad_input_is_one_error_line():
  result = run_benchmark("--batch=3", "--mesh.data=2")
  assert result.returncode == 2
  assert result.stderr.startswith("error: batch=3 is not divisible") and len(result.stderr.splitlines()) == 1


def test_peer_arguments_are_checked_before_the_benchmark_runs():
  result = run_benchmark("--peer_python=/nonexistent/python", "--num_classes=1000")
  assert result.returncode == 2
  assert "--num_classes=10" in result.stderr or "peer script not found" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
