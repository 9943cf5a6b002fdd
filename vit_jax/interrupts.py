"""SIGTERM and SIGINT for the training CLI: exit at once while nothing is unsaved, checkpoint first in the loop.

A Python signal handler runs only when the main thread returns to bytecode, so a signal that arrives while the
main thread sits in one long C++ call (XLA compiles big models for minutes) would wait until the call returns.
`StopSignals` therefore decides in a daemon watcher thread instead: it installs do-nothing Python handlers (so
that CPython's C-level handler exists) and points `signal.set_wakeup_fd` at a socket pair; the C handler writes
the signal number there at once, whatever the main thread is doing, and the watcher reads it. jaxlib releases
the GIL while it compiles and waits for devices, so the watcher runs meanwhile.

What a SIGTERM or SIGINT does depends on the phase:

- start-up (from `__enter__` until `enter_loop()`) and after `leave_loop()`: nothing unsaved, so the process
  logs one warning, flushes stdout, stderr and the logging handlers (2 s at most) and exits at once with
  `os._exit`: status 0 for SIGTERM, 130 for SIGINT.
- the loop (between `enter_loop()` and `leave_loop()`): the watcher only records the request and logs one
  warning; the loop polls `requested` at each step boundary, saves a checkpoint and stops, and the entry point
  exits with `exit_code`. The watcher cannot save on its own, so a request that arrives while the main thread
  compiles inside the loop (a new resolution stage, the first evaluation) waits for that compilation to end.
- while a stop is pending in the loop: SIGINT exits at once with 130, even mid-save (Ctrl-C twice); the previous
  checkpoint stays. A repeated SIGTERM is only logged: schedulers and launchers often send it more than once
  (to the process group and through a forwarding wrapper), and the checkpoint is what they wait for.

A signal whose handler is SIG_IGN when `__enter__` runs stays ignored (the shell ignores SIGINT in the
background jobs of a script). Outside the main thread (pytest workers, library callers on other threads)
`StopSignals` installs nothing: `active` is False, `requested` stays None and `exit_code` 0. Forked children
drop the handlers and the wakeup fd, so their signals never reach the parent's watcher. The wakeup fd is
process-wide: do not run an asyncio event loop in the main thread inside the `with` block.
"""
import logging as std_logging
import os
import signal
import socket
import sys
import threading
from typing import Dict, Optional

from absl import logging

from vit_jax import errors

HANDLED = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}
FLUSH_TIMEOUT_S = 2.0  # an exit never waits longer for a stuck stderr pipe
_STOP_WATCHING = b"\0"  # no signal has number 0, so this byte can only come from __exit__

_active_instance = None  # the entered StopSignals of this process, reset in forked children


def _do_nothing(signum, frame):
  """The Python-level handler: it exists so CPython installs its C handler; the watcher thread acts instead."""
  del signum, frame


def _flush_output():
  for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except (AttributeError, OSError, ValueError):  # None, closed or broken streams cannot hold anything back
      pass
  # list() copies in one C call: loggers that other threads create meanwhile cannot break the iteration.
  registered = list(std_logging.Logger.manager.loggerDict.values())
  loggers = [std_logging.getLogger()] + [logger for logger in registered if isinstance(logger, std_logging.Logger)]
  for handler in {handler for logger in loggers for handler in logger.handlers}:
    try:
      handler.flush()
    except (OSError, ValueError):
      pass


def _exit_now(code, message, *args):
  """Logs `message`, flushes what the process wrote, and ends it with `code` without running any Python cleanup."""
  errors.mark_exiting()

  def log_and_flush():
    try:
      logging.warning(message, *args)
      _flush_output()
    except Exception:  # pylint: disable=broad-except  # the exit matters more than its message
      pass

  # In its own thread so that a handler blocked on a full pipe (or holding its lock) cannot stop the exit.
  flusher = threading.Thread(target=log_and_flush, name="stop-signals-flush", daemon=True)
  flusher.start()
  flusher.join(FLUSH_TIMEOUT_S)
  errors.notify_exit(code, message % args)  # the peers of a multi-process run stop too, instead of waiting
  os._exit(code)  # pylint: disable=protected-access


