"""vit_jax.host: the CPU-host set-up runs only where JAX computes on the CPU."""
import pytest

from vit_jax import host
from vit_jax.host import cpu_devices


@pytest.mark.parametrize("environ,installed,expected", [
    ({}, ["jax", "jaxlib", "flax"], True),  # nothing but the CPU backend
    ({}, ["jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt"], False),  # a GPU host
    ({}, ["jax", "jaxlib", "jax_cuda13_plugin"], False),
    ({}, ["jax", "libtpu"], False),  # Cloud TPU VMs
    ({}, ["jax", "jax-rocm7-plugin"], False),
    ({"JAX_PLATFORMS": "cpu"}, ["jax", "jax-cuda12-plugin"], True),  # the user asks for the CPU
    ({"JAX_PLATFORMS": "cuda,cpu"}, ["jax", "jax-cuda12-plugin"], False),
    ({"JAX_PLATFORMS": "tpu"}, ["jax"], False),
    ({"JAX_PLATFORMS": " cpu "}, ["jax", "libtpu"], True),
])
def test_cpu_host_rule(environ, installed, expected):
  assert host.is_cpu_host(environ, installed) is expected


def test_accelerator_hosts_neither_restart_nor_split(monkeypatch):
  monkeypatch.setattr(host, "is_cpu_host", lambda: False)
  monkeypatch.setattr(host.allocator, "reexec_with_fast_allocator", lambda: pytest.fail("re-executed on a GPU host"))
  monkeypatch.setattr(cpu_devices, "configure", lambda *a, **k: pytest.fail("split the CPU on a GPU host"))
  assert host.restart_with_fast_allocator() is None
  # The parameter count is what costs (it traces the model): it is not even computed.
  assert host.split_cpu_devices(0, num_params=lambda: pytest.fail("counted parameters")) is None
  with pytest.raises(ValueError, match="cpu_devices=-1 must be 0"):  # still a bad value wherever it is given
    host.split_cpu_devices(-1, num_params=lambda: 1)


def test_cpu_hosts_restart_and_split(monkeypatch):
  monkeypatch.setattr(host, "is_cpu_host", lambda: True)
  monkeypatch.setattr(host.allocator, "reexec_with_fast_allocator", lambda: "mimalloc")
  calls = []
  monkeypatch.setattr(cpu_devices, "configure", lambda requested, **kwargs: calls.append((requested, kwargs)) or 4)
  assert host.restart_with_fast_allocator() == "mimalloc"
  assert host.split_cpu_devices(0, num_params=lambda: 123, batch_sizes=(8,)) == 4
  assert calls == [(0, {"num_params": 123, "batch_sizes": (8,), "mesh_sizes": (-1,)})]
