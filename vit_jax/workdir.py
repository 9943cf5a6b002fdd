"""The workdir contract: every file a training run writes, and how a run resumes from them.

  config.json      the run's config; a resumed run must match it (`check_config`; RESUMABLE_KEYS, RECOVERY_KEYS
                   may differ)
  metrics.jsonl    one JSON object per logged step (`vit_jax.metrics_writer` writes it, `read_metrics` reads it)
  checkpoints/     orbax: the train state as a PyTree, the data position and pending metrics as JSON; a step that
                   fails to restore is moved aside as `N.corrupt` and the run resumes from the newest good one
  model.npz        the final parameters in the zoo's format (`vit_jax.checkpoint.load` reads it): the raw weights or
                   their EMA, as `exported_weights(config)` says
  curves.png       loss, accuracy and learning rate (drawn by `vit_jax.tools.visualize` after training)
  events.out.*     TensorBoard
  lock             held (flock) by the live run: host, pid and start time; a second run stops at once
"""
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vit_jax.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.npz"
CURVES_FILE = "curves.png"
LOCK_FILE = "lock"
# Keys (or whole sections) that only change how a run is observed or laid out, not what it computes: they may
# differ on resume. The data order does not depend on the mesh or the workers, so those may change too.
RESUMABLE_KEYS = ("eval_every", "checkpoint_every", "progress_every", "keep_checkpoints", "num_workers",
                  "read_threads", "prefetch", "batch_eval", "tfds_data_dir", "peak_flops", "mesh", "cpu_devices",
                  "fewshot", "export_ema")
# Keys of the update rule that may change on resume, e.g. to get past a NaN or to unfreeze parameters: scalars of the
# schedule, the clipping or the per-parameter learning-rate factors, never part of the state's shapes or the data
# order. A change is logged.
RECOVERY_KEYS = ("base_lr", "warmup_steps", "grad_norm_clip", "total_steps", "layer_decay", "lr_mults")
# Keys added after runs were already written, with the value (as JSON) that computes what those runs computed: a
# config.json without one resumes when the key has this value now, so upgrading vit_jax never strands a run.
ADDED_KEYS = {"layer_decay": 1.0, "lr_mults": [], "ema_decay": 0.0, "export_ema": True, "pp.randaug": [],
              "pp.cutmix": 0.0, "pp.mix_switch_prob": 0.5, "model.stochastic_depth": 0.0,
              "decay_steps": [], "ssl.corruption_rate": 0.5, "ssl.corruption_split": [0.8, 0.1, 0.1],
              "ssl.target": "colour", "ssl.mask_ratio": 0.75, "ssl.decoder_width": 512, "ssl.decoder_depth": 8,
              "ssl.decoder_heads": 16, "ssl.norm_pix_loss": True, "model.classifier": None,
              "model.num_registers": None, "model.no_embed_class": None, "model.fc_norm": None,
              "model.gelu_approximate": None, "model.layer_norm_eps": None}


def with_added_keys(config):
  """A config.json dict as a ConfigDict, with the keys added since it was written (`ADDED_KEYS`) at the values its
  run computed with."""
  config = ml_collections.ConfigDict(config)
  for dotted, value in ADDED_KEYS.items():
    *parents, key = dotted.split(".")
    node = config
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node = node[parent]
    if key not in node:
      node[key] = value
  return config


def exported_weights(config):
  """Which weights a run's model.npz holds, from its config (config.json): `ema`, the moving average (`ema_decay` > 0
  and `export_ema`), or `raw`; runs older than the EMA hold `raw`."""
  return "ema" if config.get("ema_decay", 0.0) > 0 and config.get("export_ema", True) else "raw"


def path(workdir, name):
  return os.path.join(workdir, name)


def check_writable(workdir):
  """Creates `workdir` and checks that it is writable, before anything slow happens (a few bytes, flushed to disk:
  an empty file can be created on a full disk)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir) as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    if is_disk_full(e):
      raise UserError(f"workdir {workdir} is on a full disk ({e.strerror}); free space there or pass another "
                      "--workdir") from None
    raise UserError(f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir you can write to") from None


def is_disk_full(error):
  """True for a failed write because the disk or the user's quota is full, from Python or from orbax/tensorstore."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  return any(text in str(error) for text in ("No space left on device", "Disk quota exceeded"))


def _gib(num_bytes):
  return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**27 else f"{num_bytes / 2**20:.1f} MiB"


def check_free_space(workdir, needed_bytes):
  """A UserError unless the workdir's disk has `needed_bytes` free (one checkpoint and model.npz, say)."""
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise UserError(f"workdir {workdir} has {_gib(free)} free, but one checkpoint and {MODEL_FILE} need about "
                    f"{_gib(needed_bytes)}; free space there or pass another --workdir")


