"""Training: the sharded train state, the train and eval steps, and the loop with checkpoints and metrics.

`train_and_evaluate(config, workdir)` trains `config.model_name` on `config.dataset`, from scratch or from
`config.pretrained_path`, and resumes from the latest checkpoint in `workdir` if there is one. The train state
lives sharded over a (data, fsdp, tensor) mesh from its creation on; see `vit_jax.sharding`.
"""
import json
import os
import signal
import tempfile
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import checkpoint, compute_dtype, data, fewshot, flops, models, optim, sharding, visualize
from vit_jax.errors import UserError
from vit_jax.metrics_writer import MetricsWriter

LOSSES = ("softmax_xent", "sigmoid_xent")
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.npz"
# Keys (or whole sections) that only change how a run is observed or laid out, not what it computes: they may
# differ on resume. The data order does not depend on the mesh or the workers, so those may change too.
RESUMABLE_KEYS = ("eval_every", "checkpoint_every", "progress_every", "keep_checkpoints", "num_workers",
                  "read_threads", "prefetch", "batch_eval", "tfds_data_dir", "peak_flops", "mesh", "cpu_devices",
                  "fewshot")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; the key of step s is fold_in(rng, s), so a resumed run draws the same dropout


# --- losses and steps ------------------------------------------------------------------------------------------


def per_example_loss(logits, labels, *, loss, label_smoothing=0.0):
  """Cross-entropy per example; `labels` are class ids [batch] or (mixed-up) targets [batch, classes].

  `sigmoid_xent` sums independent binary losses over classes, as in the ImageNet-21k pretraining.
  """
  targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  if loss == "sigmoid_xent":
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
  return optax.softmax_cross_entropy(logits, targets)


def _correct(logits, labels):
  classes = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
  return (jnp.argmax(logits, axis=-1) == classes).astype(jnp.float32)


def make_train_step(model, tx, config, mesh, state_shardings):
  """jitted (state, batch) -> (state, metrics); the state is donated, so it is updated in place.

  With `accum_steps` > 1 the batch is split into micro-batches that a `lax.scan` runs one after the other,
  summing gradients: memory stays that of one micro-batch, the update that of the whole batch.
  """
  accum_steps = config.accum_steps
  schedule = optim.schedule_from_config(config)
  batch_spec = P(sharding.BATCH_AXES)

  def micro_step(params, images, labels, rng):
    def loss_fn(p):
      logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
      losses = per_example_loss(logits, labels, loss=config.loss, label_smoothing=config.label_smoothing)
      return losses.mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, _correct(logits, labels).mean(), grads

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    images = jax.lax.with_sharding_constraint(batch["image"], NamedSharding(mesh, batch_spec))
    labels = batch["label"]
    if accum_steps == 1:
      loss, accuracy, grads = micro_step(state.params, images, labels, rng)
    else:
      # Micro-batch i takes rows i, i + accum_steps, ...: every device keeps its own rows, nothing moves.
      def split(x):
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), NamedSharding(mesh, P(None, *batch_spec)))

      def accumulate(carry, micro):
        index, (images_i, labels_i) = micro
        loss_i, accuracy_i, grads_i = micro_step(state.params, images_i, labels_i, jax.random.fold_in(rng, index))
        loss_sum, accuracy_sum, grads_sum = carry
        return (loss_sum + loss_i, accuracy_sum + accuracy_i, jax.tree.map(jnp.add, grads_sum, grads_i)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, accuracy, grads), _ = jax.lax.scan(
          accumulate, (0.0, 0.0, zeros), (jnp.arange(accum_steps), (split(images), split(labels))))
      loss, accuracy = loss / accum_steps, accuracy / accum_steps
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train_loss": loss, "train_accuracy": accuracy, "learning_rate": schedule(state.step),
               "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model, config, mesh, param_shardings):
  """jitted (params, batch) -> masked sums of loss and correct predictions, and the count of real examples."""
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["image"], train=False)
    mask = batch["mask"]
    return {"loss": jnp.sum(per_example_loss(logits, batch["label"], loss=config.loss) * mask),
            "correct": jnp.sum(_correct(logits, batch["label"]) * mask),
            "count": jnp.sum(mask)}
  return jax.jit(eval_step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))


def evaluate(eval_step, params, config, mesh):
  """Exact loss and accuracy over the whole test split (padding masked out)."""
  totals = None
  for batch in data.make_eval_iterator(config, sharding.batch_sharding(mesh)):
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"test_loss": float(totals["loss"]) / count, "test_accuracy": float(totals["correct"]) / count}


