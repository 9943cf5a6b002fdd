"""User-facing errors: one `error:` line on stderr and exit code 2, no traceback.

Library code raises `UserError` (a `ValueError`, so API callers can catch either) for anything a user can fix:
a bad config value, an unknown model, a missing or corrupt file. CLIs run their body through `run_cli`, which also
turns JAX failing to start its backend (`JAX_PLATFORMS` naming a platform the machine lacks, a broken plugin) into
such a line. Bugs stay ordinary exceptions with a traceback.
"""
import os
import sys
import threading
from typing import Optional

# What to install for a platform JAX_PLATFORMS may name (JAX's own extras and plugins).
_PLATFORM_INSTALL = {
    "cuda": 'JAX\'s CUDA build on a machine with an NVIDIA GPU (pip install -U "jax[cuda]")',
    "gpu": 'JAX\'s CUDA build on a machine with an NVIDIA GPU (pip install -U "jax[cuda]")',
    "tpu": 'JAX\'s TPU build on a Cloud TPU VM (pip install -U "jax[tpu]")',
    "rocm": "JAX's ROCm plugin on a machine with an AMD GPU",
}
# JAX's own advice, which names only one of the fixes.
_JAX_SUFFIXES = (" (set JAX_PLATFORMS='' to automatically choose an available backend)",
                 " (you may need to uninstall the failing plugin package, or set JAX_PLATFORMS=cpu to skip this "
                 "backend.)")


class UserError(ValueError):
  """An error the user caused and can fix; the message names the bad value and says what to do."""


def _one_line(text):
  return " ".join(str(text).split())


def backend_error(environ=os.environ) -> Optional[UserError]:
  """A UserError saying why JAX cannot start its backend, or None when it starts (or JAX is not loaded).

  Asks `jax.devices()` itself rather than matching the exception a caller saw: JAX raises a RuntimeError for a
  plugin that fails and a bare AssertionError when JAX_PLATFORMS=cuda finds no GPU, and asking again is cheap.
  """
  jax = sys.modules.get("jax")
  if jax is None:  # nothing started JAX, so its backend cannot be what failed
    return None
  try:
    jax.devices()
    return None
  except Exception as e:  # pylint: disable=broad-except  # whatever JAX raises, it could not start
    reason = _one_line(e)
  for suffix in _JAX_SUFFIXES:
    reason = reason.replace(_one_line(suffix), "").strip()
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if not platforms:
    return UserError(f"JAX cannot start its backend ({reason or 'no usable device'}); set JAX_PLATFORMS=cpu to "
                     "compute on the CPU, or reinstall or uninstall the failing accelerator plugin package")
  names = [name.strip() for name in platforms.split(",") if name.strip()]
  installs = sorted({_PLATFORM_INSTALL.get(name, f"the JAX plugin for {name}") for name in names if name != "cpu"})
  reason = reason or f"JAX found no {' or '.join(n for n in names if n != 'cpu') or 'usable'} device"
  return UserError(f"JAX_PLATFORMS={platforms} names a platform this machine cannot use ({reason}); unset it "
                   f"(JAX then uses what the machine has) or set JAX_PLATFORMS=cpu, or install "
                   f"{' and '.join(installs) or 'the missing platform'}")


# Called with (exit status, one-line reason) just before an entry point exits on an error or a signal: a
# multi-process run tells its peers there (`vit_jax.distributed`), which would otherwise wait for this process.
_BEFORE_EXIT = []


_exiting = threading.Event()  # set once this process has begun to exit on an error or a signal


def exiting():
  """True once this process has begun to exit on an error or a signal: a peer watcher then stays silent."""
  return _exiting.is_set()


def mark_exiting():
  """Says that this process has begun to exit on an error or a signal (before its last line is written)."""
  _exiting.set()


def before_exit(callback):
  """Registers `callback(status, reason)`, run before an entry point exits on a user error or a signal."""
  _BEFORE_EXIT.append(callback)


def notify_exit(status, reason):
  """Runs the `before_exit` callbacks; one that fails must not change how the process ends."""
  mark_exiting()
  for callback in _BEFORE_EXIT:
    try:
      callback(status, reason)
    except Exception:  # pylint: disable=broad-except
      pass


def _exit(error):
  mark_exiting()
  print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)  # exactly one line
  notify_exit(2, _one_line(error))
  sys.exit(2)


def run_cli(main, *args, **kwargs):
  """Calls `main`; a `UserError`, or JAX failing to start its backend, becomes `error: <message>` on stderr and
  exit status 2."""
  try:
    return main(*args, **kwargs)
  except UserError as e:
    _exit(e)
  except (RuntimeError, AssertionError):  # what JAX raises when its backend cannot start; anything else re-raises
    error = backend_error()
    if error is None:
      raise
    _exit(error)
