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

`python -m vit_jax.tools.check_distributed [flags]` joins, runs a cross-process all-reduce and all-gather, and
prints what each process sees: a smoke test for a new cluster, e.g.
`launch/local.sh 2 --module=vit_jax.tools.check_distributed`.
"""
import os
import socket
import sys
import threading
import time
from typing import Optional, Sequence

import jax
from absl import logging

from vit_jax.errors import UserError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300
# XLA's own deadline: later than ours, so that our message (not its check failure) is what a user sees.
_XLA_TIMEOUT_MARGIN_S = 30


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


def _fail_after(timeout_s, message):
  """A started timer that ends the process with `message` as the `error:` line and exit status 2.

  Why not an exception: a process that waits for peers blocks inside XLA, which aborts the process with a
  check failure when its own deadline passes; nothing Python can catch. The wait releases the GIL, so this
  thread gets to say what went wrong first.
  """
  def fire():
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access
  timer = threading.Timer(timeout_s, fire)
  timer.daemon = True
  timer.start()
  return timer


def _use_gloo_on_cpu():
  # Cross-process collectives between CPU devices need an implementation; gloo ships with jaxlib. Newer JAX
  # already defaults to it; older versions default to none, and a user's explicit choice (e.g. mpi) is kept.
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               local_device_ids: Optional[Sequence[int]] = None) -> bool:
  """Joins the multi-process runtime if this run is multi-process; True if it did, False for a single process.

  Call it first, before any other JAX call (JAX fixes the device list at its first use). Arguments left None
  come from the `JAX_*` environment variables, then from cluster detection (module docstring). Raises
  UserError for inconsistent arguments or an unreachable coordinator; exits with status 2 and an `error:` line
  when not all `num_processes` processes join within `timeout_s` seconds.
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
  expected = f"all {num_processes}" if num_processes else "all"
  watchdog = _fail_after(remaining, (
      f"process {process_id if process_id is not None else '?'}: not {expected} processes joined {where} within "
      f"{timeout_s:g}s; start every process with the same coordinator address and process count and a distinct "
      "process id, and check the other processes' logs for a failure before they joined"))
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        local_device_ids=local_device_ids, cluster_detection_method=method,
        initialization_timeout=int(remaining) + _XLA_TIMEOUT_MARGIN_S)
  finally:
    watchdog.cancel()
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