# --- state ----------------------------------------------------------------------------------------------------


def model_config_from(config):
  """The registry config of `config.model_name` with the overrides of `config.model` applied."""
  model_config = models.get_model_config(config.model_name)
  model_config.update(config.model.to_dict())
  return model_config


def create_model(config, num_classes, platform):
  """The model of `config`, computing in `config.dtype` as resolved for `platform` (`compute_dtype.resolve`)."""
  dtype = compute_dtype.DTYPES[compute_dtype.resolve(config.dtype, platform)]
  return models.get_model(config.model_name, num_classes=num_classes, dtype=dtype, **config.model.to_dict())


def warn_if_remat_saves_nothing(remat, scan_layers, platform):
  """XLA:CPU's scheduler runs an unrolled model's recomputation early, so remat without scan keeps every
  activation there (ViT-B/16, batch 64: 13.9 GB with remat=full or none, 2.9 GB with remat=full + scan_layers;
  docs/scaling.md). Measured on CPU only; GPU and TPU compilers schedule for memory."""
  if remat != "none" and not scan_layers and platform == "cpu":
    logging.warning("remat=%s without scan_layers saves no memory on CPU (XLA:CPU recomputes early); add "
                    "scan_layers=True for the saving", remat)


def count_params(model, crop):
  """Parameters of `model` for images of `crop`, from shapes alone: JAX's devices stay untouched."""
  height, width = (crop, crop) if np.isscalar(crop) else crop
  shapes = jax.eval_shape(lambda rng: model.init(rng, jnp.zeros((1, height, width, 3), jnp.float32), train=False),
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def make_init_fn(model, tx, config):
  """seed -> TrainState for images of `config.pp.crop` (int or (height, width)); run it under
  `jax.jit(out_shardings=...)` so every array is born sharded."""
  crop = config.pp.crop
  height, width = (crop, crop) if np.isscalar(crop) else crop

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, height, width, 3), jnp.float32), train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)
  return init


def crop_at(config, step):
  """Image size of 0-based step `step`: `pp.crop`, or the last of `crop_stages` (start_step, crop) begun by then."""
  crop = config.pp.crop
  for start, stage_crop in sorted(tuple(stage) for stage in config.crop_stages):
    if step >= start:
      crop = stage_crop
  return crop


def with_crop(config, crop):
  """`config` for the data pipeline of one resolution stage."""
  config = config.copy_and_resolve_references()
  config.pp.crop = crop
  return config


def resize_position_embeddings(state, model_config, crop):
  """`state` with position embeddings, and their optimizer moments, resampled to the grid of `crop`."""
  tokens = models.num_tokens(model_config, crop)
  has_class_token = model_config.get("classifier", "token") in ("token", "token_unpooled")

  def resize(path, leaf):
    if not sharding.path_str(path).endswith("posembed_input/pos_embedding") or leaf.shape[1] == tokens:
      return leaf
    # Replicated by the sharding rules, so every host holds it whole; resampled in float32 like the zoo's.
    resized = checkpoint.interpolate_posembed(np.asarray(leaf, np.float32), tokens, has_class_token)
    return jax.device_put(resized.astype(leaf.dtype), leaf.sharding)
  return jax.tree_util.tree_map_with_path(resize, state)


def with_pretrained(state, pretrained):
  """`state` with every parameter that `pretrained` holds as an array (the head stays as initialised)."""
  def pick(init, loaded):
    return jax.device_put(np.asarray(loaded, init.dtype), init.sharding) if isinstance(loaded, np.ndarray) else init
  return state.replace(params=jax.tree.map(pick, state.params, pretrained))


# --- workdir --------------------------------------------------------------------------------------------------


