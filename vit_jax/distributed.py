"""Multi-process runs: join JAX's multi-controller runtime (`jax.distributed`) before anything else touches JAX.

One process per host (TPU) or per GPU; after `initialize`, `jax.devices()` lists the devices of every process and
one global mesh spans them all. Where the process layout comes from, first match wins:

1. explicit arguments (the CLI flags `--coordinator_address`, `--num_processes`, `--process_id`);
2. the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (what
   `launch/local.sh` and `launch/gke_jobset.yaml` set);
3. a cluster JAX can bootstrap from by itself: SLURM (`srun` with more than one task), Open MPI, Cloud TPU VMs and
   GKE TPU slices;
4. none of these: a single-process run, left unchanged.

A run whose processes never all meet would otherwise hang or die in XLA with a C++ check failure; here it ends
after `timeout_s` with exit status 2 and one `error:` line naming the coordinator and what to check.

A process that dies mid-run (killed, crashed, its host lost) would leave the others blocked in a collective until
JAX's coordination service aborts them with a C++ check failure. Here each process beats through the service's
key-value store and watches the others' beats (`_PeerWatch`): once a peer is silent for `heartbeat_s` seconds,
every survivor ends with exit status 2 and one `error:` line naming it. JAX's own heartbeat deadline is set later,
as a backstop. When JAX aborts first anyway (the coordinator, process 0, died: the others learn that at once), a
SIGABRT hook prints the same kind of line, naming process 0, after JAX's log line. JAX's preemption service is
turned off: it would take SIGTERM from Python's handler, with which the trainer checkpoints and stops
(`jax.experimental.multihost_utils.reached_preemption_sync_point` is therefore unavailable).

`python -m vit_jax.tools.check_distributed [flags]` joins, runs a cross-process all-reduce and all-gather, and
prints what each process sees: a smoke test for a new cluster, e.g.
`launch/local.sh 2 --module=vit_jax.tools.check_distributed`.
"""
import atexit
import ctypes
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional, Sequence

import jax
from absl import logging

from vit_jax import errors
from vit_jax.errors import UserError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300
# A lost peer stops the others within about a minute, yet a live process would need a minute without one beat
# (from a thread that needs the GIL for microseconds per poll) to be taken for dead.
DEFAULT_HEARTBEAT_S = 60
# XLA's own deadline: later than ours, so that our message (not its check failure) is what a user sees.
_XLA_TIMEOUT_MARGIN_S = 30
_BEAT_PREFIX = "vit_jax/heartbeat/"  # key-value store directory of the beats, one key per process
_EXIT_PREFIX = "vit_jax/exit/"  # where a process that ends early says why: "STATUS REASON", one key per process
_DIED = "it was killed, crashed or lost its host (its log may say which)"
_STOPPING = "stopping; rerun the same command to resume from the last checkpoint"


def _int_or_none(value, name):
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f"{name}={value!r} is not an integer") from None


def parse_address(address: str):
  """(host, port) of `host:port` (`[v6]:port` too); UserError otherwise."""
  host, sep, port = address.rpartition(":")
  host = host.strip("[]")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"coordinator address {address!r} is not host:port; pass e.g. "
                    "--coordinator_address=10.0.0.1:1234 (the host of process 0 and a free port)")
  return host, int(port)


def detect_cluster(environ=None) -> Optional[str]:
  """JAX's `cluster_detection_method` for this environment, or None when nothing says the run is multi-process.

  Deliberately narrower than JAX's own detection: a one-task SLURM allocation or MPI run stays single-process
  (JAX would otherwise pin it to one GPU of the node).
  """
  environ = os.environ if environ is None else environ
  slurm_step = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(var in environ for var in slurm_step) and int(environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  if _on_cloud_tpu_vm():
    # GKE's TPU webhook lists the slice's hosts; a TPU VM (alone or in a pod slice) answers from its metadata.
    return "gketpu" if environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") else "gcetpu"
  return None


def _on_cloud_tpu_vm() -> bool:
  try:  # set by `import jax` when libtpu and TPU chips are present; private, hence the guard
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def _wait_until_reachable(host, port, deadline):
  """True once a TCP connection to host:port succeeds before `deadline` (time.monotonic())."""
  while True:
    try:
      with socket.create_connection((host, port), timeout=1.0):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.2)


