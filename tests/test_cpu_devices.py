"""Splitting a CPU host into several JAX devices: the `auto` rule, and what a fresh process ends up with."""
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import xla_flags
from vit_jax.host import cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


@pytest.mark.parametrize("cores,num_params,batch_sizes,mesh_sizes,expected", [
    (2, 5_000_000, (128, 512), (-1, 1, 1), 4),  # 2 per core
    (16, 5_000_000, (128,), (-1, 1, 1), 8),  # at most 8
    (2, 5_000_000, (6,), (-1, 1, 1), 3),  # a count that divides the batch
    (2, 5_000_000, (7,), (-1, 1, 1), 1),
    (2, 300_000_000, (128,), (-1, 1, 1), 1),  # 4 state copies of 4.8 GB would pass a quarter of 24 GiB
    (2, 150_000_000, (128,), (-1, 1, 1), 2),  # 2 copies of 2.4 GB fit in 6 GiB, 3 do not
    (2, 5_000_000, (128,), (2, 1, 1), 2),  # a mesh without -1 fixes the count
    (2, 5_000_000, (128,), (-1, 1, 2), 4),  # a multiple of the fixed axes
    (1, 5_000_000, (128,), (-1, 1, 4), 4),  # the fixed axes win over the rule
])
def test_auto_count(cores, num_params, batch_sizes, mesh_sizes, expected):
  assert cpu_devices.auto_count(cores=cores, num_params=num_params, host_bytes=24 * GIB, batch_sizes=batch_sizes,
                                mesh_sizes=mesh_sizes) == expected


def _devices_in_fresh_process(code, **env):
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  environ.update(env)
  script = ("import json, jax\nfrom vit_jax.host import cpu_devices\n" + code +
            "\nprint(json.dumps({'set': count, 'devices': jax.device_count()}))")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_auto_splits_a_fresh_process():
  got = _devices_in_fresh_process("count = cpu_devices.configure(0, num_params=1000, batch_sizes=(8,))")
  expected = cpu_devices.auto_count(cores=cpu_devices.host_cores(), num_params=1000,
                                    host_bytes=cpu_devices.host_memory_bytes(), batch_sizes=(8,))
  assert got == {"set": expected, "devices": expected}


@pytest.mark.slow
def test_explicit_count_and_the_users_own_setting():
  assert _devices_in_fresh_process("count = cpu_devices.configure(3, num_params=1000, batch_sizes=(8,))") == \
      {"set": 3, "devices": 3}
  # A count the user fixed in the environment is kept, whatever the config says.
  assert _devices_in_fresh_process("count = cpu_devices.configure(3, num_params=1000, batch_sizes=(8,))",
                                   XLA_FLAGS="--xla_force_host_platform_device_count=2") == {"set": None, "devices": 2}
  assert _devices_in_fresh_process("count = cpu_devices.configure(0, num_params=1000, batch_sizes=(8,))",
                                   JAX_NUM_CPU_DEVICES="5") == {"set": None, "devices": 5}


@pytest.mark.slow
def test_after_jax_started_the_count_is_left_alone():
  got = _devices_in_fresh_process("jax.numpy.zeros(1).block_until_ready()\n"
                                  "count = cpu_devices.configure(3, num_params=1000, batch_sizes=(8,))")
  assert got == {"set": None, "devices": 1}


@pytest.mark.slow
def test_main_evaluate_and_infer_split_by_default_and_a_bad_count_is_one_error_line(tmp_path):
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  environ["XLA_FLAGS"] = xla_flags.FAST_COMPILE  # no device count: the CLIs choose it
  base = [sys.executable, "-m", "vit_jax.main", "--config=configs/quickstart.py", "--config.total_steps=1",
          "--config.model.transformer.num_layers=1", "--config.batch=16", "--config.batch_eval=16",
          "--config.eval_every=0", "--config.peak_flops=1e12"]
  result = subprocess.run(base + [f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  expected = cpu_devices.auto_count(cores=cpu_devices.host_cores(), num_params=200_000,
                                    host_bytes=cpu_devices.host_memory_bytes(), batch_sizes=(16,))
  assert f"CPU devices: {expected} (auto" in result.stderr
  with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
    assert json.load(f)["cpu_devices"] == 0
  # The evaluate CLI splits the same way (its batch is rounded up to the device count, so only memory limits it).
  result = subprocess.run([sys.executable, "-m", "vit_jax.tools.evaluate", f"--checkpoint={tmp_path / 'run'}"],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  expected = cpu_devices.auto_count(cores=cpu_devices.host_cores(), num_params=200_000,
                                    host_bytes=cpu_devices.host_memory_bytes(), batch_sizes=())
  assert f"CPU devices: {expected} (auto" in result.stderr
  assert json.loads(result.stdout)["num_examples"] == 360
  # So does the infer CLI (--batch_size=1 is rounded up to the device count: one batch, padding masked out).
  for i in range(3):
    Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"digit{i}.png")
  result = subprocess.run([sys.executable, "-m", "vit_jax.tools.infer", f"--checkpoint={tmp_path / 'run'}",
                           "--batch_size=1", *(str(tmp_path / f"digit{i}.png") for i in range(3))], cwd=ROOT,
                          env=environ,
                          capture_output=True, text=True, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"CPU devices: {expected} (auto" in result.stderr
  assert [line.split(":")[0] for line in result.stdout.splitlines()] == [str(tmp_path / f"digit{i}.png")
                                                                          for i in range(3)]
  result = subprocess.run(base + [f"--workdir={tmp_path / 'bad'}", "--config.cpu_devices=-2"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=240, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: cpu_devices=-2 must be 0 (auto)")


@pytest.mark.parametrize("batch_sizes, mesh_sizes, num_params, expected", [
    ((128, 512), (-1,), 1000, None),
    ((128, 127), (-1,), 1000, r"1, not 4, because not every batch size \(128, 127\) .* multiples of 4"),
    ((128, 512), (2, 1, 1), 1000, r"2, not 4: the mesh sizes \(2, 1, 1\) fix the count"),
    ((128, 512), (-1,), 10**9, "quarter of the host's memory"),
])
def test_the_log_says_which_value_made_auto_split_into_fewer_devices(batch_sizes, mesh_sizes, num_params, expected):
  host_bytes = 64 * 2**30
  count = cpu_devices.auto_count(cores=2, num_params=num_params, host_bytes=host_bytes, batch_sizes=batch_sizes,
                                 mesh_sizes=mesh_sizes)
  reason = cpu_devices.why_fewer(count, cores=2, num_params=num_params, host_bytes=host_bytes,
                                 batch_sizes=batch_sizes, mesh_sizes=mesh_sizes)
  if expected is None:
    assert count == 4 and reason is None
  else:
    assert re.search(expected, reason), reason