def _flat(config_dict, prefix=""):
  flat = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_workdir(workdir):
  """Creates `workdir` and checks that it is writable, before anything slow happens."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir you can write to") from None


def write_config(config, workdir, resuming):
  """Writes `config.json`; when resuming, first checks that the checkpointed run used a compatible config."""
  new = json.loads(config.to_json())
  path = os.path.join(workdir, CONFIG_FILE)
  if resuming and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old_flat, new_flat = _flat(json.load(f)), _flat(new)
    differ = sorted(k for k in set(old_flat) | set(new_flat)
                    if k.split(".")[0] not in RESUMABLE_KEYS and old_flat.get(k) != new_flat.get(k))
    if differ:
      changes = ", ".join(f"{k} (was {old_flat.get(k)!r}, now {new_flat.get(k)!r})" for k in differ[:8])
      raise UserError(f"workdir {workdir} holds a run with a different config: {changes}; resume it with the same "
                      "settings or pass a new --workdir")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def validate_config(config):
  if config.loss not in LOSSES:
    raise UserError(f"unknown loss {config.loss!r}; use one of {', '.join(LOSSES)}")
  for key in ("total_steps", "accum_steps", "batch", "batch_eval", "progress_every", "keep_checkpoints"):
    if config[key] < 1:
      raise UserError(f"{key}={config[key]} must be at least 1")
  for key in ("eval_every", "checkpoint_every"):
    if config[key] < 0:
      raise UserError(f"{key}={config[key]} must be 0 (only at the end) or positive")


def _due(step, every):
  return every > 0 and step % every == 0


class _Preemption:
  """Remembers a SIGTERM so the loop can checkpoint the current step and stop cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the current step, then exiting.")
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def _train_record(pending, steps, seconds, config, flops_per_step, peak):
  """The metrics.jsonl record of the steps in `pending` (host floats); this process ran `steps` in `seconds`."""
  steps_per_sec = steps / seconds
  record = {k: float(np.mean([r[k] for r in pending])) for k in ("train_loss", "train_accuracy", "grad_norm")}
  record.update(learning_rate=pending[-1]["learning_rate"], steps_per_sec=steps_per_sec,
                img_per_sec=steps_per_sec * config.batch, mfu=flops_per_step * steps_per_sec / peak)
  return record


def _checkpoint_manager(workdir, config, platform):
  """Orbax's manager of the workdir's checkpoints: the training state as a PyTree, the data position as JSON.

  Orbax saves a replicated array (the parameters and optimizer state under data parallelism) replica-parallel by
  default: each of R replicas writes 1/R of it, which first slices every array R times on its devices. On CPU the
  replicas share one host and disk, so the slicing only blocks the training loop, and there one replica writes
  each array. 450 replicated arrays of up to 768 x 768 (ViT-B/16 with Adam has as many) over 4 CPU devices block
  the loop for 0.14 s per save instead of 1.0-1.3 s.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False if platform == "cpu" else None)))
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                     "extra": ocp.JsonCheckpointHandler()})


def _state_restore_args(target):
  """Restore arguments of the training state onto `target`'s shapes, dtypes and shardings (orbax reshards)."""
  return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _save(manager, step, state, train_iter, pending):
  # A deep copy of the JSON part: the save completes in the background while the loop mutates `pending`.
  extra = json.loads(json.dumps({"data": train_iter.get_state(), "pending_metrics": pending}))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), extra=ocp.args.JsonSave(extra)))


def _check_finite(records, first_step, manager, workdir):
  for offset, record in enumerate(records):
    if not np.isfinite(record["train_loss"]):
      manager.wait_until_finished()  # the last good checkpoint must be complete before we stop
      last = manager.latest_step()
      kept = f"the last good checkpoint (step {last}) stays in {workdir}" if last is not None else "no checkpoint"
      raise UserError(f"train loss is {record['train_loss']} at step {first_step + offset}; {kept}; lower "
                      "base_lr, raise warmup_steps or set grad_norm_clip")


