"""vit_jax.tools.benchmark runs the real train step and inference and reports consistent figures (no speed asserted)."""
import json
import os
import platform
import re
import subprocess
import sys
import types

import pytest

from tests import xla_flags
from vit_jax import flops, models
from vit_jax.host import allocator
from vit_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As tests/test_convert.py: the real timm peer needs the `.peer` venv (torch + timm) and VIT_JAX_PEER_DIR.
PEER_PYTHON = os.path.join(REPO, ".peer", "bin", "python")
PEER_DIR = os.environ.get("VIT_JAX_PEER_DIR")
PEER_STUB = os.path.join(PEER_DIR, "tv_stub") if PEER_DIR else None


def _peer_available():
  if not PEER_STUB or not os.path.isdir(PEER_STUB) or not os.path.exists(PEER_PYTHON):
    return False
  return subprocess.run([PEER_PYTHON, "-c", "import torch, timm"], capture_output=True,
                        env={**os.environ, "PYTHONPATH": PEER_STUB}).returncode == 0


def run_benchmark(*args, **environ):
  env = {k: v for k, v in os.environ.items() if k != "VIT_JAX_PEER_DIR"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.cpu_devices(2), **environ)
  return subprocess.run([sys.executable, "-m", "vit_jax.tools.benchmark", "--model_name=testing", "--image_size=32",
                         "--batch=4", "--num_classes=10", "--steps=2", "--warmup=1", *args],
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode,extra", [("train", []),
                                        ("train", ["--scan_layers", "--remat=full", "--mesh.fsdp=2"]),
                                        ("infer", ["--dtype=float32", "--fused_attention"])])
def test_benchmark_reports_one_json_line(mode, extra):
  result = run_benchmark(f"--mode={mode}", *extra)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["mode"] == mode and report["devices"] == 2
  if platform.system() == "Linux" and allocator.mimalloc_library() and "VIT_JAX_ALLOCATOR" not in os.environ:
    assert report["allocator"] == "mimalloc"  # the CLI restarted itself with it (vit_jax.host.allocator)
  # step_ms is rounded to 0.01 ms: a sub-millisecond step leaves a few percent of rounding in the ratio.
  assert report["step_ms"] > 0 and report["img_per_sec"] == pytest.approx(4 / report["step_ms"] * 1e3, rel=0.05)
  assert 0 < report["mfu"] == pytest.approx(report["tflops_per_sec"] / report["peak_tflops_per_sec"], rel=0.05)
  # The analytic count and XLA's agree for a plain ViT (XLA also counts softmax, norms and the optimizer);
  # XLA counts a scanned body once, so its count is left out with scan_layers.
  if report["scan_layers"]:
    assert report["xla_gflops_per_step"] is None
  else:
    assert report["xla_gflops_per_step"] == pytest.approx(report["model_gflops_per_step"], rel=0.3)
  if extra:
    assert report["mesh"] == ({"data": 1, "fsdp": 2, "tensor": 1} if mode == "train" else
                              {"data": 2, "fsdp": 1, "tensor": 1})
    assert report["scan_layers"] == (mode == "train") and report["fused_attention"] == (mode == "infer")


@pytest.mark.slow
def test_benchmark_bad_input_is_one_error_line():
  result = run_benchmark("--batch=3", "--mesh.data=2")
  assert result.returncode == 2
  assert result.stderr.startswith("error: batch=3 is not divisible") and len(result.stderr.splitlines()) == 1


def one_error_line(result):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines[-3:]
  return lines[0]


FAKE_PEER = """import json, os, sys
print("timm warming up")
print(json.dumps({"img_per_sec": 50.0, "argv": sys.argv[1:], "pythonpath": os.environ.get("PYTHONPATH")}))
"""


@pytest.mark.slow
def test_peer_arguments_are_checked_before_the_benchmark_runs(tmp_path):
  peer = ("--peer_python=/nonexistent/python",)
  assert "--peer_dir" in one_error_line(run_benchmark(*peer))  # no --peer_dir and no VIT_JAX_PEER_DIR
  assert "peer script not found" in one_error_line(run_benchmark(*peer, f"--peer_dir={tmp_path}"))
  (tmp_path / "timm_bench.py").write_text(FAKE_PEER)
  assert "--num_classes=10" in one_error_line(run_benchmark(*peer, "--num_classes=1000",
                                                            VIT_JAX_PEER_DIR=str(tmp_path)))
  assert "no timm twin for testing" in one_error_line(run_benchmark(*peer, f"--peer_dir={tmp_path}"))


