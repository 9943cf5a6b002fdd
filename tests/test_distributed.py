"""vit_jax.distributed: real multi-process runs on 127.0.0.1 (2 processes x 4 CPU devices, gloo collectives)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import portpicker
import pytest

from tests import xla_flags
from vit_jax import distributed
from vit_jax.errors import UserError

pytestmark = pytest.mark.slow  # trains or starts subprocesses throughout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env(devices=4, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.cpu_devices(devices), **extra)
  return env


def reported(stdout):
  """The JSON line `python -m vit_jax.tools.check_distributed` prints (gloo writes its own lines to stdout too)."""
  found = re.findall(r'\{"process_index".*?"process_ids": \[[0-9, ]*\]\}', stdout)
  assert found, stdout
  return json.loads(found[-1])


def start(args, env):
  return subprocess.Popen([sys.executable, "-m", "vit_jax.tools.check_distributed", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_see_eight_devices_and_reduce_across_them():
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  procs = [start([f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
                  "--distributed_timeout_s=60"], process_env()) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  seen = [reported(out) for out, _ in outputs]
  for index, s in enumerate(seen):
    assert s["process_index"] == index and s["process_count"] == 2
    assert s["local_devices"] == 4 and s["global_devices"] == 8
    assert s["psum"] == sum(range(8))  # each device adds its global id
    assert s["allgather"] == list(range(8))
    assert s["process_ids"] == [0, 1]


def test_unreachable_coordinator_is_a_user_error_not_a_hang():
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"  # nobody listens there
  with pytest.raises(UserError, match=f"coordinator {address} is unreachable after 1s"):
    distributed.initialize(address, num_processes=2, process_id=1, timeout_s=1)


def test_missing_processes_end_with_one_error_line():
  """Process 0 of 2 alone: XLA would abort with a C++ check failure; we exit 2 with one `error:` line."""
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  p = start([f"--coordinator_address={address}", "--num_processes=2", "--process_id=0", "--distributed_timeout_s=2"],
            process_env())
  _, err = p.communicate(timeout=60)
  assert p.returncode == 2
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "not all 2 processes joined coordinator" in errors[0], err[-2000:]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "without --coordinator_address"),
    (dict(coordinator_address="10.0.0.1:1234"), "without --num_processes, --process_id"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "not host:port"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), "outside 0..1"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=0, process_id=0), "at least 1"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes="two", process_id=0), "not an integer"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0, heartbeat_s=0), "heartbeat 0s"),
])
def test_inconsistent_arguments_are_user_errors(kwargs, message, monkeypatch):
  for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(UserError, match=message):
    distributed.initialize(**kwargs)


def test_single_process_runs_stay_unchanged(monkeypatch):
  for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  assert not distributed.initialize()  # no flags, no cluster: nothing started
  assert not distributed.initialize("127.0.0.1:1234", num_processes=1, process_id=0)


class _FakeState:
  """What `_PeerWatch` reads of JAX's distributed state: process 0 of 3."""
  client = object()
  process_id, num_processes, coordinator_address = 0, 3, "10.0.0.1:1234"


def test_peer_watch_names_the_silent_peers_by_this_process_clock():
  watch = distributed._PeerWatch(_FakeState(), heartbeat_s=10)  # pylint: disable=protected-access
  start = time.monotonic()
  beats = lambda one, two: [("vit_jax/heartbeat/0", "9 a"), ("vit_jax/heartbeat/1", one), ("vit_jax/heartbeat/2", two)]
  watch.observe(beats("1 host-b", "1 host-c"), start)
  watch.observe(beats("2 host-b", "1 host-c"), start + 8)  # process 2's beat stays the same
  assert watch.silent_peers(10, start + 9) == []
  assert watch.silent_peers(10, start + 11) == [2]
  assert watch.silent_peers(10, start + 19) == [1, 2]
  assert watch._name([1, 2]) == "processes 1 (on host-b), 2 (on host-c)"  # pylint: disable=protected-access


