"""CPU hosts: how many JAX devices a process splits its cores into (data parallel over them).

One XLA:CPU device runs a step as one chain of kernels; many of a small model's kernels are too small to keep
every core busy, so cores idle between them. Several devices on the same cores run their shares of the batch
side by side and fill those gaps (docs/benchmarks.md has the gain). The cost is one copy of the training state per
device, so `auto` splits only while the copies take at most a quarter of the host's memory, and only into counts
that divide the batch sizes.

The entry points call `configure` through `vit_jax.host.split_cpu_devices` (config key `cpu_devices` of
`vit_jax.main`, flag `--cpu_devices` of the tools), on CPU hosts only. It must run before JAX creates its devices
(the first JAX computation fixes them). A count set by the user, with `JAX_NUM_CPU_DEVICES` or XLA's
`--xla_force_host_platform_device_count`, is kept.
"""
import math
import os
from typing import Iterable, Optional

import jax
from absl import logging

from vit_jax.errors import UserError

AUTO = 0
DEVICES_PER_CORE = 2  # the best count measured on 2-core hosts (docs/benchmarks.md)
MAX_AUTO_DEVICES = 8
STATE_BYTES_PER_PARAM = 16  # float32 parameters and gradients and up to two optimizer moments
MAX_STATE_FRACTION = 0.25  # of the host's memory, for all copies of the training state together


def bad_count(requested: int) -> UserError:
  return UserError(f"cpu_devices={requested} must be 0 (auto) or a positive device count")


def auto_count(*, cores: int, num_params: int, host_bytes: int, batch_sizes: Iterable[int],
               mesh_sizes: Iterable[int] = (-1,)) -> int:
  """The device count of `auto`: 2 per core (at most 8), fewer if the state copies or the batch sizes say so.

  `mesh_sizes` are the configured mesh axes: without a -1 they fix the count; with one, the count is a multiple
  of the others' product.
  """
  batch_sizes, mesh_sizes = tuple(batch_sizes), tuple(mesh_sizes)
  fixed = math.prod(size for size in mesh_sizes if size != -1)
  if -1 not in mesh_sizes:
    return fixed

  def fits(count):
    return (count % fixed == 0 and count * num_params * STATE_BYTES_PER_PARAM <= MAX_STATE_FRACTION * host_bytes
            and all(size % count == 0 for size in batch_sizes))

  count = min(MAX_AUTO_DEVICES, DEVICES_PER_CORE * cores)
  while count > fixed and not fits(count):
    count -= 1
  return max(count, fixed)


def user_count() -> Optional[int]:
  """The CPU device count the user fixed (JAX_NUM_CPU_DEVICES / jax_num_cpu_devices, or the XLA flag), else None."""
  if jax.config.jax_num_cpu_devices >= 0:
    return jax.config.jax_num_cpu_devices
  for flag in os.environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == "--xla_force_host_platform_device_count" and value.isdigit():
      return int(value)
  return None


def host_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def host_memory_bytes() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0  # unknown: `auto` stays at one device


def configure(requested: int, *, num_params: int, batch_sizes: Iterable[int],
              mesh_sizes: Iterable[int] = (-1,)) -> Optional[int]:
  """Sets the CPU device count before JAX starts: `requested` > 0 exactly, AUTO by `auto_count`.

  Returns the count set, or None when it was left alone (the user fixed it, or JAX has already started).
  """
  if requested < 0:
    raise bad_count(requested)
  if user_count() is not None:
    return None
  count = requested or auto_count(cores=host_cores(), num_params=num_params, host_bytes=host_memory_bytes(),
                                  batch_sizes=batch_sizes, mesh_sizes=mesh_sizes)
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # JAX already created its devices (e.g. an earlier run in this process)
    logging.info("cpu_devices=%d not applied: JAX's devices already exist.", count)
    return None
  logging.info("CPU devices: %d (%s; docs/benchmarks.md).", count, "cpu_devices" if requested else "auto")
  reason = None if requested else why_fewer(count, cores=host_cores(), num_params=num_params,
                                            host_bytes=host_memory_bytes(), batch_sizes=batch_sizes,
                                            mesh_sizes=mesh_sizes)
  if reason:
    logging.warning("CPU devices: %s", reason)
  return count


def why_fewer(count: int, *, cores: int, num_params: int, host_bytes: int, batch_sizes: Iterable[int],
              mesh_sizes: Iterable[int] = (-1,)) -> Optional[str]:
  """Which config value made `auto` choose `count` devices, fewer than the host's cores allow, and the fix."""
  best, batch_sizes = min(MAX_AUTO_DEVICES, DEVICES_PER_CORE * cores), tuple(batch_sizes)
  if count >= best:
    return None
  if -1 not in tuple(mesh_sizes):
    return f"{count}, not {best}: the mesh sizes {tuple(mesh_sizes)} fix the count; set one axis to -1 to let it grow"
  if (count + 1) * num_params * STATE_BYTES_PER_PARAM > MAX_STATE_FRACTION * host_bytes:
    return (f"{count}, not {best}: more copies of the training state would take over a quarter of the host's "
            "memory")
  return (f"{count}, not {best}, because not every batch size {batch_sizes} (per micro-step: batch / accum_steps; "
          f"batch_eval) is divisible by more; multiples of {best} train up to that much faster")