def disk_full_error(error, workdir, needed_bytes):
  """The UserError of a write to `workdir` that failed on a full disk: the failure, the space needed, what is kept."""
  free = shutil.disk_usage(workdir).free
  return UserError(f"disk full writing to {workdir} ({_gib(free)} free, about {_gib(needed_bytes)} needed): "
                   f"{' '.join(str(error).split())[:200]}; the older checkpoints in {path(workdir, CHECKPOINT_DIR)} "
                   "are kept: free space and rerun the same command to resume")


def _all_processes(ok):
  """True on every process when `ok` holds on every process (one collective; free for a single process)."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(ok)))))


@contextlib.contextmanager
def locked(workdir):
  """Holds the workdir's lock for the run's life: a second run in a live workdir stops at once with a UserError
  naming the holder. An advisory `flock`, which the OS releases when the holder dies, so a stale lock file never
  blocks. Multi-process runs lock on process 0; every process learns the outcome."""
  lock_path = path(workdir, LOCK_FILE)
  lock_file, holder = None, ""
  unlocked = False  # a filesystem without flock (NFS without lockd, Lustre without -o flock): run unlocked
  if jax.process_index() == 0:
    lock_file = open(lock_path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with  (held for the run)
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EAGAIN, errno.EACCES):
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
      else:
        logging.warning("No lock on workdir %s (%s): this filesystem lacks flock; make sure no second run uses it.",
                        workdir, e.strerror)
        unlocked = True
      lock_file.close()
      lock_file = None
    else:
      lock_file.seek(0)
      lock_file.truncate()
      lock_file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
      lock_file.flush()
  if not _all_processes(jax.process_index() != 0 or lock_file is not None or unlocked):
    if jax.process_index() == 0:
      try:
        holder = ", ".join(f"{k} {v}" for k, v in json.loads(holder).items())
      except ValueError:
        pass
      raise UserError(f"workdir {workdir} is in use by another run ({holder}; lock file {lock_path}); wait for it "
                      "to finish or stop it, or pass another --workdir")
    raise UserError(f"workdir {workdir} is in use by another run (process 0 holds no lock on {lock_path}); pass "
                    "another --workdir")
  try:
    yield
  finally:
    if lock_file is not None:
      lock_file.close()  # releases the flock; the file stays, harmless


def _flat(config_dict, prefix=""):
  flat = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def previous_config(workdir):
  """The config.json of the run a resume continues, as a dict, or None when there is none (a fresh start); a
  UserError when it cannot be read."""
  config_path = path(workdir, CONFIG_FILE)
  if not os.path.exists(config_path):
    return None
  try:
    with open(config_path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, OSError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
    raise UserError(f"cannot read {config_path} ({' '.join(str(e).split())[:120]}), so this resume cannot be "
                    f"checked against the run's settings; restore the file, or delete it to resume with the "
                    "config you pass") from None


def check_config(config, workdir):
  """Checks a resumed run's config against the workdir's `config.json`: keys outside RESUMABLE_KEYS and
  RECOVERY_KEYS must be equal (a key of ADDED_KEYS that either lacks counts as its value there); changed
  RECOVERY_KEYS are logged as deliberate. No file is no check."""
  old = previous_config(workdir)
  if old is None:
    return
  old_flat, new_flat = {**ADDED_KEYS, **_flat(old)}, {**ADDED_KEYS, **_flat(json.loads(config.to_json()))}
  changed = sorted(k for k in set(old_flat) | set(new_flat)
                   if k.split(".")[0] not in RESUMABLE_KEYS and old_flat.get(k) != new_flat.get(k))
  describe = lambda keys: ", ".join(f"{k} (was {old_flat.get(k)!r}, now {new_flat.get(k)!r})" for k in keys[:8])
  differ = [k for k in changed if k not in RECOVERY_KEYS]
  if differ:
    raise UserError(f"workdir {workdir} holds a run with a different config: {describe(differ)}; resume it with "
                    f"the same settings (only {', '.join(RECOVERY_KEYS)} may change) or pass a new --workdir")
  if changed:
    logging.warning("Resuming with a changed update rule, as asked: %s.", describe(changed))


def write_config(config, workdir):
  """Writes `config.json` (process 0), atomically."""
  if jax.process_index() == 0:
    config_path = path(workdir, CONFIG_FILE)
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(json.loads(config.to_json()), f, indent=2, sort_keys=True)
    os.replace(config_path + ".tmp", config_path)


def read_config(workdir):
  """The run's config.json as a dict; a UserError when the workdir has none or it cannot be read."""
  config_path = path(workdir, CONFIG_FILE)
  try:
    with open(config_path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f"{workdir} has no {CONFIG_FILE}; pass a training workdir or a .npz file") from None
  except (json.JSONDecodeError, OSError) as e:
    raise UserError(f"cannot read {config_path}: {e}") from None


def read_metrics(workdir):
  """The records of metrics.jsonl in order; lines cut short by a kill, or otherwise unreadable, are skipped."""
  metrics_path = path(workdir, METRICS_FILE)
  if not os.path.exists(metrics_path):
    raise UserError(f"{metrics_path} does not exist; pass the workdir of a training run")
  records = []
  with open(metrics_path, "rb") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # also bytes that are not UTF-8
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        records.append(record)
  return records


