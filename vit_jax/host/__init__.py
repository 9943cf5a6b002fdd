"""Process set-up of CPU hosts, called by the entry points (`vit_jax.main`, the tools), never by library code.

Two steps, both only where JAX will compute on the CPU: `restart_with_fast_allocator()` first thing in the
process (`vit_jax.host.allocator`), and `split_cpu_devices(...)` before JAX creates its devices
(`vit_jax.host.cpu_devices`). On GPU and TPU hosts both do nothing.
"""
import importlib.metadata
import os
import re
from typing import Callable, Iterable, Mapping, Optional

from vit_jax.host import allocator, cpu_devices

# Distributions that give JAX an accelerator backend: CUDA and ROCm plugins, libtpu.
_ACCELERATOR_PLUGIN = re.compile(r"^(jax[-_](cuda|rocm)\d*[-_](plugin|pjrt)|libtpu([-_]nightly)?)$", re.IGNORECASE)


def is_cpu_host(environ: Mapping[str, str] = os.environ, installed: Optional[Iterable[str]] = None) -> bool:
  """Whether JAX will compute on the CPU: `JAX_PLATFORMS` names cpu first, or it is unset and no accelerator
  plugin is installed. Decided without starting JAX, whose first device query fixes the CPU device count."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if installed is None:
    installed = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
  return not any(_ACCELERATOR_PLUGIN.match(name) for name in installed)


def restart_with_fast_allocator() -> Optional[str]:
  """On a CPU host, re-executes this process once with the allocator of `vit_jax.host.allocator`; returns, in the
  restarted process, the allocator it runs with (None when it was not restarted)."""
  if not is_cpu_host():
    return None
  return allocator.reexec_with_fast_allocator()


def split_cpu_devices(requested: int, *, num_params: Callable[[], int], batch_sizes: Iterable[int] = (),
                      mesh_sizes: Iterable[int] = (-1,)) -> Optional[int]:
  """On a CPU host, splits the cores into `requested` JAX devices (0: `cpu_devices.auto_count`); returns the count
  set, or None. `num_params()` is called only there (it sizes the state copies of the automatic count)."""
  if not is_cpu_host():
    if requested < 0:
      raise cpu_devices.bad_count(requested)
    return None
  return cpu_devices.configure(requested, num_params=num_params(), batch_sizes=batch_sizes, mesh_sizes=mesh_sizes)
