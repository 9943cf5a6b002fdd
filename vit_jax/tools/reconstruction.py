"""What a self-supervised run predicts for the patches it did not see: `visualize reconstruction`.

  python -m vit_jax.tools.visualize reconstruction --checkpoint=runs/mae_digits --dataset=digits --num_images=6

A run of trainer `mae` or `masked_patch` exports only its encoder (`model.npz`); MAE's decoder and the masked-patch
prediction head live in the orbax checkpoint alone. `load_run(workdir)` restores the newest checkpoint that restores
(read-only: nothing in the workdir is written, moved or cleaned up) onto one device and rebuilds the trained module
exactly as `vit_jax.train` built it. Masks come from `jax.random.PRNGKey(seed)`, drawn as the objective draws them
in training.

- `mae_reconstruction`: the input with its hidden patches greyed out (what the encoder saw), and the prediction:
  the decoder's pixels for the hidden patches pasted into the visible input. With `norm_pix_loss` the decoder
  predicts each patch normalised by its own mean and variance, so the prediction is de-normalised with the true
  patch's mean and unbiased standard deviation (sqrt(var + 1e-6), the inverse of the training target's
  normalisation; MAE's demo does the same).
- `masked_patch_prediction`: the input with its corrupted patches greyed out (whatever the corruption: the mask
  embedding, another patch's embedding or none), and the prediction painted over them: the argmax colour class
  decoded to the centre of each channel's 3-bit level, -1 + (k + 0.5) / 4 (`colour`: the whole patch; `colour_4x4`:
  each of the 16 sub-patches), or the predicted pixels (`pixels`).
All pictures are in the model's [-1, 1] pixel scale, clipped to it.
"""
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import objectives, sharding, steps, train
from vit_jax import workdir as workdir_lib
from vit_jax.errors import UserError
from vit_jax.models import state as model_state_lib
from vit_jax.objectives import mae, masked_patch, masking
from vit_jax.tools import trained_model, visualize

SSL_TRAINERS = ("mae", "masked_patch")
GREY = 0.0  # mid-grey in the [-1, 1] pixel scale: a hidden or corrupted patch
# What each objective keeps only in the checkpoint, for the error of a workdir without one.
_CHECKPOINT_ONLY = {"mae": "the decoder", "masked_patch": "the prediction head"}


class SSLRun(NamedTuple):
  """A self-supervised run restored from its checkpoint: the trained module (the encoder with the decoder or the
  prediction head), its variables, the objective, the run's config and the image size its state was saved at."""
  model: Any
  variables: Any
  objective: Any
  config: ml_collections.ConfigDict
  image_size: int