def _check_port_free(port):
  """Process 0 serves the coordinator on every interface at `port` (JAX's default bind address)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise UserError(f"coordinator port {port} is in use on process 0's host ({e.strerror}); pick another "
                      "port in --coordinator_address") from None


def _exit_with_error(message, linger_s=0.0, mid_run=False, status=2):
  """Ends the process from any thread: what stdout and stderr hold, then the `error:` line (none when `message` is
  None), then exit `status`.

  `mid_run`: a progress bar may have left the cursor mid-line, so the line starts on a new one.
  """
  def flush():
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (AttributeError, OSError, ValueError):
        pass
  # In a thread of its own: a main thread blocked writing to a full pipe holds the stream's lock.
  flusher = threading.Thread(target=flush, daemon=True)
  flusher.start()
  flusher.join(1.0)
  if message is not None:
    os.write(2, f"{chr(10) if mid_run else ''}error: {message}\n".encode(errors="replace"))
  time.sleep(linger_s)
  os._exit(status)  # pylint: disable=protected-access


def _fail_after(timeout_s, message):
  """A started timer that ends the process with `message` as the `error:` line and exit status 2.

  Why not an exception: a process that waits for peers blocks inside XLA, which aborts the process with a
  check failure when its own deadline passes; nothing Python can catch. The wait releases the GIL, so this
  thread gets to say what went wrong first.
  """
  timer = threading.Timer(timeout_s, _exit_with_error, (message,))
  timer.daemon = True
  timer.start()
  return timer


def _poll_interval(heartbeat_s):
  # Ten polls per heartbeat bound the detection delay to 1.2 heartbeats; 5 s at most keeps a long heartbeat prompt.
  return min(max(heartbeat_s / 10, 0.1), 5.0)


def _jax_heartbeat_s(heartbeat_s):
  """JAX's heartbeat deadline for ours: JAX finds a dead peer between half and all of its deadline after the death,
  ours within `heartbeat_s` and two polls, so twice that (and a margin) lets ours speak first."""
  return int(math.ceil(2 * (heartbeat_s + 2 * _poll_interval(heartbeat_s)))) + _XLA_TIMEOUT_MARGIN_S


class _PeerWatch:
  """Beats for this process and watches the others' beats through the coordination service's key-value store.

  Each poll writes this process's counter (and host name) and reads everyone's. A peer whose beat has not changed
  for `heartbeat_s` seconds of this process's clock (no clock skew between hosts) ends this process with one
  `error:` line naming it, as does a coordinator this process cannot reach for as long. A daemon thread: the main
  thread blocked in a collective releases the GIL. It keeps watching while the process exits (JAX's shutdown
  barrier waits for every peer too) and stops quietly once the exit has begun and the service is gone.
  """

  def __init__(self, state, heartbeat_s):
    self._state = state  # JAX's distributed state, whose client jax.distributed.shutdown() clears
    self._client = state.client
    self.process_id, self.num_processes = state.process_id, state.num_processes
    self.coordinator_address = state.coordinator_address
    self.heartbeat_s = heartbeat_s
    self.interval = _poll_interval(heartbeat_s)
    now = time.monotonic()
    self._changed = {p: now for p in range(self.num_processes) if p != self.process_id}  # peer -> last beat change
    self._beats = {}  # peer -> its last beat, "counter host"
    self._reached = now  # when a poll last reached the coordinator
    self._exiting = False

  def start(self):
    # Registered after JAX's own exit handler (at `import jax`), so it runs first: JAX's shutdown may fail our polls.
    atexit.register(self._at_exit)
    threading.Thread(target=self._run, name="vit_jax-peer-watch", daemon=True).start()

  def _at_exit(self):
    self._exiting = True

  def _run(self):
    key, host, beat = f"{_BEAT_PREFIX}{self.process_id}", socket.gethostname(), 0
    while True:
      beat += 1
      try:
        self._client.key_value_set(key, f"{beat} {host}", allow_overwrite=True)
        beats = self._client.key_value_dir_get(_BEAT_PREFIX)
        exits = self._client.key_value_dir_get(_EXIT_PREFIX)
      except Exception:  # pylint: disable=broad-except  # jaxlib's own runtime error for a failed call
        if self._exiting or self._state.client is not self._client:  # exiting, or jax.distributed.shutdown()
          return
        if time.monotonic() - self._reached > self.heartbeat_s:
          self._fail(self._lost_coordinator(f"unreachable for {self.heartbeat_s:g}s"))
      else:
        now = self._reached = time.monotonic()
        self.follow_exits(exits)
        self.observe(beats, now)
        lost = self.silent_peers(self.heartbeat_s, now)
        if lost:
          self._fail(f"process {self.process_id}: lost {self._name(lost)}: no heartbeat for {self.heartbeat_s:g}s; "
                     f"{_DIED}; {_STOPPING}")
      time.sleep(self.interval)

  def announce_exit(self, status, reason):
    """Tells the peers that this process ends with `status` (an error, or a signal before the loop), then ends it
    at once: JAX's shutdown would wait for peers that are about to stop. Process 0 serves the key-value store, so
    it stays one poll longer for the others to read it."""
    self._exiting = True
    self._client.key_value_set(f"{_EXIT_PREFIX}{self.process_id}", f"{status} {reason}", allow_overwrite=True)
    if self.process_id == 0:
      time.sleep(self.interval + 0.5)
    _exit_with_error(None, status=status)

  def follow_exits(self, exits):
    """Ends this process the way a peer that announced its exit ended (`exits`: the (key, value) pairs of the exit
    directory): exit 2 naming the peer's error, or the peer's signal status (a stop before the loop)."""
    if errors.exiting():  # this process is ending on its own error or signal: its own line is the one to show
      return
    for key, value in exits:
      peer = key.rsplit("/", 1)[-1]
      if peer == str(self.process_id):
        continue
      status, _, reason = value.partition(" ")
      if status == "2":
        self._fail(f"process {self.process_id}: process {peer} stopped with an error ({reason}); {_STOPPING}")
      logging.warning("Process %s stopped (%s); stopping with status %s.", peer, reason, status)
      _exit_with_error(None, status=int(status))

  def observe(self, beats, now):
    """Takes in the (key, value) pairs of one read of the beat directory, read at `now` (time.monotonic())."""
    for key, value in beats:
      try:
        peer = int(key.rsplit("/", 1)[-1])
      except ValueError:
        continue
      if peer in self._changed and self._beats.get(peer) != value:
        self._beats[peer], self._changed[peer] = value, now

  def silent_peers(self, seconds, now=None):
    """The peers whose beat has not changed for more than `seconds`, in order."""
    now = time.monotonic() if now is None else now
    return sorted(peer for peer, changed in self._changed.items() if now - changed > seconds)

  def _name(self, peers):
    def one(peer):
      beat = self._beats.get(peer, "").split(" ", 1)
      return f"{peer} (on {beat[1]})" if len(beat) == 2 else str(peer)
    return f"process{'es' if len(peers) > 1 else ''} {', '.join(one(p) for p in peers)}"

  def _lost_coordinator(self, how):
    return (f"process {self.process_id}: lost process 0, the coordinator at {self.coordinator_address}: {how}; "
            f"{_DIED}, or the network failed; {_STOPPING}")

  def _fail(self, message):
    # Process 0 serves the coordination service: with more than one survivor it waits two polls before taking the
    # service down, so that the others find the lost peer themselves instead of blaming process 0.
    linger = 2 * self.interval + 0.5 if self.process_id == 0 and self.num_processes > 2 else 0.0
    _exit_with_error(message, linger, mid_run=True)

  def explain_abort(self):
    """The `error:` message for an abort by JAX's runtime, or None when nothing says a peer was lost."""
    if self.process_id != 0 and self.coordinator_address:
      try:
        host, port = parse_address(self.coordinator_address)
      except UserError:
        host = None
      if host and not _wait_until_reachable(host, port, time.monotonic() + 1.0):
        return self._lost_coordinator("it stopped answering")
    lost = self.silent_peers(max(3 * self.interval, self.heartbeat_s / 2))  # not a live peer between two polls
    if lost:
      return f"process {self.process_id}: lost {self._name(lost)}: no heartbeat; {_DIED}; {_STOPPING}"
    return None


