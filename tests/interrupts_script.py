"""The subprocess of tests/test_interrupts.py: one scenario of `vit_jax.interrupts.StopSignals` per command line.

`python tests/interrupts_script.py SCENARIO [--save_seconds=S] [--after_loop=exit|block]` prints `ready` (or
`in loop`) when the test may send its signal. Scenarios:
  startup   the main thread blocks in one C call in start-up phase (as an XLA compilation does)
  no_stop   the same block with a plain Python SIGTERM handler instead: the handler cannot run
  loop      a loop of steps that polls `requested`, "saves" for --save_seconds, then leaves the loop and exits
            with `exit_code` or blocks in C (--after_loop=block)
  fork      in the loop, a forked child that the test signals; the parent reports whether it saw a request
  compile   start-up phase while XLA compiles a large program (imports JAX)
"""
import argparse
import ctypes
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vit_jax.interrupts import StopSignals  # pylint: disable=g-import-not-at-top,wrong-import-position

_LIBC = ctypes.CDLL(None)


def _say(text):
  print(text, flush=True)


def block_in_c():
  """Blocks the main thread in one C call that never returns to bytecode (it releases the GIL, as XLA does)."""
  mutex = ctypes.create_string_buffer(64)  # all zeros: glibc's PTHREAD_MUTEX_INITIALIZER, a normal mutex
  _LIBC.pthread_mutex_lock(mutex)
  _LIBC.pthread_mutex_lock(mutex)  # relocking a normal mutex waits forever; futex waits restart after signals


def startup():
  with StopSignals():
    _say("ready")
    block_in_c()


def no_stop():
  signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(5))  # pylint: disable=protected-access
  _say("ready")
  block_in_c()


def loop(save_seconds, after_loop):
  with StopSignals() as stop:
    stop.enter_loop()
    _say("in loop")
    step = 0
    while stop.requested is None:
      _LIBC.usleep(10_000)  # one "train step" in C
      step += 1
    _say(f"saving at step {step} after {stop.requested.name}")
    time.sleep(save_seconds)
    _say("saved")
    stop.leave_loop()
    if after_loop == "block":
      _say("left loop")
      block_in_c()
  sys.exit(stop.exit_code)


def fork():
  with StopSignals() as stop:
    stop.enter_loop()
    child = os.fork()
    if child == 0:
      time.sleep(60)
      os._exit(0)  # pylint: disable=protected-access
    _say(f"child {child}")
    _, status = os.waitpid(child, 0)
    _say(f"child signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}")
    time.sleep(0.5)  # a byte the child wrote to the wakeup fd would reach the watcher by now
    _say(f"requested {stop.requested}")


def compile_in_startup():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def long_chain(x):
    for i in range(3000):
      x = jnp.sin(x) * 1.0001 + i
    return x

  with StopSignals():
    lowered = jax.jit(long_chain).lower(jnp.ones(8))
    _say("ready")
    lowered.compile()
    _say("compiled")


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("scenario", choices=["startup", "no_stop", "loop", "fork", "compile"])
  parser.add_argument("--save_seconds", type=float, default=0.0)
  parser.add_argument("--after_loop", choices=["exit", "block"], default="exit")
  args = parser.parse_args()
  if args.scenario == "loop":
    loop(args.save_seconds, args.after_loop)
  else:
    {"startup": startup, "no_stop": no_stop, "fork": fork, "compile": compile_in_startup}[args.scenario]()