def read_ssl_config(workdir):
  """The run config of `workdir` as a ConfigDict; a UserError unless it is the workdir of a mae or masked_patch run."""
  config_path = workdir_lib.path(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isdir(workdir) or not os.path.isfile(config_path):
    what = "does not exist" if not os.path.exists(workdir) else (
        f"has no {workdir_lib.CONFIG_FILE}" if os.path.isdir(workdir) else "is a file")
    raise UserError(f"--checkpoint={workdir} is not a training workdir ({what}): reconstruction pictures a "
                    "self-supervised run (trainer mae or masked_patch) from its workdir, whose checkpoint holds the "
                    "decoder")
  config = workdir_lib.read_config(workdir)
  trainer = config.get("trainer", "supervised")
  if trainer not in SSL_TRAINERS:
    raise UserError(f"reconstruction pictures a self-supervised run (trainer mae or masked_patch); {workdir} was "
                    f"trained with trainer={trainer}")
  return workdir_lib.with_added_keys(config)


def _read_only_manager(workdir):
  """An orbax manager that only reads the workdir's checkpoints: it creates, cleans up and deletes nothing."""
  return ocp.CheckpointManager(
      os.path.abspath(workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                           save_root_metadata=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})


def _checkpoint_steps(workdir):
  """The step numbers of the workdir's checkpoints, newest first (folders named by a number, as orbax lists them)."""
  directory = workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted((int(name) for name in os.listdir(directory)
                 if name.isdigit() and os.path.isdir(os.path.join(directory, name))), reverse=True)


def load_run(workdir, device=None):
  """The `SSLRun` of `workdir`'s newest checkpoint that restores, laid out on `device` (default: the first one).

  Read-only: steps that fail to restore are skipped (and named in a warning), never moved aside. The weights are
  the ones the run exports (its EMA when `exported_weights` says so). A UserError for a workdir that is not a
  mae / masked_patch run, has no checkpoint, or none that restores."""
  config = read_ssl_config(workdir)
  trainer = config.trainer
  if not _checkpoint_steps(workdir):
    raise UserError(f"{workdir} has no checkpoint; {_CHECKPOINT_ONLY[trainer]} is kept only there "
                    f"({workdir_lib.MODEL_FILE} holds the encoder alone)")
  device = device or jax.devices()[0]
  objective = objectives.get(trainer).from_config(config)
  encoder = train.create_model(config, objective.num_outputs(0), device.platform)
  model = objective.wrap(encoder)
  tx, _ = train.make_optimizer(config)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), [device])
  ema = config.ema_decay > 0

  def target_at(step):  # the checkpoint of step s holds the state that step s - 1 produced, at its resolution
    abstract = jax.eval_shape(steps.make_init_fn(model, tx, train.crop_at(config, step - 1), ema=ema),
                              jax.random.PRNGKey(0))
    shardings = sharding.tree_shardings(abstract, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  manager = _read_only_manager(workdir)
  failures = []
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        state, _ = workdir_lib.restore_checkpoint(manager, step, target_at(step))
        break
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types for damaged files
        failures.append(f"step {step}: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
        workdir_lib._silence_late_read_callbacks()  # pylint: disable=protected-access
    else:
      if not failures:
        raise UserError(f"{workdir} has no checkpoint; {_CHECKPOINT_ONLY[trainer]} is kept only there "
                        f"({workdir_lib.MODEL_FILE} holds the encoder alone)")
      raise UserError(f"no checkpoint in {workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR)} can be restored "
                      f"({'; '.join(failures[:3])})")
  finally:
    manager.close()
  for failure in failures:
    logging.warning("Skipped checkpoint %s (it does not restore; left as it is).", failure)
  logging.info("Restored step %d of %s.", step, workdir)
  params = state.ema_params if workdir_lib.exported_weights(config) == "ema" else state.params
  variables = model_state_lib.variables(params, state.model_state)
  return SSLRun(model, variables, objective, config, int(train.crop_at(config, step - 1)))


def as_trained_model(run, workdir):
  """A `TrainedModel` view of `run` (its test preprocessing and settings) for reading images as visualize does."""
  resize = run.config.pp.get("resize")
  pp = {"crop": run.image_size,
        "resize": int(round(run.image_size * resize / run.config.pp.crop)) if resize else None}
  return trained_model.TrainedModel(model=run.model, params=run.variables["params"], model_config=None,
                                    image_size=run.image_size, pp=pp, class_names=None, run_config=run.config,
                                    source=workdir)


# --- the numbers ------------------------------------------------------------------------------------------------


def _patch(model):
  return tuple(model.encoder.patches["size"])


def unpatchify(pixels, grid, patch, channels):
  """The inverse of `masking.patchify`: [batch, patches, ph * pw * C] -> [batch, H, W, C]."""
  n = pixels.shape[0]
  (rows, cols), (ph, pw) = grid, patch
  x = np.asarray(pixels).reshape(n, rows, cols, ph, pw, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * ph, cols * pw, channels)


def _grid(images, patch):
  return images.shape[1] // patch[0], images.shape[2] // patch[1]


def mae_reconstruction(model, variables, objective, images, rng):
  """(masked, prediction, hidden) of MAE on `images` [n, H, W, C] in [-1, 1], numpy: the images with their hidden
  patches grey, the images with the decoder's pixels in place of the hidden patches (de-normalised per patch with
  `norm_pix_loss`), both clipped to [-1, 1], and hidden [n, patches] bool (the mask `objective.draw_mask(rng, ...)`)."""
  images = np.asarray(images, np.float32)
  patch, channels = _patch(model), images.shape[-1]
  pixels = np.asarray(masking.patchify(jnp.asarray(images), patch))
  keep, restore, hidden = objective.draw_mask(rng, *pixels.shape[:2])
  apply = jax.jit(lambda v, x, keep, restore: model.apply(v, x, keep=keep, restore=restore))
  predicted = np.asarray(apply(variables, jnp.asarray(images), keep, restore), np.float64)
  hidden = np.asarray(hidden)
  if objective.norm_pix_loss:
    mean = pixels.mean(axis=-1, keepdims=True, dtype=np.float64)
    std = np.sqrt(pixels.var(axis=-1, keepdims=True, ddof=1, dtype=np.float64) + mae.NORM_PIX_EPS)
    predicted = predicted * std + mean
  composite = np.where(hidden[..., None], np.clip(predicted, -1.0, 1.0), pixels).astype(np.float32)
  greyed = np.where(hidden[..., None], np.float32(GREY), pixels)
  grid = _grid(images, patch)
  return (np.clip(unpatchify(greyed, grid, patch, channels), -1.0, 1.0),
          unpatchify(composite, grid, patch, channels), hidden)


def level_centres(classes, channels):
  """Colour class ids (`masking.colour_classes`) -> [..., channels] the centre of each channel's level in [-1, 1]:
  class = sum_c level_c * 8 ** (channels - 1 - c), level k covering [-1 + k / 4, -1 + (k + 1) / 4)."""
  levels = 2 ** masking.COLOUR_BITS
  classes = np.asarray(classes)
  digits = np.stack([(classes // levels ** (channels - 1 - c)) % levels for c in range(channels)], axis=-1)
  return -1.0 + (digits + 0.5) * 2.0 / levels


def masked_patch_prediction(model, variables, objective, images, rng):
  """(marked, prediction, corrupted) of masked patch prediction on `images` [n, H, W, C] in [-1, 1], numpy: the
  images with their corrupted patches grey, the images with the head's prediction painted over the corrupted
  patches (the argmax colour's level centres over the patch or over each 4x4 sub-patch; the pixels for `pixels`),
  clipped to [-1, 1], and corrupted [n, patches] bool (`draw_corruption(rng, ...)` with the run's rate and split)."""
  images = np.asarray(images, np.float32)
  patch, channels = _patch(model), images.shape[-1]
  pixels = np.asarray(masking.patchify(jnp.asarray(images), patch))
  n, num_patches, _ = pixels.shape
  corrupted, replace, swap, source = masked_patch.draw_corruption(rng, n, num_patches, rate=objective.corruption_rate,
                                                                  split=objective.corruption_split)
  apply = jax.jit(lambda v, x, corruption: model.apply(v, x, corruption=corruption))
  out = np.asarray(apply(variables, jnp.asarray(images), (replace, swap, source)))
  corrupted = np.asarray(corrupted)
  if objective.target == "pixels":
    predicted = np.clip(out, -1.0, 1.0)
  else:
    cells = 4 if objective.target == "colour_4x4" else 1
    classes = out.reshape(n, num_patches, cells * cells, -1).argmax(axis=-1)  # [n, patches, cells ** 2]
    colours = level_centres(classes, channels).reshape(n, num_patches, cells, 1, cells, 1, channels)
    sub = (patch[0] // cells, patch[1] // cells)
    predicted = np.broadcast_to(colours, (n, num_patches, cells, sub[0], cells, sub[1], channels))
    predicted = predicted.reshape(n, num_patches, -1)  # row by row within the patch, channels last: patchify's order
  painted = np.where(corrupted[..., None], predicted, pixels).astype(np.float32)
  marked = np.where(corrupted[..., None], np.float32(GREY), pixels)
  grid = _grid(images, patch)
  return (np.clip(unpatchify(marked, grid, patch, channels), -1.0, 1.0),
          np.clip(unpatchify(painted, grid, patch, channels), -1.0, 1.0), corrupted)


def predictions(run, images, seed=0):
  """(greyed, predicted) pictures of `run` on `images`, masks from `jax.random.PRNGKey(seed)`."""
  compute = mae_reconstruction if run.config.trainer == "mae" else masked_patch_prediction
  greyed, predicted, _ = compute(run.model, run.variables, run.objective, images, jax.random.PRNGKey(seed))
  return greyed, predicted


# --- the picture ------------------------------------------------------------------------------------------------


def plot(run, images, output, titles=None, seed=0):
  """Writes one row per image to `output`: the input, the input with the hidden / corrupted patches grey, the
  prediction."""
  greyed, predicted = predictions(run, images, seed)
  if run.config.trainer == "mae":
    labels = ("input", f"hidden ({run.objective.mask_ratio:.0%}) greyed", "reconstruction")
    title = "MAE reconstruction: the decoder's pixels for the hidden patches"
  else:
    labels = ("input", f"corrupted ({run.objective.corruption_rate:.0%}) greyed",
              "predicted pixels" if run.objective.target == "pixels" else "predicted mean colour")
    title = f"Masked patch prediction (target {run.objective.target}) on the corrupted patches"
  plt = visualize._pyplot()  # pylint: disable=protected-access
  n = len(images)
  height = 2.6 * n + 0.5  # the rows and the title above them
  fig, axes = plt.subplots(n, 3, figsize=(7.5, height), squeeze=False)
  for i in range(n):
    for ax, panel, label in zip(axes[i], (images[i], greyed[i], predicted[i]), labels):
      ax.imshow(visualize._to_display(panel), interpolation="nearest")  # pylint: disable=protected-access
      ax.set_title(f"{label}\n{titles[i]}" if titles and label == "input" else label, fontsize=9)
      ax.axis("off")
  fig.suptitle(f"{title} (seed {seed})", fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
  return visualize._save(fig, output)  # pylint: disable=protected-access