@pytest.mark.parametrize("heartbeat_s", [1, 5, 60, 600])
def test_jax_heartbeat_is_the_backstop(heartbeat_s):
  """JAX finds a dead peer at half its deadline at the earliest; by then the watch (a heartbeat and two polls)
  has spoken."""
  interval = distributed._poll_interval(heartbeat_s)  # pylint: disable=protected-access
  assert distributed._jax_heartbeat_s(heartbeat_s) / 2 > heartbeat_s + 2 * interval  # pylint: disable=protected-access


def test_cluster_detection():
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[01-02]", SLURM_NTASKS="16", SLURM_PROCID="3",
               SLURM_LOCALID="3")
  assert distributed.detect_cluster(slurm) == "slurm"
  assert distributed.detect_cluster(slurm | dict(SLURM_NTASKS="1")) is None  # one task: single process
  assert distributed.detect_cluster(dict(SLURM_JOB_ID="7")) is None  # sbatch script itself, outside srun
  assert distributed.detect_cluster(dict(OMPI_MCA_orte_hnp_uri="x", OMPI_COMM_WORLD_SIZE="4")) == "ompi"
  assert distributed.detect_cluster({}) is None


# --- multi-process training through launch/local.sh ---------------------------------------------------------------

TRAIN_FLAGS = ["--config=configs/quickstart.py", "--config.model.transformer.num_layers=1", "--config.batch=16",
               "--config.batch_eval=120", "--config.pp.augment=none", "--config.progress_every=1",
               "--config.eval_every=2", "--config.checkpoint_every=2"]