@pytest.mark.slow
def test_peer_runs_on_the_same_shape_after_the_benchmark(tmp_path):
  """A stand-in timm_bench.py (the real one needs a torch venv): the command line and environment it gets."""
  (tmp_path / "timm_bench.py").write_text(FAKE_PEER)
  result = run_benchmark(f"--peer_python={sys.executable}", "--model_name=ViT-Ti_16", "--mode=infer",
                         "--dtype=float32", VIT_JAX_PEER_DIR=str(tmp_path))
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  peer = report["peer"]
  assert " ".join(peer["argv"]) == ("--mode infer --dtype f32 --batch 4 --image_size 32 --patch 16 --name "
                                    "vit_tiny_patch16_224 --steps 2 --warmup 1")
  assert peer["pythonpath"] == str(tmp_path / "tv_stub")
  assert report["speedup_vs_peer"] == round(report["img_per_sec"] / 50.0, 2)


# --- convolutional models ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model,mode,size", [("CNN-CIFAR", "train", 32), ("CNN-CIFAR", "infer", 44),
                                             ("BiT-R50x1", "infer", 32)])
def test_convolutional_models_benchmark(model, mode, size):
  """The course CNN's train step updates its BatchNorm statistics (a mutable collection in the step), inference
  reads them; BiT runs; the FLOPs are the convolutional count, which XLA's own count is close to."""
  result = run_benchmark(f"--model_name={model}", f"--mode={mode}", f"--image_size={size}", "--dtype=float32")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["family"] == ("cnn" if model == "CNN-CIFAR" else "bit") and report["patch"] is None
  assert report["step_ms"] > 0 and 0 < report["mfu"] < 1
  config = models.get_model_config(model)
  expected = flops.forward_flops_per_image(config, size, 10) * 4 * (3 if mode == "train" else 1) / 1e9
  assert report["model_gflops_per_step"] == pytest.approx(expected, abs=0.01)
  # XLA skips the taps on padding and adds norms, the optimizer and BiT's weight standardisation per step.
  assert report["xla_gflops_per_step"] == pytest.approx(report["model_gflops_per_step"], rel=0.3)


def bench_args(**overrides):
  """The benchmark's flag values, as `FLAGS` holds them after parsing."""
  values = dict(model_name="BiT-R50x1", batch=8, image_size=224, num_classes=10, mode="infer", patch=0,
                remat="none", scan_layers=False, fused_attention=False, steps=3, warmup=1, peer_python="/peer/python",
                peer_dir=None, peer_compile=False, dtype="auto", optimizer="sgd", trainer="supervised",
                mask_ratio=0.75)
  return types.SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize("flags_, message", [
    (dict(scan_layers=True), "--scan_layers is for Vision Transformers, not for BiT-R50x1 (a BiT ResNet-v2); drop it"),
    (dict(remat="full", fused_attention=True), "--remat=full, --fused_attention are for Vision Transformers"),
    (dict(model_name="CNN-CIFAR", patch=4), "--patch=4 is for Vision Transformers, not for CNN-CIFAR (a plain CNN)"),
])
def test_vit_flags_with_a_convolutional_model_are_a_user_error(flags_, message):
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  args = bench_args(**flags_)
  with pytest.raises(UserError, match=re.escape(message)):
    benchmark.check_args(args, models.get_model_config(args.model_name))
  vit = bench_args(**{**flags_, "model_name": "ViT-Ti_16"})
  benchmark.check_args(vit, models.get_model_config(vit.model_name))  # the same flags are fine for a ViT


def test_bit_peer_is_timm_resnetv2_bit_without_vit_arguments(tmp_path):
  """timm_bench.py passes img_size and patch_size, which timm's ResNetV2 refuses: a BiT's peer is the script of
  the benchmark itself, with timm's name and the shape, dtype and torch.compile choice."""
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  (tmp_path / "timm_bench.py").write_text(FAKE_PEER)
  args = bench_args(model_name="BiT-R101x3", peer_dir=str(tmp_path), num_classes=1000, peer_compile=True,
                    mode="train")
  command, env = benchmark.peer_command(args, "bfloat16", models.get_model_config(args.model_name))
  assert command[:3] == ["/peer/python", "-c", benchmark.TIMM_CNN_PEER]
  assert json.loads(command[3]) == dict(name="resnetv2_101x3_bit", num_classes=1000, mode="train", dtype="bf16",
                                        batch=8, image_size=224, steps=3, warmup=1, compile=True)
  assert env["PYTHONPATH"] == str(tmp_path / "tv_stub")
  vit = bench_args(model_name="ViT-Ti_16", peer_dir=str(tmp_path), peer_compile=True)
  with pytest.raises(UserError, match="--peer_compile is for the BiT peer"):
    benchmark.peer_command(vit, "float32", models.get_model_config(vit.model_name))
  cnn = bench_args(model_name="CNN-CIFAR", peer_dir=str(tmp_path))
  with pytest.raises(UserError, match="no timm twin for CNN-CIFAR"):
    benchmark.peer_command(cnn, "float32", models.get_model_config(cnn.model_name))


