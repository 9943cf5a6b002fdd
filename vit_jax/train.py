"""The training loop, the same for every objective: mesh, state creation and restore, resolution stages,
preemption, progress, metrics, evaluators and the final export.

`train_and_evaluate(config, workdir)` trains `config.model_name` on `config.dataset` with the objective that
`config.trainer` names (`vit_jax.objectives`), from scratch or from `config.pretrained_path`, and resumes from the
latest checkpoint in `workdir` if there is one. The train state lives sharded over a (data, fsdp, tensor) mesh from
its creation on (`vit_jax.sharding`). This module is the only reader of the whole training config: everything it
calls takes explicit arguments.
"""
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from vit_jax import (checkpoint, data, flops, interrupts, models, objectives, optim, sharding, steps,
                     workdir as workdir_lib)
from vit_jax.errors import UserError
from vit_jax.evaluators import classification, fewshot
from vit_jax.metrics_writer import MetricsWriter
from vit_jax.models import precision
from vit_jax.models import state as model_state_lib
from vit_jax.models.vit import warn_if_remat_saves_nothing

# --- from the config: the loop's one adapter to the explicit arguments of the rooms below ---------------------


def validate_config(config):
  for key in ("total_steps", "accum_steps", "batch", "batch_eval", "progress_every", "keep_checkpoints"):
    if config[key] < 1:
      raise UserError(f"{key}={config[key]} must be at least 1")
  for key in ("eval_every", "checkpoint_every"):
    if config[key] < 0:
      raise UserError(f"{key}={config[key]} must be 0 (only at the end) or positive")
  if config.peak_flops is not None and not config.peak_flops > 0:
    raise UserError(f"peak_flops={config.peak_flops} must be positive, or unset to measure it")
  if config.get("fewshot") and config.fewshot.every < 0:
    raise UserError(f"fewshot.every={config.fewshot.every} must be 0 (off) or positive")
  for stage in config.crop_stages:
    if len(tuple(stage)) != 2 or not all(isinstance(v, int) for v in stage) or stage[0] < 0 or stage[1] < 1:
      raise UserError(f"crop_stages entry {tuple(stage)} must be (start_step >= 0, crop >= 1)")
  steps.check_ema_decay(config.ema_decay)


def check_model_options(config, model_config):
  """Options that only a Vision Transformer has: resolution stages resample position embeddings."""
  if config.crop_stages and models.family(model_config) != "vit":
    raise UserError(f"crop_stages={tuple(tuple(s) for s in config.crop_stages)} resamples position embeddings, "
                    f"which {models.family_description(model_config)} does not have; drop --config.crop_stages "
                    "(train at one --config.pp.crop)")


def check_objective_data(objective, pp):
  """Mixing images mixes their labels: an objective that does not train on labels cannot use it."""
  for key in ("mixup", "cutmix"):
    if not objective.classifies and float(pp.get(key, 0.0) or 0.0) > 0:
      raise UserError(f"config.pp.{key}={pp[key]} mixes labels, which the {type(objective).__name__} objective "
                      f"does not train on; set --config.pp.{key}=0")


def model_config_from(config):
  """The registry config of `config.model_name` with the overrides of `config.model` applied."""
  return models.get_model_config(config.model_name, **config.model.to_dict())


def create_model(config, num_classes, platform):
  """The model of `config`, computing in `config.dtype` as resolved for `platform`."""
  dtype = precision.DTYPES[precision.resolve_dtype(config.dtype, platform)]
  return models.build(model_config_from(config), num_classes=num_classes, dtype=dtype)


