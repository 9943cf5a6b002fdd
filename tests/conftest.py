"""Test-wide setup: 8 emulated CPU devices compiling fast (tests/xla_flags.py), and one XLA compilation cache for
the whole run."""
import os
import shutil
import tempfile

from tests import xla_flags

# Must be set before jax initialises its backends (conftest is imported before any test module).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags.cpu_devices(8)]).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Many tests run `python -m vit_jax.main` (and the other CLIs) on the same tiny configs several times: resuming,
# killing, comparing process counts. A persistent cache shared by the pytest workers and their subprocesses (they
# inherit the environment) compiles each program once per run. Fresh per run, so a test never sees another
# run's executables.
_CREATED_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the pytest process itself; workers inherit its choice
  _CREATED_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vit_jax_tests_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config):
  del config
  if _CREATED_CACHE:
    shutil.rmtree(_CREATED_CACHE, ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs and subprocesses; `pytest -m 'not slow'` skips them")