_abort_handler = None  # the installed C callback: a module global, so that it is never garbage collected


def _explain_aborts(watch):
  """Turns an abort by JAX's distributed runtime into `watch`'s `error:` line and exit status 2.

  JAX ends a process with a C++ check failure (SIGABRT) when its coordination service reports a failed peer, and
  at once when the coordinator vanishes, before the watcher's next poll. Its Python hook for this
  (`missed_heartbeat_callback`) cannot be used: jaxlib cannot hand the status to Python and terminates. So a
  C-level SIGABRT handler asks `watch` whether a peer was lost: if so it prints the line and exits 2; if not it
  hands the abort on (to faulthandler's dump, then the default action), so that other check failures still crash.
  """
  global _abort_handler
  try:
    libc = ctypes.CDLL(None)
    signal_fn = libc.signal
  except (OSError, AttributeError):  # no C library to ask: JAX's own abort stays
    return
  handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
  signal_fn.restype = ctypes.c_void_p
  signal_fn.argtypes = (ctypes.c_int, ctypes.c_void_p)
  previous = None

  def on_abort(signum):
    message = watch.explain_abort()
    if message is not None:
      _exit_with_error(message, mid_run=True)
    signal_fn(signum, previous)  # a repeated abort goes straight to the previous handler
    if previous not in (None, 0, 1):  # a handler, not SIG_DFL or SIG_IGN
      handler_type(previous)(signum)
    # Returning lets abort() raise SIGABRT again, now with the default action.

  _abort_handler = handler_type(on_abort)
  previous = signal_fn(signal.SIGABRT, ctypes.cast(_abort_handler, ctypes.c_void_p))