class StopSignals:
  """SIGTERM and SIGINT handling for the training CLI (see the module docstring); a context manager.

  Enter it (or `install()` it) once, in the main thread, as early as possible; `enter_loop()` once the loop holds
  state that a checkpoint must save, `leave_loop()` once everything is on disk. Not entered, or entered outside
  the main thread, it is inert: the loop can use it unconditionally.
  """

  def __init__(self):
    self._lock = threading.Lock()  # the watcher's decision and the phase changes of the main thread
    self._active = False
    self._in_loop = False
    self._requested: Optional[signal.Signals] = None
    self._previous_handlers: Dict[signal.Signals, object] = {}
    self._previous_wakeup_fd = -1
    self._reader = self._writer = None
    self._watcher = None

  @property
  def active(self) -> bool:
    """Whether the handlers are installed (entered in the main thread, not yet exited)."""
    return self._active

  @property
  def requested(self) -> Optional[signal.Signals]:
    """The signal that asked the loop to save and stop, or None."""
    return self._requested

  @property
  def exit_code(self) -> int:
    """The process's exit status after a requested stop: 130 for SIGINT, 0 for SIGTERM or no request."""
    return EXIT_CODES.get(self._requested, 0)

  def enter_loop(self):
    """From now on a signal only requests a stop: the loop saves a checkpoint first. Idempotent."""
    with self._lock:
      self._in_loop = True

  def leave_loop(self):
    """From now on a signal exits at once again (checkpoints and metrics are closed). Keeps `requested`."""
    with self._lock:
      self._in_loop = False

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc_info):
    self.uninstall()

  def install(self) -> "StopSignals":
    """What `with` does on entry, for an entry point that installs before its slow imports; returns self."""
    global _active_instance
    if threading.current_thread() is not threading.main_thread():
      return self  # only the main thread may install signal handlers: stay inert
    if self._active or _active_instance is not None:
      raise RuntimeError("StopSignals is already active in this process; enter one instance once")
    self._reader, self._writer = socket.socketpair()
    self._writer.setblocking(False)  # set_wakeup_fd requires it: the C handler must never block
    self._watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
    self._watcher.start()
    # The wakeup fd before the handlers: no moment where our handler runs and nobody hears the signal.
    self._previous_wakeup_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
    for signum in HANDLED:
      previous = signal.getsignal(signum)
      if previous == signal.SIG_IGN:  # inherited "ignore" (background job of a shell script) stays
        continue
      self._previous_handlers[signum] = signal.SIG_DFL if previous is None else previous
      signal.signal(signum, _do_nothing)
    self._active = True
    _active_instance = self
    return self

  def uninstall(self):
    """What `with` does on exit: the previous handlers and wakeup fd come back and the watcher stops."""
    global _active_instance
    if not self._active:
      return
    # The handlers before the wakeup fd: again no moment where a signal is swallowed unheard.
    self._restore_signal_state()
    self._active = False
    _active_instance = None
    try:
      self._writer.send(_STOP_WATCHING)
    except OSError:
      pass
    self._watcher.join(timeout=FLUSH_TIMEOUT_S)
    self._reader.close()
    self._writer.close()

  def _restore_signal_state(self):
    for signum, previous in self._previous_handlers.items():
      signal.signal(signum, previous)
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    self._previous_handlers = {}

  def _after_fork_in_child(self):
    """A forked child keeps neither our handlers nor the wakeup fd: its signals must not reach our watcher."""
    self._lock = threading.Lock()  # the parent's watcher may have held it at the fork; no watcher runs here
    self._restore_signal_state()
    self._active = False
    self._reader.close()
    self._writer.close()

  def _watch(self):
    while True:
      try:
        received = self._reader.recv(64)
      except OSError:  # closed
        return
      for signum in received:
        if signum == _STOP_WATCHING[0]:
          return
        if signum in self._previous_handlers:
          self._on_signal(signal.Signals(signum))
      if not received:
        return

  def _on_signal(self, signum: signal.Signals):
    with self._lock:
      if not self._in_loop:
        action = "exit"
      elif self._requested is None:
        action = "request"
        self._requested = signum
      elif signum == signal.SIGINT:
        action = "exit_unsaved"
      else:
        action = "repeat"
    code = EXIT_CODES[signum]
    if action == "exit":
      _exit_now(code, "%s: no unsaved training state; exiting now with status %d.", signum.name, code)
    elif action == "exit_unsaved":
      _exit_now(code, "%s while stopping: exiting at once with status %d, without saving; the last complete "
                "checkpoint stays.", signum.name, code)
    elif action == "request":
      another = "another" if signum == signal.SIGINT else "a"
      logging.warning("%s: saving a checkpoint at the current step, then exiting with status %d (%s SIGINT exits at "
                      "once, without saving).", signum.name, code, another)
    else:
      logging.warning("%s again: still saving the checkpoint (a SIGINT exits at once, without saving).",
                      signum.name)


def _reset_in_forked_child():
  global _active_instance
  instance, _active_instance = _active_instance, None
  if instance is not None:
    try:
      instance._after_fork_in_child()  # pylint: disable=protected-access
    except (OSError, ValueError):  # restoring failed (not the main thread): the child keeps what it inherited
      pass


os.register_at_fork(after_in_child=_reset_in_forked_child)
