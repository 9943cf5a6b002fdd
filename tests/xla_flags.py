"""XLA flags for the test suite's processes (pytest's own and the CLIs it starts)."""

# Most of the suite's time is XLA:CPU compiling many small programs. With LLVM at -O0, compiles take a third to a
# half of the time. The matmuls are library calls at any level. Results differ from the default -O2 only in float32
# rounding (~1e-7 relative after a few train steps). Tests that leave XLA_FLAGS unset (the `auto` CPU split, the
# launcher's real processes) still run the default level.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_devices(count: int) -> str:
  """XLA_FLAGS for a test process with `count` emulated CPU devices."""
  return f"--xla_force_host_platform_device_count={count} {FAST_COMPILE}"
