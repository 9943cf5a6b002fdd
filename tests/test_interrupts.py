"""vit_jax.interrupts: SIGTERM and SIGINT in start-up, in the loop, twice, during a C call, in forks and threads.

The scenarios run in subprocesses of tests/interrupts_script.py, since a start-up signal ends the process."""
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from vit_jax import interrupts

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interrupts_script.py")
EXIT_SECONDS = 3.0  # "within seconds": the watcher itself needs milliseconds
HANG_SECONDS = 30.0  # a scenario still running this long after its last signal has failed

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the scenarios block in glibc calls")


class _Scenario:
  """One run of interrupts_script.py: waits for its lines, sends signals, collects the exit."""

  def __init__(self, *args, env=None, prefix=()):
    self.process = subprocess.Popen([*prefix, sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, bufsize=0, env=env)
    self.stdout = ""
    self.signalled_at = None

  def wait_for(self, text, timeout=60.0):
    """Reads stdout until it contains `text`; the process must still run then."""
    deadline = time.monotonic() + timeout
    while text not in self.stdout:
      assert time.monotonic() < deadline, f"no {text!r} within {timeout} s; stdout so far: {self.stdout!r}"
      if select.select([self.process.stdout], [], [], 0.1)[0]:
        chunk = os.read(self.process.stdout.fileno(), 4096)
        assert chunk, f"exited before {text!r}: {self.finish()}"
        self.stdout += chunk.decode()
    return self.stdout

  def wait_until_blocked_in_c(self):
    """Until the main thread waits in the kernel (futex) rather than between `ready` and the C call."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
      try:
        with open(f"/proc/{self.process.pid}/wchan", encoding="utf-8") as f:
          if "futex" in f.read():
            return
      except OSError:
        break
      time.sleep(0.01)
    time.sleep(0.5)  # no wchan to read: give it time

  def send(self, signum):
    self.signalled_at = time.monotonic()
    self.process.send_signal(signum)

  def running_after(self, seconds):
    time.sleep(seconds)
    return self.process.poll() is None

  def finish(self, timeout=HANG_SECONDS):
    """(exit status, all stdout, all stderr, seconds from the last signal to the exit)."""
    try:
      rest, stderr = self.process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      rest, stderr = self.process.communicate()
      pytest.fail(f"still running {timeout} s after the signal; stderr: {stderr.decode()[-2000:]}")
    seconds = time.monotonic() - self.signalled_at if self.signalled_at else None
    return self.process.returncode, self.stdout + rest.decode(), stderr.decode(), seconds


def _assert_no_traceback(stderr):
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


# --- start-up: nothing unsaved, exit at once --------------------------------------------------------------------


@linux_only
def test_a_python_handler_cannot_run_while_the_main_thread_blocks_in_c():
  # The premise of the watcher thread: the scenarios' C call is one where a plain handler waits forever.
  scenario = _Scenario("no_stop")
  scenario.wait_for("ready")
  scenario.wait_until_blocked_in_c()
  scenario.send(signal.SIGTERM)
  still_running = scenario.running_after(1.0)
  scenario.process.kill()
  scenario.process.communicate()
  assert still_running, f"the Python handler ran (status {scenario.process.returncode}); the C call is no test"


@linux_only
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_startup_signal_exits_at_once_while_blocked_in_c(signum, status):
  scenario = _Scenario("startup")
  scenario.wait_for("ready")
  scenario.wait_until_blocked_in_c()
  scenario.send(signum)
  returncode, _, stderr, seconds = scenario.finish()
  assert returncode == status, stderr
  assert seconds < EXIT_SECONDS
  assert f"{signum.name}: no unsaved training state; exiting now with status {status}." in stderr
  assert stderr.count("WARNING") == 1, stderr
  _assert_no_traceback(stderr)


@linux_only
def test_an_inherited_ignore_stays():
  # A shell ignores SIGINT in the background jobs of a script; exec keeps that, and so do we.
  scenario = _Scenario("startup", prefix=["sh", "-c", 'trap "" INT; exec "$@"', "sh"])
  scenario.wait_for("ready")
  scenario.send(signal.SIGINT)
  assert scenario.running_after(0.5)
  scenario.send(signal.SIGTERM)
  returncode, _, stderr, _ = scenario.finish()
  assert returncode == 0, stderr


@pytest.mark.slow  # imports JAX and compiles for seconds
@linux_only
def test_startup_signal_exits_during_an_xla_compilation():
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # a real compilation, no cache
  scenario = _Scenario("compile", env=env)
  scenario.wait_for("ready", timeout=120)
  time.sleep(0.3)  # inside lowered.compile() by now
  scenario.send(signal.SIGTERM)
  returncode, stdout, stderr, seconds = scenario.finish()
  assert returncode == 0, stderr
  assert "compiled" not in stdout, f"the compilation ended first ({seconds:.1f} s); make the program bigger"
  assert seconds < EXIT_SECONDS
  _assert_no_traceback(stderr)


# --- the loop: save first, then exit with exit_code ---------------------------------------------------------


@linux_only
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_loop_signal_requests_a_save_then_exit_code(signum, status):
  scenario = _Scenario("loop", "--save_seconds=0.2")
  scenario.wait_for("in loop")
  time.sleep(0.1)  # a few steps
  scenario.send(signum)
  returncode, stdout, stderr, _ = scenario.finish()
  assert returncode == status, stderr
  assert f"after {signum.name}\nsaved\n" in stdout
  assert f"{signum.name}: saving a checkpoint at the current step, then exiting with status {status}" in stderr
  assert stderr.count("WARNING") == 1, stderr
  _assert_no_traceback(stderr)


@linux_only
@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_sigint_while_saving_exits_at_once_with_130(first):
  scenario = _Scenario("loop", "--save_seconds=60")
  scenario.wait_for("in loop")
  scenario.send(first)
  scenario.wait_for("saving at step")
  scenario.send(signal.SIGINT)
  returncode, stdout, stderr, seconds = scenario.finish()
  assert returncode == 130, stderr
  assert seconds < EXIT_SECONDS and "saved" not in stdout
  assert "SIGINT while stopping: exiting at once with status 130" in stderr
  _assert_no_traceback(stderr)


@linux_only
def test_a_repeated_sigterm_lets_the_save_finish():
  scenario = _Scenario("loop", "--save_seconds=0.5")
  scenario.wait_for("in loop")
  scenario.send(signal.SIGTERM)
  scenario.wait_for("saving at step")
  scenario.send(signal.SIGTERM)
  returncode, stdout, stderr, _ = scenario.finish()
  assert returncode == 0, stderr
  assert stdout.endswith("saved\n")
  assert "SIGTERM again: still saving the checkpoint" in stderr
  _assert_no_traceback(stderr)


@linux_only
def test_after_leave_loop_a_signal_exits_at_once_again():
  scenario = _Scenario("loop", "--after_loop=block")
  scenario.wait_for("in loop")
  scenario.send(signal.SIGTERM)
  scenario.wait_for("left loop")
  scenario.wait_until_blocked_in_c()  # as the export would be
  scenario.send(signal.SIGINT)
  returncode, _, stderr, seconds = scenario.finish()
  assert returncode == 130 and seconds < EXIT_SECONDS, stderr
  assert "SIGINT: no unsaved training state" in stderr


@linux_only
def test_a_forked_child_signal_does_not_reach_the_parent():
  scenario = _Scenario("fork")
  child = int(scenario.wait_for("child ").split("child ")[1].split()[0])
  time.sleep(0.2)  # the child's after-fork reset has run
  os.kill(child, signal.SIGTERM)
  returncode, stdout, stderr, _ = scenario.finish()
  assert returncode == 0, stderr
  assert "child signal 15" in stdout, "the child kept our do-nothing handler"
  assert "requested None" in stdout, "the child's signal reached the parent's watcher"


# --- in this process ------------------------------------------------------------------------------------------


def test_outside_the_main_thread_it_is_inert():
  seen = {}

  def use():
    with interrupts.StopSignals() as stop:
      stop.enter_loop()
      seen.update(active=stop.active, requested=stop.requested, exit_code=stop.exit_code)
      stop.leave_loop()

  before = signal.getsignal(signal.SIGTERM)
  thread = threading.Thread(target=use)
  thread.start()
  thread.join()
  assert seen == {"active": False, "requested": None, "exit_code": 0}
  assert signal.getsignal(signal.SIGTERM) is before


def test_not_entered_it_is_inert():
  stop = interrupts.StopSignals()
  stop.enter_loop()
  stop.leave_loop()
  assert (stop.active, stop.requested, stop.exit_code) == (False, None, 0)


def test_in_the_main_thread_it_installs_and_restores():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("this runner calls tests outside the main thread")
  before = {signum: signal.getsignal(signum) for signum in interrupts.HANDLED}
  with interrupts.StopSignals() as stop:
    assert stop.active
    assert all(signal.getsignal(signum) is not before[signum] for signum in interrupts.HANDLED)
    with pytest.raises(RuntimeError, match="already active"):
      interrupts.StopSignals().__enter__()
    stop.enter_loop()  # a signal now only requests: safe to send to pytest itself
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + EXIT_SECONDS
    while stop.requested is None and time.monotonic() < deadline:
      time.sleep(0.01)
    assert stop.requested == signal.SIGTERM and stop.exit_code == 0
  assert not stop.active
  assert {signum: signal.getsignal(signum) for signum in interrupts.HANDLED} == before
  assert signal.set_wakeup_fd(-1) == -1  # ours is gone (and pytest had none)
  again = interrupts.StopSignals().install()  # the form without `with`; a new instance after the first is fine
  assert again.active and again.requested is None
  again.uninstall()
  assert not again.active and signal.set_wakeup_fd(-1) == -1
