"""Test-wide setup: 8 emulated CPU devices."""
import os

# Must be set before jax initialises its backends (conftest is imported before any test module).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