@pytest.mark.slow
@pytest.mark.skipif(not _peer_available(), reason="needs a .peer venv with torch and timm, and VIT_JAX_PEER_DIR")
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bit_peer_runs_timm(mode):
  result = run_benchmark("--model_name=BiT-R50x1", f"--mode={mode}", "--dtype=float32", "--steps=1",
                         f"--peer_python={PEER_PYTHON}", VIT_JAX_PEER_DIR=PEER_DIR)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  peer = report["peer"]
  assert (peer["name"], peer["mode"], peer["dtype"], peer["batch"], peer["image_size"]) == (
      "resnetv2_50x1_bit", mode, "f32", 4, 32)
  assert peer["params"] == 23_520_842  # R50x1 with a 10-class head: the same model as ours
  assert report["speedup_vs_peer"] == round(report["img_per_sec"] / peer["img_per_sec"], 2)


@pytest.mark.parametrize("peak", [lambda b: 1000 + 37 * b,  # affine, as XLA's peak nearly is
                                  lambda b: 1000 + 37 * b + (b // 64) * 500,  # with jumps
                                  lambda b: 1000 + 10 * b + 0.05 * b * b,  # convex
                                  lambda b: 1000 + 3000 * b ** 0.5])  # concave
@pytest.mark.parametrize("step", [1, 8])
@pytest.mark.parametrize("limit", [5_000, 100_000, 3_000_000])
def test_largest_batch_matches_a_linear_scan(peak, step, limit):
  from vit_jax.tools.benchmark import SEARCH_TOLERANCE, largest_batch  # pylint: disable=g-import-not-at-top
  if peak(step) > limit:
    with pytest.raises(UserError, match=f"even batch={step}"):
      largest_batch(peak, step=step, limit=limit)
    return
  expected = step
  while peak(expected + step) <= limit:
    expected += step
  batch, tried = largest_batch(peak, step=step, limit=limit)
  assert batch % step == 0 and peak(batch) <= limit and tried[batch] == peak(batch)
  assert expected - batch <= max(step, SEARCH_TOLERANCE * batch)
  assert len(tried) <= 10  # a compilation each: far fewer than doubling and bisecting


@pytest.mark.slow
def test_batch_zero_finds_the_largest_batch_that_fits():
  result = run_benchmark("--batch=0", "--memory_limit_gib=0.002", "--compile_only")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  search, batch = report["batch_search"], report["batch"]
  assert search["memory_limit_mib"] == pytest.approx(0.002 * 1024, abs=0.1)
  assert batch % 2 == 0 and report["peak_memory_mib"] <= search["memory_limit_mib"]
  assert {"batch": batch, "peak_memory_mib": report["peak_memory_mib"], "fits": True} in search["tried"]
  too_big = min(t["batch"] for t in search["tried"] if not t["fits"])
  assert batch < too_big <= batch + max(2, batch / 32)
  assert all(t["fits"] == (t["batch"] <= batch) for t in search["tried"])

  result = run_benchmark("--batch=0")  # CPUs report no memory limit
  assert result.returncode == 2 and result.stderr.startswith("error: --batch=0 needs --memory_limit_gib")


@pytest.mark.slow
def test_data_benchmark_cli_runs_on_digits():
  """The README's `python -m vit_jax.tools.data_benchmark --dataset=...`, on the dataset that needs no download."""
  result = subprocess.run([sys.executable, "-m", "vit_jax.tools.data_benchmark", "--dataset=digits", "--workers=0",
                           "--seconds=0.2", "--crop=8", "--batch=8"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith("dataset=digits split=train crop=8") and lines[1].startswith("workers=0: ")
  assert float(lines[1].split()[1]) > 0  # images per second
  bad = subprocess.run([sys.executable, "-m", "vit_jax.tools.data_benchmark", "--dataset=digits", "--workers=two"],
                       capture_output=True, text=True, timeout=300)
  assert "--workers=two must be integers" in one_error_line(bad)


@pytest.mark.parametrize("flags_, message", [
    (dict(trainer="mae", model_name="ViT-Ti_16", mode="infer"), "--trainer=mae is a training objective; use it with "
                                                               "--mode=train"),
    (dict(trainer="mae", model_name="ViT-Ti_16", mode="train"), "no peer for --trainer=mae"),
    (dict(trainer="masked_patch", mode="train", peer_python=None), "masks patch tokens, which BiT-R50x1"),
])
def test_ssl_trainer_flags_are_checked(flags_, message):
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  args = bench_args(**flags_)
  with pytest.raises(UserError, match=re.escape(message)):
    benchmark.check_args(args, models.get_model_config(args.model_name))


@pytest.mark.slow
def test_mae_train_step_counts_the_visible_patches_as_xla_does():
  # 64 patches (patch 4 on 32 px), 16 visible; the decoder (512 x 8 by default) runs on all of them.
  result = run_benchmark("--mode=train", "--trainer=mae", "--mask_ratio=0.75", "--patch=4")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["trainer"] == "mae"
  assert report["xla_gflops_per_step"] == pytest.approx(report["model_gflops_per_step"], rel=0.2)