def cpu_split_args(config):
  """The arguments of `vit_jax.host.split_cpu_devices` for this run: the state's parameter count (a callable:
  counted only on CPU hosts; the head is an estimate, the dataset is not read yet), batch and mesh sizes."""
  return dict(num_params=lambda: steps.count_params(create_model(config, 1000, "cpu"), config.pp.crop),
              batch_sizes=(config.batch // max(config.accum_steps, 1), config.batch_eval),
              mesh_sizes=[config.mesh[axis] for axis in sharding.MESH_AXES])


def make_optimizer(config):
  """(tx, schedule) of the config's optimizer keys (`optim.CONFIG_KEYS`)."""
  return optim.make_optimizer(**{key: config[key] for key in optim.CONFIG_KEYS})


def _data_args(config):
  return dict(dataset=config.dataset, tfds_data_dir=config.tfds_data_dir, num_workers=config.num_workers,
              read_threads=config.read_threads, prefetch=config.prefetch)


def train_iterator(config, crop, mesh):
  """Training batches at image size `crop` (one resolution stage)."""
  return data.make_train_iterator(split=config.pp.train, pp=dict(config.pp.to_dict(), crop=crop), batch=config.batch,
                                  seed=config.seed, sharding=sharding.batch_sharding(mesh), **_data_args(config))


def eval_iterator(config, crop, mesh):
  """One pass over the test split at image size `crop`."""
  return data.make_eval_iterator(split=config.pp.test, pp=dict(config.pp.to_dict(), crop=crop),
                                 batch=config.batch_eval, batch_key="batch_eval",
                                 sharding=sharding.batch_sharding(mesh), **_data_args(config))


def fewshot_evaluator(config):
  """The few-shot evaluator of `config.fewshot`, or None when it is off; unset fields take the run's."""
  fs = config.get("fewshot")
  if not fs or not fs.every:
    return None
  return fewshot.FewShotEvaluator(
      dataset=fs.dataset or config.dataset, tfds_data_dir=fs.tfds_data_dir or config.tfds_data_dir,
      pp={"crop": fs.crop or config.pp.crop, "resize": fs.resize or config.pp.resize},
      train_split=fs.train_split, test_split=fs.test_split, shots=fs.shots, seeds=fs.seeds, l2_reg=fs.l2_reg,
      batch=fs.batch)


def crop_at(config, step):
  """Image size of 0-based step `step`: `pp.crop`, or the last of `crop_stages` (start_step, crop) begun by then."""
  crop = config.pp.crop
  for start, stage_crop in sorted(tuple(stage) for stage in config.crop_stages):
    if step >= start:
      crop = stage_crop
  return crop


# --- state -----------------------------------------------------------------------------------------------------


def resize_position_embeddings(state, model_config, crop):
  """`state` with position embeddings, and their optimizer moments, resampled to the grid of `crop`."""
  tokens = models.num_tokens(model_config, crop)

  def resize(path, leaf):
    if not sharding.path_str(path).endswith("posembed_input/pos_embedding") or leaf.shape[1] == tokens:
      return leaf
    # Replicated by the sharding rules, so every host holds it whole; resampled in float32 like the zoo's.
    resized = checkpoint.resample_posemb(np.asarray(leaf, np.float32), model_config, crop)
    return jax.device_put(resized.astype(leaf.dtype), leaf.sharding)
  return jax.tree_util.tree_map_with_path(resize, state)


def encoder_part(objective, params, model_state):
  """(params, model_state) of the registry model inside the trained one: what `model.npz` holds and few-shot
  probes see (all of it, or the objective's `encoder_key` subtree)."""
  key = objective.encoder_key
  if key is None:
    return params, model_state
  return params[key], (model_state or {}).get(key, model_state)


def with_pretrained(state, pretrained, encoder_key=None):
  """`state` with every parameter that `pretrained` holds as an array (the head stays as initialised), in the EMA
  too when there is one, and the model's state (BatchNorm statistics) when the file has it. `encoder_key`: the
  subtree of the state's parameters that `pretrained` is for (an objective's encoder; None: all)."""
  def pick(init, loaded):
    return jax.device_put(np.asarray(loaded, init.dtype), init.sharding) if isinstance(loaded, np.ndarray) else init
  pretrained, pretrained_state = model_state_lib.split(pretrained)
  if encoder_key is not None:  # the objective's own parameters (device arrays here) keep their initialisation
    pretrained = {**state.params, encoder_key: pretrained}
  params = jax.tree.map(pick, state.params, pretrained)
  ema_params = None if state.ema_params is None else jax.tree.map(pick, state.ema_params, pretrained)
  model_state = None if state.model_state is None else jax.tree.map(pick, state.model_state, pretrained_state)
  return state.replace(params=params, ema_params=ema_params, model_state=model_state)



# --- loop helpers ----------------------------------------------------------------------------------------------


def _due(step, every):
  return every > 0 and step % every == 0


def _any_process(flag):
  """True on every process if `flag` holds on any: the processes of a multi-process run stop at the same step (the
  save is collective). One tiny all-gather per step, only when there are several processes."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _train_record(pending, steps_run, seconds, batch, flops_per_step, peak):
  """The metrics.jsonl record of the steps in `pending` (host floats); this process ran `steps_run` in `seconds`."""
  steps_per_sec = steps_run / seconds
  objective_keys = sorted(set(pending[-1]) - {"train_loss", "learning_rate", "grad_norm"})
  averaged = ["train_loss", *objective_keys, "grad_norm"]
  record = {k: float(np.mean([r[k] for r in pending])) for k in averaged}
  record.update(learning_rate=pending[-1]["learning_rate"], steps_per_sec=steps_per_sec,
                img_per_sec=steps_per_sec * batch, mfu=flops_per_step * steps_per_sec / peak)
  return record


class NonFiniteError(UserError):
  """The loss or gradient norm became NaN or infinite: the state of that step is not worth saving."""


def _check_finite(records, first_step, manager, workdir, *, base_lr, grad_norm_clip):
  """A NonFiniteError at the first step whose loss or gradient norm is not finite, naming the way back.

  The loss of step k comes from the parameters of checkpoint k - 1, so resuming from that one recomputes the same
  non-finite loss whatever the learning rate: the way back starts from an older checkpoint.
  """
  for offset, record in enumerate(records):
    bad = [key for key in ("train_loss", "grad_norm") if not np.isfinite(record[key])]
    if not bad:
      continue
    bad_step = first_step + offset
    manager.wait_until_finished()  # the last checkpoint must be complete before we stop
    kept = sorted(manager.all_steps())
    usable = [s for s in kept if s < bad_step - 1]
    changes = f"--config.base_lr={base_lr / 10:g} or a larger --config.warmup_steps" + (
        "" if grad_norm_clip else " or --config.grad_norm_clip=1")
    if usable:
      later = [s for s in kept if s > usable[-1]]
      move = (f"first move the checkpoint(s) of step {', '.join(map(str, later))} aside (they hold parameters "
              f"that lead here: mv {workdir}/checkpoints/N {workdir}/checkpoints/N.bad), then " if later else "")
      way = (f"{move}rerun the same command with e.g. {changes} to resume from step {usable[-1]} (these keys may "
             "change on resume)")
    else:
      way = f"no checkpoint before it is kept; rerun with a new --workdir and e.g. {changes}"
    raise NonFiniteError(f"{bad[0]} is {record[bad[0]]} at step {bad_step}; {way}")


def _save_after_error(manager, step, state, position, pending, written):
  """Saves step `step` when the loop dies of an error that left a good state (an evaluator failing, a metrics
  write), so the steps since the last checkpoint are not lost; a failure here is logged, the error raised."""
  try:
    pending = [{k: float(v) for k, v in record.items()} for record in jax.device_get(pending)]
    if not all(np.isfinite(record[key]) for record in pending for key in ("train_loss", "grad_norm")):
      return
    workdir_lib.save_checkpoint(manager, step, state, {"data": position, "pending_metrics": pending,
                                                       "records": written})
    manager.wait_until_finished()
    logging.warning("Saved a checkpoint of step %d before stopping on the error below.", step)
  except Exception as e:  # pylint: disable=broad-except  # the original error is the one to report
    logging.warning("Could not save a checkpoint of step %d after an error: %s", step, e)


def _state_bytes(abstract_state):
  """Bytes of one checkpoint of `abstract_state` plus the float32 model.npz of its parameters."""
  state = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_state))
  return state + sum(leaf.size * 4 for leaf in jax.tree.leaves(abstract_state.params))


# --- the loop --------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None, stop=None):
  """Trains and evaluates; returns the last eval metrics. `devices` (default: all) builds the mesh.

  `stop`: the entry point's entered `vit_jax.interrupts.StopSignals`, which says when SIGTERM or SIGINT asked the
  run to checkpoint the current step and return early (default: none, signals act as the caller set them).
  """
  validate_config(config)
  objective = objectives.get(config.trainer).from_config(config)
  data.check_pp(config.pp)
  check_objective_data(objective, config.pp)
  if objective.encoder_key is not None and config.layer_decay != 1.0:  # its rules address the bare model's paths
    raise UserError(f"layer_decay={config.layer_decay} is a fine-tuning rule, which the {config.trainer} objective "
                    "does not take; set --config.layer_decay=1 (use it when fine-tuning from the export)")
  model_config = model_config_from(config)
  check_model_options(config, model_config)
  objective.check_model(model_config, crop_at(config, 0))
  mesh = sharding.make_mesh(config.mesh, devices)
  platform = mesh.devices.flat[0].platform
  warn_if_remat_saves_nothing(model_config.get("remat", "none"), model_config.get("scan_layers", False), platform)
  sharding.check_batch_size("batch", config.batch, mesh, config.accum_steps)
  sharding.check_batch_size("batch_eval", config.batch_eval, mesh)
  tx, schedule = make_optimizer(config)
  info = data.get_dataset_info(config.dataset, train_split=config.pp.train, test_split=config.pp.test,
                               tfds_data_dir=config.tfds_data_dir)
  encoder = create_model(config, objective.num_outputs(info.num_classes), platform)
  model = objective.wrap(encoder)
  logging.info("Compute dtype: %s (config.dtype=%s on %s).", jnp.dtype(encoder.dtype).name, config.dtype, platform)
  first_crop = crop_at(config, 0)
  abstract_state = jax.eval_shape(steps.make_init_fn(model, tx, first_crop, ema=config.ema_decay > 0),
                                  jax.random.PRNGKey(0))
  # The learning-rate rules against the real parameter paths: a regex that matches nothing fails here.
  optim.learning_rate_factors(abstract_state.params, layer_decay=config.layer_decay, lr_mults=config.lr_mults)
  pretrained = None
  if config.pretrained_path:  # read and checked before anything compiles
    pretrained = checkpoint.load_pretrained(
        pretrained_path=config.pretrained_path, model_config=model_config, image_size=first_crop,
        init_params=model_state_lib.merge(*encoder_part(objective, abstract_state.params, abstract_state.model_state)))

  workdir_lib.check_writable(workdir)  # the first write, once every check that can fail fast has passed
  save_bytes = _state_bytes(abstract_state)
  workdir_lib.check_free_space(workdir, save_bytes)
  with workdir_lib.locked(workdir):  # one run per workdir, from here to the end
    stop = stop if stop is not None else interrupts.StopSignals()  # not entered: inert, signals act as before
    try:
      return _train(config, workdir, mesh=mesh, model=model, encoder=encoder, model_config=model_config,
                    objective=objective, tx=tx, schedule=schedule, num_classes=info.num_classes,
                    pretrained=pretrained, stop=stop)
    except Exception as e:  # pylint: disable=broad-except  # a full disk can surface from any writer
      if workdir_lib.is_disk_full(e):
        raise workdir_lib.disk_full_error(e, workdir, save_bytes) from None
      raise


def _train(config, workdir, *, mesh, model, encoder, model_config, objective, tx, schedule, num_classes, pretrained,
           stop):
  """The loop of `train_and_evaluate`, in a locked workdir."""
  platform = mesh.devices.flat[0].platform
  manager = workdir_lib.checkpoint_manager(workdir, keep=config.keep_checkpoints, platform=platform)
  ema = config.ema_decay > 0
  writer = train_iter = None  # closed in `finally`, also when setting up fails
  try:
    if manager.all_steps():
      workdir_lib.check_config(config, workdir)  # before restoring: a different model fails to restore

    def layout(crop):  # the state's abstract shapes at image size `crop`, and its shardings
      abstract = jax.eval_shape(steps.make_init_fn(model, tx, crop, ema=ema), jax.random.PRNGKey(0))
      return abstract, sharding.tree_shardings(abstract, mesh)

    def target_at(step):  # the checkpoint of step s holds the state that step s - 1 produced, at its resolution
      abstract, shardings = layout(crop_at(config, step - 1))
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    restored = workdir_lib.restore_newest_good(manager, target_at)
    restored_step = restored[0] if restored else None
    if restored_step is not None and restored_step > config.total_steps:
      raise UserError(f"total_steps={config.total_steps} is below step {restored_step} of the checkpoint in "
                      f"{workdir}; pass --config.total_steps={restored_step} or more, or a new --workdir")
    exported_before = workdir_lib.exported_weights(workdir_lib.previous_config(workdir) or {})  # export_ema may change
    workdir_lib.write_config(config, workdir)  # once the resume checks passed
    crop = crop_at(config, 0 if restored_step is None else restored_step - 1)
    init_fn = steps.make_init_fn(model, tx, crop, ema=ema)
    _, state_shardings = layout(crop)
    writer = MetricsWriter(workdir, resume_step=restored_step or 0)
    train_iter = train_iterator(config, crop, mesh)
    pending = []  # per-step metrics since the last log line; saved with checkpoints so resumed logs match
    written = []  # metrics.jsonl records since the last checkpoint; saved with it, put back if the file lost them
    if restored is not None:
      _, state, extra = restored
      train_iter.set_state(extra["data"])
      pending = extra["pending_metrics"]
      writer.restore(restored_step, extra.get("records", []))
      logging.info("Resumed from %s at step %d.", manager.directory, restored_step)
    else:
      writer.restore(0, [])  # a run that died before its first checkpoint left records of steps redone now
      state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(config.seed))
      if pretrained is not None:
        state = with_pretrained(state, pretrained, objective.encoder_key)
    logging.info("Mesh %s; parameters:\n%s", dict(mesh.shape),
                 parameter_overview.get_parameter_overview(state.params, include_stats=False))

    train_step = steps.make_train_step(model, tx, schedule, objective.loss_fn, mesh=mesh,
                                       state_shardings=state_shardings, accum_steps=config.accum_steps,
                                       ema_decay=config.ema_decay)
    eval_step = None
    if objective.classifies:
      eval_step = classification.make_eval_step(model, loss=objective.loss, mesh=mesh,
                                                variable_shardings=state_shardings.variables())
    num_outputs = objective.num_outputs(num_classes)
    flops_per_image = lambda crop: objective.train_flops_per_image(model_config, crop, num_outputs)
    peak = config.peak_flops or flops.peak_flops(encoder.dtype)
    fewshot_eval = fewshot_evaluator(config)
    step = int(state.step)
    eval_metrics = {}
    saved_step = position = None
    try:
      with tqdm.tqdm(total=config.total_steps, initial=step, unit="step", disable=jax.process_index() != 0,
                     dynamic_ncols=True) as bar:
        last_time, last_step = time.perf_counter(), step
        while step < config.total_steps:
          if crop_at(config, step) != crop:  # progressive resizing: the next resolution stage begins
            crop = crop_at(config, step)
            logging.info("Step %d: image size %s from now on; resampling position embeddings.", step, crop)
            state = resize_position_embeddings(state, model_config, crop)
            train_iter.close()
            train_iter = train_iterator(config, crop, mesh)
          state, metrics = train_step(state, next(train_iter))
          position = train_iter.get_state()  # the data position that goes with this state
          stop.enter_loop()  # from the first step on, a signal asks for a checkpoint of it instead of exiting
          step += 1
          pending.append(metrics)
          bar.update(1)
          final = step == config.total_steps
          # Read once per step: the watcher thread may set it at any moment.
          stopping = _any_process(stop.requested is not None)
          log, save = _due(step, config.progress_every) or final, _due(step, config.checkpoint_every) or final
          if log or save or stopping:
            pending = [{k: float(v) for k, v in record.items()} for record in jax.device_get(pending)]
            _check_finite(pending, step - len(pending) + 1, manager, workdir, base_lr=config.base_lr,
                        grad_norm_clip=config.grad_norm_clip)
          periodic = {}  # evaluations due at this step; skipped when stopping early, to save within the grace period
          if eval_step is not None and (_due(step, config.eval_every) or final) and (final or not stopping):
            result = classification.evaluate(eval_step, state.variables(), eval_iterator(config, crop, mesh))
            eval_metrics = {"test_loss": result["loss"], "test_accuracy": result["accuracy"]}
            if ema:  # the averaged weights, scored beside the raw ones
              result = classification.evaluate(eval_step, state.variables(ema=True), eval_iterator(config, crop, mesh))
              eval_metrics.update(test_loss_ema=result["loss"], test_accuracy_ema=result["accuracy"])
            periodic.update(eval_metrics)
          if fewshot_eval and (_due(step, config.fewshot.every) or final) and (final or not stopping):
            periodic.update(fewshot_eval(model_state_lib.variables(
                *encoder_part(objective, state.params, state.model_state)), encoder))
          if log:
            now = time.perf_counter()
            record = _train_record(pending, step - last_step, now - last_time, config.batch,
                                   config.batch * flops_per_image(crop), peak)
            record.update(periodic)
            written.append(writer.write(step, record))
            pending = []  # only once written: a failed write leaves them to the checkpoint saved after the error
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("train_loss", "img_per_sec", "test_accuracy")
                             if k in record})
            logging.info("step %d: %s", step, record)
            last_time, last_step = time.perf_counter(), step
          elif periodic:
            written.append(writer.write(step, periodic))
          if save or stopping:
            workdir_lib.save_checkpoint(manager, step, state, {"data": position, "pending_metrics": pending,
                                                              "records": written})
            written, saved_step = [], step
          if stopping:
            break
    except Exception as e:  # pylint: disable=broad-except  # re-raised; first the steps since the last save
      # Single-process only: a save is collective, and the other processes may not have failed.
      # Not after a failed resolution change either: the state would not fit its step's layout.
      if not isinstance(e, NonFiniteError) and position is not None and step != saved_step and \
          crop == crop_at(config, step - 1) and jax.process_count() == 1:
        _save_after_error(manager, step, state, position, pending, written)
      raise
  finally:  # also on errors: in-flight checkpoints complete, files close
    if train_iter is not None:
      train_iter.close()
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
  stop.leave_loop()  # the last checkpoint is complete: an interrupt from here on loses nothing
  if step < config.total_steps:
    logging.info("Stopped at step %d after a signal; rerun the same command to resume.", step)
    return eval_metrics
  model_path = workdir_lib.path(workdir, workdir_lib.MODEL_FILE)
  weights = workdir_lib.exported_weights(config)
  if restored_step == step and os.path.exists(model_path) and weights == exported_before:
    logging.info("The run in %s was already complete; %s is up to date.", workdir, model_path)
    return eval_metrics
  params, model_state = multihost_utils.process_allgather(
      encoder_part(objective, state.ema_params if weights == "ema" else state.params, state.model_state), tiled=True)
  if jax.process_index() == 0:
    checkpoint.save(model_state_lib.merge(params, model_state), model_path)
  logging.info("Done at step %d: %s; %s holds the %s weights.", step, eval_metrics, model_path, weights)
  return eval_metrics