def launch_local(num_processes, devices, workdir, tmp_path, *flags):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(PYTHON=sys.executable, XLA_FLAGS=xla_flags.FAST_COMPILE)  # local.sh adds the device count
  return subprocess.run(
      ["bash", "launch/local.sh", str(num_processes), f"--devices_per_process={devices}",
       f"--log_dir={tmp_path / f'logs_{num_processes}'}", "--", *TRAIN_FLAGS, f"--workdir={workdir}", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def run_local(num_processes, devices, workdir, tmp_path, *flags):
  result = launch_local(num_processes, devices, workdir, tmp_path, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """2 processes x 4 devices, 3 steps: checkpoints and evals at steps 2 and 3, model.npz at the end."""
  tmp_path = tmp_path_factory.mktemp("two")
  workdir = str(tmp_path / "workdir")
  return workdir, run_local(2, 4, workdir, tmp_path, "--config.total_steps=3"), tmp_path


def test_two_process_run_writes_once(two_process_run):
  workdir, metrics, _ = two_process_run
  assert [m["step"] for m in metrics] == [1, 2, 3]  # process 0 alone writes metrics
  assert os.path.exists(os.path.join(workdir, "model.npz"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]


def test_eval_over_two_processes_equals_one_process(two_process_run):
  """The same parameters evaluated by 1 process x 8 devices: the same exact loss and accuracy."""
  workdir, metrics, _ = two_process_run
  result = subprocess.run([sys.executable, "-m", "vit_jax.tools.evaluate", f"--checkpoint={workdir}",
                           "--batch_size=120"], cwd=ROOT, env=process_env(devices=8), capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  single = json.loads(result.stdout[result.stdout.index("{"):])
  assert single["accuracy"] == pytest.approx(metrics[-1]["test_accuracy"], abs=1e-6)
  assert single["loss"] == pytest.approx(metrics[-1]["test_loss"], rel=1e-4)


def resume_at_step_2(workdir, num_processes, devices, tmp_path):
  """Metrics of `workdir`'s run resumed from its step-2 checkpoint by `num_processes` x `devices`."""
  resumed = str(tmp_path / f"resumed_on_{num_processes}")
  shutil.copytree(workdir, resumed)
  os.remove(os.path.join(resumed, "model.npz"))
  shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
  metrics = run_local(num_processes, devices, resumed, tmp_path, "--config.total_steps=3")
  assert os.path.exists(os.path.join(resumed, "model.npz"))
  return metrics


def test_two_processes_match_one_and_checkpoints_move_between_them(two_process_run, tmp_path):
  """2 x 4 devices and 1 x 8 devices train the same losses; a checkpoint of either resumes on the other."""
  workdir_two, two, _ = two_process_run
  workdir_one = str(tmp_path / "one")
  one = run_local(1, 8, workdir_one, tmp_path, "--config.total_steps=3")
  for a, b in zip(one, two):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
  for workdir, uninterrupted, processes, devices in ((workdir_two, two, 1, 8), (workdir_one, one, 2, 4)):
    resumed = resume_at_step_2(workdir, processes, devices, tmp_path)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == uninterrupted[:2]  # the history up to the checkpoint is kept
    assert resumed[2]["train_loss"] == pytest.approx(uninterrupted[2]["train_loss"], rel=1e-5)
    assert resumed[2]["test_accuracy"] == pytest.approx(uninterrupted[2]["test_accuracy"], abs=1e-6)


def test_mesh_that_does_not_match_the_processes_is_a_user_error(tmp_path):
  result = launch_local(2, 4, str(tmp_path / "workdir"), tmp_path, "--config.mesh.data=3", "--config.total_steps=1")
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "mesh sizes (mesh.data=3, mesh.fsdp=1, mesh.tensor=1) multiply to 3 but there are 8 devices" in \
      errors[0], result.stderr[-2000:]


# --- a process that dies mid-run ----------------------------------------------------------------------------------

# Joins through vit_jax.distributed with a 5 s heartbeat, then all-gathers until the test kills a process.
_GATHER_FOREVER = """
import time
import numpy as np
from vit_jax import distributed
distributed.initialize(heartbeat_s=5, timeout_s=60)
from jax.experimental import multihost_utils
print("joined", flush=True)
while True:
  multihost_utils.process_allgather(np.zeros(1))
  time.sleep(0.01)
"""


def errors_of(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


def kill_and_time_the_survivor(procs, victim, logs, timeout=60):
  """SIGKILLs `procs[victim]`; (seconds until the other ended, its exit status, its stderr)."""
  procs[victim].send_signal(signal.SIGKILL)
  start = time.monotonic()
  survivor = 1 - victim
  try:
    code = procs[survivor].wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  with open(logs[survivor], encoding="utf-8", errors="replace") as f:
    return time.monotonic() - start, code, f.read()


def kill_with_children(proc):
  """SIGKILLs a still running `proc` and (Linux) its children: local.sh's processes outlive a killed local.sh."""
  if proc.poll() is not None:
    return
  try:
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children", encoding="utf-8") as f:
      children = [int(pid) for pid in f.read().split()]
  except OSError:
    children = []
  for pid in children:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.kill()
  proc.wait()


def wait_until(predicate, procs, timeout):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not get that far"
    time.sleep(0.2)


def start_two_processes(tmp_path, script, *args):
  """Starts `script` (Python source) as processes 0 and 1 of a joined run: (coordinator address, procs, logs)."""
  (tmp_path / "two_process_script.py").write_text(script)
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = []
  for i in range(2):
    env = process_env(devices=1, PYTHONPATH=str(tmp_path), JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(i))
    with open(logs[i], "w", encoding="utf-8") as log:
      procs.append(subprocess.Popen([sys.executable, "-m", "two_process_script", *args], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT))
  return address, procs, logs


@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator", "process_1"])
def test_a_killed_process_stops_the_other_with_one_error_line(victim, tmp_path):
  """Process 1 killed: the survivor's watch misses its beats. Process 0 (the coordinator) killed: JAX aborts the
  survivor at once, and the abort hook says why instead of the C++ check failure."""
  address, procs, logs = start_two_processes(tmp_path, _GATHER_FOREVER)
  wait_until(lambda: all("joined" in log.read_text(errors="replace") for log in logs), procs, timeout=120)
  seconds, code, output = kill_and_time_the_survivor(procs, victim, logs)
  lost = "lost process 0, the coordinator at " + address if victim == 0 else "lost process 1 (on "
  assert code == 2 and len(errors_of(output)) == 1 and lost in errors_of(output)[0], output[-3000:]
  assert seconds < (15 if victim == 1 else 10)  # 5 s heartbeat (and two polls); a lost coordinator at once


def test_killing_a_process_mid_training_stops_the_survivor_within_its_heartbeat(tmp_path):
  """kill -9 of process 1 while both train: process 0 ends within seconds, exit status 2, one line naming it."""
  workdir = tmp_path / "workdir"
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  flags = [*TRAIN_FLAGS, "--config.total_steps=100000", "--config.eval_every=1000", "--config.checkpoint_every=1000",
           f"--workdir={workdir}", f"--coordinator_address={address}", "--num_processes=2",
           "--distributed_heartbeat_s=5"]
  procs = []
  for i in range(2):
    with open(logs[i], "w", encoding="utf-8") as log:
      procs.append(subprocess.Popen([sys.executable, "-m", "vit_jax.main", *flags, f"--process_id={i}"], cwd=ROOT,
                                    env=process_env(), stdout=log, stderr=subprocess.STDOUT))
  metrics = workdir / "metrics.jsonl"
  wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, procs, timeout=300)
  seconds, code, output = kill_and_time_the_survivor(procs, 1, logs)
  errors = errors_of(output)
  assert code == 2 and len(errors) == 1, output[-3000:]
  assert errors[0].startswith("error: process 0: lost process 1 (on ") and "no heartbeat for 5s" in errors[0]
  assert seconds < 30  # the heartbeat and two polls, with room for a busy machine


def test_sigterm_to_local_sh_checkpoints_every_process_and_exits_0(tmp_path):
  """local.sh forwards SIGTERM; each process (whose SIGTERM JAX's preemption service must not take) saves the same
  step and exits 0; local.sh waits for them and exits 0."""
  workdir = tmp_path / "workdir"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(PYTHON=sys.executable, XLA_FLAGS=xla_flags.FAST_COMPILE)
  launcher = subprocess.Popen(
      ["bash", "launch/local.sh", "2", f"--log_dir={tmp_path / 'logs'}", "--", *TRAIN_FLAGS, f"--workdir={workdir}",
       "--config.total_steps=100000", "--config.eval_every=1000", "--config.checkpoint_every=1000"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  try:
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, [launcher], timeout=300)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
  finally:
    kill_with_children(launcher)
  assert launcher.returncode == 0, stderr[-3000:]
  steps = os.listdir(workdir / "checkpoints")
  assert len(steps) == 1 and not errors_of(stderr)
  for log in (stderr, (tmp_path / "logs" / "process_1.log").read_text()):
    assert f"Stopped at step {steps[0]} after a signal" in log


# Process 1 stops on its own (a user error, or a signal before the loop); process 0 all-gathers with it.
_STOP_ONE = """
import signal, sys, time
import numpy as np
from vit_jax import distributed, errors, interrupts
from vit_jax.errors import UserError
stop = interrupts.StopSignals().install()
distributed.initialize(heartbeat_s=30, timeout_s=60)
from jax.experimental import multihost_utils
import jax
print("joined", flush=True)
def fail():
  raise UserError("the dataset is gone")
if jax.process_index() == 1 and sys.argv[1] == "error":
  errors.run_cli(fail)
while True:
  multihost_utils.process_allgather(np.zeros(1))
  time.sleep(0.01)
"""


@pytest.mark.parametrize("how, status", [("error", 2), ("sigterm", 0)])
def test_a_process_that_stops_early_stops_its_peers_at_once_the_same_way(how, status, tmp_path):
  _, procs, logs = start_two_processes(tmp_path, _STOP_ONE, how)
  try:
    wait_until(lambda: all("joined" in log.read_text(errors="replace") for log in logs), procs, timeout=120)
    start = time.monotonic()
    if how == "sigterm":
      procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=60) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = [log.read_text(errors="replace") for log in logs]
  assert codes == [status, status], outputs
  assert time.monotonic() - start < 20  # far below the 30 s heartbeat: told, not timed out
  if how == "error":
    assert errors_of(outputs[1]) == ["error: the dataset is gone"], outputs[1][-2000:]
    assert len(errors_of(outputs[0])) == 1 and "process 1 stopped with an error (the dataset is gone)" in \
        errors_of(outputs[0])[0], outputs[0][-2000:]
  else:
    assert not errors_of(outputs[0]) and "Process 1 stopped (SIGTERM" in outputs[0], outputs[0][-2000:]
