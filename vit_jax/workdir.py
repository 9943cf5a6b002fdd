"""The workdir contract: every file a training run writes, and how a run resumes from them.

  config.json      the run's config; a resumed run must match it (`write_config`, keys in RESUMABLE_KEYS aside)
  metrics.jsonl    one JSON object per logged step (`vit_jax.metrics_writer` writes it, `read_metrics` reads it)
  checkpoints/     orbax: the train state as a PyTree, the data position and pending metrics as JSON
  model.npz        the final parameters in the zoo's format (`vit_jax.checkpoint.load` reads it)
  curves.png       loss, accuracy and learning rate (drawn by `vit_jax.tools.visualize` after training)
  events.out.*     TensorBoard
"""
import json
import os
import tempfile

import jax
import orbax.checkpoint as ocp

from vit_jax.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.npz"
CURVES_FILE = "curves.png"
# Keys (or whole sections) that only change how a run is observed or laid out, not what it computes: they may
# differ on resume. The data order does not depend on the mesh or the workers, so those may change too.
RESUMABLE_KEYS = ("eval_every", "checkpoint_every", "progress_every", "keep_checkpoints", "num_workers",
                  "read_threads", "prefetch", "batch_eval", "tfds_data_dir", "peak_flops", "mesh", "cpu_devices",
                  "fewshot")


def path(workdir, name):
  return os.path.join(workdir, name)


def check_writable(workdir):
  """Creates `workdir` and checks that it is writable, before anything slow happens."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir you can write to") from None


def _flat(config_dict, prefix=""):
  flat = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_config(config, workdir, resuming):
  """Writes `config.json`; when resuming, first checks that the checkpointed run used a compatible config."""
  new = json.loads(config.to_json())
  config_path = path(workdir, CONFIG_FILE)
  if resuming and os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      old_flat, new_flat = _flat(json.load(f)), _flat(new)
    differ = sorted(k for k in set(old_flat) | set(new_flat)
                    if k.split(".")[0] not in RESUMABLE_KEYS and old_flat.get(k) != new_flat.get(k))
    if differ:
      changes = ", ".join(f"{k} (was {old_flat.get(k)!r}, now {new_flat.get(k)!r})" for k in differ[:8])
      raise UserError(f"workdir {workdir} holds a run with a different config: {changes}; resume it with the same "
                      "settings or pass a new --workdir")
  if jax.process_index() == 0:
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(new, f, indent=2, sort_keys=True)
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
  """The records of metrics.jsonl in order; lines cut short by a kill are skipped."""
  metrics_path = path(workdir, METRICS_FILE)
  if not os.path.exists(metrics_path):
    raise UserError(f"{metrics_path} does not exist; pass the workdir of a training run")
  records = []
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def checkpoint_manager(workdir, *, keep, platform):
  """Orbax's manager of the workdir's checkpoints: the training state as a PyTree, the data position as JSON."""
  # Orbax has each of R replicas write 1/R of a replicated array, slicing it R times first; on CPU the replicas
  # share one host and disk, so there the slicing only blocks the loop and one replica writes (docs/benchmarks.md).
  replica_parallel = False if platform == "cpu" else None
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel)))
  return ocp.CheckpointManager(
      os.path.abspath(path(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                     "extra": ocp.JsonCheckpointHandler()})


def state_restore_args(target):
  """Restore arguments of the training state onto `target`'s shapes, dtypes and shardings (orbax reshards)."""
  return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def save_checkpoint(manager, step, state, extra):
  """Saves `state` and the JSON-able `extra` (data position, pending metrics) as step `step`, in the background."""
  # A deep copy of the JSON part: the save completes in the background while the loop mutates its inputs.
  extra = json.loads(json.dumps(extra))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), extra=ocp.args.JsonSave(extra)))


def restore_checkpoint(manager, step, target):
  """(state, extra) of checkpoint `step`, the state laid out as `target` (shapes, dtypes, shardings)."""
  restored = manager.restore(step, args=ocp.args.Composite(state=state_restore_args(target),
                                                            extra=ocp.args.JsonRestore()))
  return restored.state, restored.extra