def _watch_peers(heartbeat_s):
  """Starts the peer watch and the abort hook of a joined process; None when this JAX has no client to use."""
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    state = jax_distributed.global_state
    usable = all(hasattr(state, name) for name in ("process_id", "num_processes", "coordinator_address")) and \
        hasattr(state.client, "key_value_dir_get")
  except (ImportError, AttributeError):
    usable = False
  if not usable:
    logging.warning("This JAX offers no coordination client to watch the other processes with: a lost process "
                    "ends this one only through JAX's own heartbeat, with a C++ check failure.")
    return None
  watch = _PeerWatch(state, heartbeat_s)
  watch.start()
  _explain_aborts(watch)
  errors.before_exit(watch.announce_exit)
  return watch


def _use_gloo_on_cpu():
  # Cross-process collectives between CPU devices need an implementation; gloo ships with jaxlib. Newer JAX
  # already defaults to it; older versions default to none, and a user's explicit choice (e.g. mpi) is kept.
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass


def _keep_sigterm_for_python():
  # JAX's preemption service swaps Python's SIGTERM handler (the trainer's checkpoint-and-stop) for a C++ one that
  # only notifies peers; the loop agrees on its stop step by itself (one all-gather per step), so it is not needed.
  try:
    jax.config.update("jax_enable_preemption_service", False)
  except AttributeError:  # a JAX without the option
    pass


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               local_device_ids: Optional[Sequence[int]] = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> bool:
  """Joins the multi-process runtime if this run is multi-process; True if it did, False for a single process.

  Call it first, before any other JAX call (JAX fixes the device list at its first use). Arguments left None
  come from the `JAX_*` environment variables, then from cluster detection (module docstring). Raises
  UserError for inconsistent arguments or an unreachable coordinator; exits with status 2 and an `error:` line
  when not all `num_processes` processes join within `timeout_s` seconds, and later, once joined, when another
  process has been silent for `heartbeat_s` seconds (module docstring).
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = _int_or_none(num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES),
                               "num_processes")
  process_id = _int_or_none(process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID), "process_id")
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if timeout_s <= 0:
    raise UserError(f"distributed timeout {timeout_s:g}s must be positive")
  if heartbeat_s <= 0:
    raise UserError(f"distributed heartbeat {heartbeat_s:g}s must be positive")

  if given:
    missing = [name for name in explicit if name not in given]
    if missing:
      raise UserError(f"{', '.join('--' + n for n in given)} given without {', '.join('--' + n for n in missing)}; "
                      "a multi-process run needs all three (or none, on SLURM, Cloud TPU and GKE)")
    if num_processes < 1:
      raise UserError(f"num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
      raise UserError(f"process_id={process_id} is outside 0..{num_processes - 1} for num_processes={num_processes}; "
                      "give each process a distinct id from 0 to num_processes - 1")
    host, port = parse_address(coordinator_address)
    if num_processes == 1:
      logging.info("num_processes=1: single-process run, the distributed runtime is not started.")
      return False
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
      _check_port_free(port)
    elif not _wait_until_reachable(host, port, deadline):
      raise UserError(f"process {process_id}: coordinator {coordinator_address} is unreachable after {timeout_s:g}s; "
                      "start process 0 with the same --coordinator_address, check the host name and that the port "
                      "is open between the hosts")
    method = "deactivate"  # explicit means explicit: no cluster detection, every local device visible
    remaining = max(deadline - time.monotonic(), 1.0)
    where = f"coordinator {coordinator_address}"
  else:
    method = detect_cluster()
    if method is None:
      return False
    remaining = timeout_s
    where = f"the {method} cluster's coordinator"

  _use_gloo_on_cpu()
  _keep_sigterm_for_python()
  expected = f"all {num_processes}" if num_processes else "all"
  watchdog = _fail_after(remaining, (
      f"process {process_id if process_id is not None else '?'}: not {expected} processes joined {where} within "
      f"{timeout_s:g}s; start every process with the same coordinator address and process count and a distinct "
      "process id, and check the other processes' logs for a failure before they joined"))
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        local_device_ids=local_device_ids, cluster_detection_method=method,
        initialization_timeout=int(remaining) + _XLA_TIMEOUT_MARGIN_S,
        heartbeat_timeout_seconds=_jax_heartbeat_s(heartbeat_s))
  finally:
    watchdog.cancel()
  _watch_peers(heartbeat_s)
  logging.info("Process %d of %d joined (%s): %d local of %d global devices.", jax.process_index(),
               jax.process_count(), coordinator_address or method, jax.local_device_count(), jax.device_count())
  return True


def check_cross_process_collectives():
  """All-reduce and all-gather over every device of every process; returns what this process saw.

  Each device contributes its global id: the sum must be n*(n-1)/2 and the gather the ids in order.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  mesh = Mesh(np.asarray(devices), ("d",))
  sharding = NamedSharding(mesh, P("d"))
  ids = jax.make_array_from_callback((len(devices),), sharding,
                                     lambda index: np.arange(len(devices), dtype=np.int32)[index])
  total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(ids)
  gathered = multihost_utils.process_allgather(ids, tiled=True)
  processes = multihost_utils.process_allgather(np.asarray([jax.process_index()], np.int32))
  return {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": len(devices),
          "psum": int(total), "allgather": [int(x) for x in np.asarray(gathered)],
          "process_ids": [int(x) for x in np.asarray(processes).ravel()]}


def define_flags():
  """The flags of an explicit multi-process launch; `vit_jax.main` passes their values to `initialize`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes - 1.")
  flags.DEFINE_float("distributed_timeout_s", DEFAULT_TIMEOUT_S, "Seconds to wait for every process to join.")
  flags.DEFINE_float("distributed_heartbeat_s", DEFAULT_HEARTBEAT_S,
                     "Seconds without a heartbeat after which a process counts as lost: the others then stop with "
                     "an error naming it.")