# --- the loop -------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None):
  """Trains and evaluates; returns the last eval metrics. `devices` (default: all) builds the mesh."""
  validate_config(config)
  model_config = model_config_from(config)
  check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh, devices)
  platform = mesh.devices.flat[0].platform
  warn_if_remat_saves_nothing(model_config.get("remat", "none"), model_config.get("scan_layers", False), platform)
  sharding.check_batch_size("batch", config.batch, mesh, config.accum_steps)
  sharding.check_batch_size("batch_eval", config.batch_eval, mesh)
  tx = optim.make_optimizer(config)
  info = data.get_dataset_info(config)
  model = create_model(config, info.num_classes, platform)
  logging.info("Compute dtype: %s (config.dtype=%s on %s).", jnp.dtype(model.dtype).name, config.dtype, platform)
  first_crop = crop_at(config, 0)
  init_fn = make_init_fn(model, tx, with_crop(config, first_crop))
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  pretrained = None
  if config.pretrained_path:  # read and checked before anything compiles
    pretrained = checkpoint.load_pretrained(pretrained_path=config.pretrained_path,
                                            init_params=abstract_state.params, model_config=model_config,
                                            image_size=first_crop)

  manager = _checkpoint_manager(workdir, config, platform)
  writer = train_iter = None  # closed in `finally`, also when setting up fails
  try:
    restored_step = manager.latest_step()
    write_config(config, workdir, resuming=restored_step is not None)
    writer = MetricsWriter(workdir)
    # The checkpoint of step s holds the state that step s - 1 produced, at that step's resolution.
    crop = first_crop if restored_step is None else crop_at(config, restored_step - 1)
    abstract_state = jax.eval_shape(make_init_fn(model, tx, with_crop(config, crop)), jax.random.PRNGKey(0))
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    train_iter = data.make_train_iterator(with_crop(config, crop), sharding.batch_sharding(mesh))
    pending = []  # per-step metrics since the last log line; saved with checkpoints so resumed logs match
    if restored_step is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, state_shardings)
      restored = manager.restore(restored_step, args=ocp.args.Composite(
          state=_state_restore_args(target), extra=ocp.args.JsonRestore()))
      state = restored.state
      train_iter.set_state(restored.extra["data"])
      pending = restored.extra["pending_metrics"]
      writer.truncate_after(restored_step)
      logging.info("Resumed from %s at step %d.", manager.directory, restored_step)
    else:
      state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(config.seed))
      if pretrained is not None:
        state = with_pretrained(state, pretrained)
    logging.info("Mesh %s; parameters:\n%s", dict(mesh.shape),
                 parameter_overview.get_parameter_overview(state.params, include_stats=False))

    train_step = make_train_step(model, tx, config, mesh, state_shardings)
    eval_step = make_eval_step(model, config, mesh, state_shardings.params)
    flops_per_image = lambda crop: flops.train_flops_per_image(model_config, crop, info.num_classes)
    peak = config.peak_flops or flops.peak_flops(model.dtype)
    fewshot_evaluator = fewshot.FewShotEvaluator(config) if config.get("fewshot") and config.fewshot.every else None
    step = int(state.step)
    eval_metrics = {}
    with _Preemption() as preemption, tqdm.tqdm(total=config.total_steps, initial=step, unit="step",
                                                disable=jax.process_index() != 0, dynamic_ncols=True) as bar:
      last_time, last_step = time.perf_counter(), step
      while step < config.total_steps and not preemption.requested:
        if crop_at(config, step) != crop:  # progressive resizing: the next resolution stage begins
          crop = crop_at(config, step)
          logging.info("Step %d: image size %s from now on; resampling position embeddings.", step, crop)
          state = resize_position_embeddings(state, model_config, crop)
          train_iter.close()
          train_iter = data.make_train_iterator(with_crop(config, crop), sharding.batch_sharding(mesh))
        state, metrics = train_step(state, next(train_iter))
        step += 1
        pending.append(metrics)
        bar.update(1)
        final = step == config.total_steps
        log, save = _due(step, config.progress_every) or final, _due(step, config.checkpoint_every) or final
        if log or save or preemption.requested:
          pending = [{k: float(v) for k, v in record.items()} for record in jax.device_get(pending)]
          _check_finite(pending, step - len(pending) + 1, manager, workdir)
        periodic = {}  # evaluations due at this step
        if _due(step, config.eval_every) or final:
          eval_metrics = evaluate(eval_step, state.params, with_crop(config, crop), mesh)
          periodic.update(eval_metrics)
        if fewshot_evaluator and (_due(step, config.fewshot.every) or final):
          periodic.update(fewshot_evaluator(state.params, model))
        if log:
          now = time.perf_counter()
          record = _train_record(pending, step - last_step, now - last_time, config,
                                 config.batch * flops_per_image(crop), peak)
          pending = []
          record.update(periodic)
          writer.write(step, record)
          bar.set_postfix({k: f"{record[k]:.4g}" for k in ("train_loss", "img_per_sec", "test_accuracy")
                           if k in record})
          logging.info("step %d: %s", step, record)
          last_time, last_step = time.perf_counter(), step
        elif periodic:
          writer.write(step, periodic)
        if save or preemption.requested:
          _save(manager, step, state, train_iter, pending)
  finally:  # also on errors: in-flight checkpoints complete, files close
    if train_iter is not None:
      train_iter.close()
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
  if step < config.total_steps:
    logging.info("Stopped at step %d after SIGTERM; rerun the same command to resume.", step)
    return eval_metrics
  model_path = os.path.join(workdir, MODEL_FILE)
  if restored_step == step and os.path.exists(model_path):
    logging.info("The run in %s was already complete; %s is up to date.", workdir, model_path)
    return eval_metrics
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    checkpoint.save(params, model_path)
    try:
      visualize.plot_training_curves(workdir)
    except UserError as e:  # matplotlib is an optional extra
      logging.warning("No training curves: %s", e)
  logging.info("Done at step %d: %s", step, eval_metrics)
  return eval_metrics