def checkpoint_manager(workdir, *, keep, platform):
  """Orbax's manager of the workdir's checkpoints: the training state as a PyTree, the data position as JSON."""
  # Orbax has each of R replicas write 1/R of a replicated array, slicing it R times first; on CPU the replicas
  # share one host and disk, so there the slicing only blocks the loop and one replica writes (docs/benchmarks.md).
  replica_parallel = False if platform == "cpu" else None
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel)))
  manager = ocp.CheckpointManager(
      os.path.abspath(path(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                     "extra": ocp.JsonCheckpointHandler()})
  # Orbax removes unfinished saves in a background thread that `close` does not wait for: a run that stops on an
  # error at once would leave it running into interpreter shutdown, which prints a traceback after our error line.
  getattr(manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
  return manager


def state_restore_args(target):
  """Restore arguments of the training state onto `target`'s shapes, dtypes and shardings (orbax reshards)."""
  return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _stored_fields(state):
  """What a checkpoint holds of a dataclass state (the TrainState): its fields as a dict, None ones left out, so a
  field that is off (no EMA) or newer than the checkpoint is simply absent on disk, as before it existed. Other
  trees are stored as they are."""
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}


def save_checkpoint(manager, step, state, extra):
  """Saves `state` and the JSON-able `extra` (data position, pending metrics) as step `step`, in the background."""
  # A deep copy of the JSON part: the save completes in the background while the loop mutates its inputs.
  extra = json.loads(json.dumps(extra))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(_stored_fields(state)),
                                             extra=ocp.args.JsonSave(extra)))


def restore_checkpoint(manager, step, target):
  """(state, extra) of checkpoint `step`, the state laid out as `target` (shapes, dtypes, shardings)."""
  restored = manager.restore(step, args=ocp.args.Composite(state=state_restore_args(_stored_fields(target)),
                                                            extra=ocp.args.JsonRestore()))
  state = target.replace(**restored.state) if dataclasses.is_dataclass(target) else restored.state
  return state, restored.extra


def _move_aside(step_dir):
  """Renames a damaged step folder to `N.corrupt` (`N.corrupt.1`, ... if taken): kept for inspection, out of
  orbax's way (it lists only numeric names)."""
  target, n = f"{step_dir}.corrupt", 0
  while os.path.exists(target):
    n += 1
    target = f"{step_dir}.corrupt.{n}"
  os.rename(step_dir, target)
  return target


def restore_newest_good(manager, target_at):
  """(step, state, extra) of the newest checkpoint that restores, or None when there is none.

  `target_at(step)` is the state layout of step `step` (the resolution can differ between steps). Steps that
  fail to restore (a truncated array file, a missing manifest, metadata or `extra/`, an empty folder) are named in
  a warning and moved aside as `N.corrupt` once an older one restored. When every one fails, nothing is moved
  (the cause may be this run's settings, not the files) and a UserError lists the failures.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, extra = restore_checkpoint(manager, step, target_at(step))
      ok = isinstance(extra, dict) and {"data", "pending_metrics"} <= set(extra)
      error = None if ok else ValueError(f"extra holds {type(extra).__name__} {str(extra)[:80]}")
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types for damaged files
      ok, error = False, e
      _silence_late_read_callbacks()
    if _all_processes(ok):
      break
    failures.append((step, error or ValueError("another process could not restore it")))
  else:
    if failures:
      reasons = "; ".join(f"step {step}: {_first_line(error)}" for step, error in failures[:3])
      raise UserError(f"no checkpoint in {manager.directory} can be restored ({reasons}); if the files are damaged, "
                      "move that folder aside to start over; if this run's settings differ from the checkpointed "
                      "run's, resume with its settings")
    return None
  for bad_step, error in failures:
    step_dir = os.path.join(os.fspath(manager.directory), str(bad_step))
    moved = _move_aside(step_dir) if jax.process_index() == 0 and os.path.exists(step_dir) else f"{step_dir}.corrupt"
    logging.warning("Checkpoint step %d cannot be restored (%s); moved it to %s, resuming from step %d.",
                    bad_step, _first_line(error), moved, step)
  if failures:
    if jax.process_count() > 1:  # the renames are done before any process lists the steps again
      multihost_utils.sync_global_devices("workdir.restore_newest_good")
    manager.reload()
  return step, state, extra


def _silence_late_read_callbacks():
  """After a failed restore, tensorstore reads still in flight complete into orbax's closed event loop, and Python
  prints each as an 'unraisable' RuntimeError traceback (dozens); those, and only those, are dropped."""
  if getattr(sys.unraisablehook, "vit_jax_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook.vit_jax_filter = True
  sys.unraisablehook = hook


def _first_line(error):
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:160]}"
