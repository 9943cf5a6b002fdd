"""PNG figures of a trained ViT (as in the paper's Figs. 6 and 7) and of a training run.

  python -m vit_jax.tools.visualize attention --checkpoint=runs/quickstart --output=attention.png IMAGE...
  python -m vit_jax.tools.visualize attention --checkpoint=runs/quickstart --dataset=digits --num_images=6
  python -m vit_jax.tools.visualize posemb --checkpoint=ViT-B_16.npz --output=posemb.png
  python -m vit_jax.tools.visualize filters --checkpoint=ViT-B_16.npz --output=filters.png
  python -m vit_jax.tools.visualize distance --checkpoint=runs/quickstart --dataset=digits --num_images=64
  python -m vit_jax.tools.visualize curves --workdir=runs/quickstart            # writes runs/quickstart/curves.png
  python -m vit_jax.tools.visualize compare --workdir=runs/quickstart --workdir=runs/cnn_digits --output=compare.png
  python -m vit_jax.tools.visualize reconstruction --checkpoint=runs/mae_digits --dataset=digits --num_images=6

- attention: attention rollout over each input image: the image, the rollout map, the image masked by it (Fig. 6).
- posemb: cosine similarity of each patch's position embedding with every other patch's, a grid of grids (Fig. 7
  centre).
- filters: the top principal components of the patch-embedding filters, as RGB patches (Fig. 7 left); plain ViTs
  only (a hybrid's patch embedding sees ResNet features, not pixels).
- distance: mean attention distance of every head against depth, over a batch of images (Fig. 7 right).
- curves: loss, accuracy and learning rate of a workdir's metrics.jsonl (`plot_training_curves(workdir)`, which
  `vit_jax.main` calls when training ends).
- compare: two or more runs overlaid (`--workdir` once per run): train and test loss and accuracy against steps and
  against wall time (`comparison_series(workdirs)` holds the numbers); any model family.
- reconstruction: what a self-supervised run (trainer mae or masked_patch; `--checkpoint` its workdir) predicts for
  the patches it did not see, one row per image: the input, the input with the hidden (MAE) or corrupted (masked
  patch) patches greyed out, and the prediction pasted in: MAE's reconstructed pixels, or the predicted mean colour
  of each corrupted patch (`vit_jax.tools.reconstruction`). It restores the run's newest checkpoint (read-only; the
  decoder is not in model.npz); `--seed` draws the masks; `--dataset` defaults to the run's.
attention, posemb, filters and distance picture a Vision Transformer's insides: for a convolutional model (BiT,
CNN) they are a UserError naming the model and its family; curves and compare take any run.
Images come from files (any format, through the test preprocessing) or from `--dataset` (its `--split`).
`--output` is the figure to write (.png, .pdf or .svg); default KIND.png (curves: WORKDIR/curves.png).
"""
import os

from absl import flags, logging
import numpy as np

from vit_jax import models
from vit_jax import workdir as workdir_lib
from vit_jax.data import files
from vit_jax.errors import UserError
from vit_jax.models import geometry
from vit_jax.tools import attention_maps, cli, trained_model

FLAGS = flags.FLAGS
KINDS = ("attention", "posemb", "filters", "distance", "curves", "compare", "reconstruction")
# The pictures of a training run's metrics, which apply to every model family.
RUN_KINDS = ("curves", "compare")
# The pictures of a Vision Transformer's insides: what each is called, and what a convolutional model lacks for it.
_VIT_PICTURES = {
    "attention": ("attention maps", "attention"),
    "distance": ("attention distances", "attention"),
    "posemb": ("position-embedding similarities", "position embeddings"),
    "filters": ("patch-embedding filters", "patch embedding"),
}
FIGURE_FORMATS = (".png", ".pdf", ".svg")
# compare: the four panels' metrics, and the EMA weights' scores drawn dashed beside the raw weights' ones.
COMPARED_METRICS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")
EMA_METRICS = {"test_loss": "test_loss_ema", "test_accuracy": "test_accuracy_ema"}
_DPI = 120


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("checkpoint", "model_name", "image_size", "dataset", "split", "tfds_data_dir", "output")
  flags.DEFINE_integer("num_images", None, "Images from --dataset (default: 6 attention and reconstruction, 32 "
                       "distance).")
  flags.DEFINE_integer("seed", 0, "reconstruction: the masks are drawn from jax.random.PRNGKey(seed).")
  flags.DEFINE_multi_string("workdir", None, "Training workdir: one for `curves`, one per run for `compare`.")


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("figures need matplotlib: pip install matplotlib") from None
  matplotlib.use("Agg")  # files only; no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path):
  plt = _pyplot()
  try:
    cli.write_output(path, lambda p: fig.savefig(p, dpi=_DPI, bbox_inches="tight"))
  finally:
    plt.close(fig)
  logging.info("Wrote %s", path)
  return path


def check_figure_path(output):
  """UserError unless `output` names a figure format matplotlib writes here without extra software."""
  if os.path.splitext(output)[1].lower() not in FIGURE_FORMATS:
    raise UserError(f"--output={output} is not a figure file: end it in {', '.join(FIGURE_FORMATS)}, e.g. "
                    f"{os.path.splitext(output)[0] or 'figure'}.png")


def require_vision_transformer(model_config, kind):
  """UserError naming the model and its family unless `model_config` is a Vision Transformer: the picture `kind`
  shows attention, position or patch-embedding weights that convolutional models do not have."""
  if models.family(model_config) == "vit":
    return
  picture, lacks = _VIT_PICTURES[kind]
  raise UserError(f"{picture} need a Vision Transformer; {models.family_description(model_config)} has no "
                  f"{lacks}; pictures for it: {', '.join(RUN_KINDS)} (of its training workdir)")


def _draw_line(ax, xs, ys, **style):
  """One curve; markers while points are few enough to see one by one."""
  ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, **style)


def _log_scale_if_positive(ax, values):
  """Log scale for losses, which span decades; a linear one when any value is not positive."""
  values = [v for v in values if np.isfinite(v)]
  if values and min(values) > 0:
    ax.set_yscale("log")


def _to_display(image):
  """[-1, 1] model input -> [0, 1] RGB."""
  return np.clip((np.asarray(image) + 1.0) / 2.0, 0.0, 1.0)


def _upsample(grid_map, size):
  """Nearest-neighbour upsampling of a (h, w) map to (size, size): patches stay visible as blocks."""
  rows = np.arange(size) * grid_map.shape[0] // size
  cols = np.arange(size) * grid_map.shape[1] // size
  return grid_map[rows][:, cols]


# --- figures --------------------------------------------------------------------------------------------------


def plot_attention(trained, images, output, titles=None):
  """Attention rollout over each image (rows: image, rollout map, image x map)."""
  config = trained.model_config
  require_vision_transformer(config, "attention")
  attention_maps.require_attention(config, "attention rollout")
  weights = attention_maps.attention_weights(trained.model, trained.params, images)
  maps = attention_maps.rollout_map(attention_maps.rollout(weights), config, trained.image_size)
  plt = _pyplot()
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
  for i in range(n):
    picture = _to_display(images[i])
    mask = _upsample(maps[i], trained.image_size)
    panels = [(picture, "input"), (mask, "attention rollout"), (picture * mask[..., None], "input x rollout")]
    for ax, (panel, label) in zip(axes[i], panels):
      ax.imshow(panel, cmap="inferno" if panel.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
      ax.set_title(f"{label}\n{titles[i]}" if titles and label == "input" else label, fontsize=9)
      ax.axis("off")
  fig.suptitle(f"Attention rollout, {len(weights)} layers", fontsize=11)
  return _save(fig, output)


def posemb_similarity(posemb, grid, num_prefix_tokens):
  """(grid_h, grid_w, grid_h, grid_w) cosine similarities of the patch position embeddings."""
  patches = np.asarray(posemb, np.float64)[0, num_prefix_tokens:]
  if len(patches) != grid[0] * grid[1]:
    raise UserError(f"position embedding has {len(patches)} patch tokens, not a {grid[0]}x{grid[1]} grid")
  unit = patches / np.maximum(np.linalg.norm(patches, axis=-1, keepdims=True), 1e-12)
  return (unit @ unit.T).reshape(grid[0], grid[1], grid[0], grid[1])


def plot_posemb(trained, output):
  config = trained.model_config
  require_vision_transformer(config, "posemb")
  attention_maps.require_attention(config, "position-embedding similarity")
  grid = geometry.grid_shape(config, trained.image_size)
  prefix = geometry.posemb_prefix_tokens(config)
  similarity = posemb_similarity(trained.params["Transformer"]["posembed_input"]["pos_embedding"], grid, prefix)
  gh, gw = grid
  # One mosaic with 1-pixel gaps: readable up to large grids, unlike gh * gw separate axes.
  mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
  for r in range(gh):
    for c in range(gw):
      mosaic[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = similarity[r, c]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 6))
  image = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
  ax.set_xticks([c * (gw + 1) + gw / 2 - 0.5 for c in range(gw)], [str(c + 1) for c in range(gw)], fontsize=7)
  ax.set_yticks([r * (gh + 1) + gh / 2 - 0.5 for r in range(gh)], [str(r + 1) for r in range(gh)], fontsize=7)
  ax.set_xlabel("input patch column")
  ax.set_ylabel("input patch row")
  ax.set_title("Position embedding similarity", fontsize=11)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
  return _save(fig, output)


def filter_components(kernel, count=28):
  """(count, ph, pw, 3) top principal components of the (ph, pw, 3, D) patch-embedding filters, each in [0, 1]."""
  kernel = np.asarray(kernel, np.float64)
  ph, pw, channels, width = kernel.shape
  filters = kernel.reshape(ph * pw * channels, width).T  # one row per filter
  filters = filters - filters.mean(axis=0, keepdims=True)
  _, _, components = np.linalg.svd(filters, full_matrices=False)
  components = components[:count].reshape(-1, ph, pw, channels)
  low = components.min(axis=(1, 2, 3), keepdims=True)
  high = components.max(axis=(1, 2, 3), keepdims=True)
  return (components - low) / np.maximum(high - low, 1e-12)


def plot_filters(trained, output, count=28):
  require_vision_transformer(trained.model_config, "filters")
  kernel = trained.params["embedding"]["kernel"]
  if trained.model_config.get("resnet") is not None or kernel.shape[2] != 3:
    raise UserError("the filter picture needs a plain ViT: this model's patch embedding reads "
                    f"{kernel.shape[2]}-channel ResNet features, not RGB pixels")
  components = filter_components(kernel, count)
  cols = min(7, len(components))
  rows = -(-len(components) // cols)
  plt = _pyplot()
  fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.5), squeeze=False)
  for i, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if i < len(components):
      ax.imshow(components[i], interpolation="nearest")
      ax.set_title(str(i + 1), fontsize=8)
  fig.suptitle(f"RGB embedding filters (first {len(components)} principal components)", fontsize=10)
  return _save(fig, output)


def plot_distance(trained, images, output):
  config = trained.model_config
  require_vision_transformer(config, "distance")
  attention_maps.require_attention(config, "mean attention distance")
  weights = attention_maps.attention_weights(trained.model, trained.params, images)
  grid = geometry.grid_shape(config, trained.image_size)
  stride = geometry.stride(config)
  prefix = geometry.num_prefix_tokens(config)
  distances = np.stack([attention_maps.mean_attention_distance(w, grid, stride, prefix) for w in weights])
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  layers, heads = distances.shape
  for head in range(heads):
    ax.scatter(np.arange(1, layers + 1), distances[:, head], s=18, label=f"head {head + 1}")
  ax.set_xlabel("network depth (layer)")
  ax.set_ylabel("mean attention distance (pixels)")
  ax.set_xticks(range(1, layers + 1))
  ax.set_ylim(0, trained.image_size * np.sqrt(2))
  ax.grid(alpha=0.3)
  if heads <= 16:
    ax.legend(fontsize=7, ncol=2, loc="lower right")
  ax.set_title(f"Mean attention distance over {len(images)} images ({trained.image_size}px)", fontsize=10)
  return _save(fig, output)


def _metrics_records(workdir, plot_when):
  """The records of `workdir`'s metrics.jsonl; a UserError naming the file when it is missing or holds none."""
  records = workdir_lib.read_metrics(workdir)
  if not records:
    raise UserError(f"{workdir_lib.path(workdir, workdir_lib.METRICS_FILE)} holds no metrics yet; {plot_when}")
  return records


def plot_training_curves(workdir, output=None):
  """Writes loss / accuracy / learning-rate curves of `workdir` to `output` (default WORKDIR/curves.png)."""
  records = _metrics_records(workdir, "plot once the run has logged a step")
  output = output or workdir_lib.path(workdir, workdir_lib.CURVES_FILE)
  panels = [("loss", ("train_loss", "test_loss")), ("accuracy", ("train_accuracy", "test_accuracy")),
            ("learning rate", ("learning_rate",))]
  panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in panels]
  panels = [(title, keys) for title, keys in panels if keys]
  if not panels:
    raise UserError(f"{workdir}/{workdir_lib.METRICS_FILE} has no loss, accuracy or learning-rate values to plot")
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
  for ax, (title, keys) in zip(axes[0], panels):
    for key in keys:
      points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
      steps, values = zip(*points)
      _draw_line(ax, steps, values, label=key.replace("_", " "))
    if title == "loss":
      _log_scale_if_positive(ax, [r[k] for k in keys for r in records if r.get(k) is not None])
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(os.path.basename(os.path.normpath(workdir)), fontsize=10)
  fig.tight_layout()
  return _save(fig, output)


def wall_seconds(records):
  """Seconds of training up to each record of a metrics.jsonl, integrated from its `steps_per_sec` (the file has no
  clock): a record's rate covers the steps since the record before it. A record without a rate (an evaluation
  logged between progress steps) takes the next record's, else the previous one's. That is the loop's time (steps,
  their compilation, evaluations); start-up before it and the gap before a resume are not in the file. All NaN
  when no record has a rate."""
  rates = [r.get("steps_per_sec") for r in records]
  rates = [float(v) if isinstance(v, (int, float)) and np.isfinite(v) and v > 0 else None for v in rates]
  if not any(rates):
    return np.full(len(records), np.nan)
  filled, following = [None] * len(rates), None
  for i in reversed(range(len(rates))):
    following = rates[i] or following
    filled[i] = following
  preceding = None
  for i, rate in enumerate(filled):
    filled[i] = preceding = rate or preceding
  seconds, elapsed, previous_step = [], 0.0, 0
  for record, rate in zip(records, filled):
    elapsed += max(record["step"] - previous_step, 0) / rate
    previous_step = max(previous_step, record["step"])
    seconds.append(elapsed)
  return np.asarray(seconds)


def _run_label(workdir, name):
  """`MODEL (NAME)`: the run's model_name from its config.json, when it has one, and `name` (its folder)."""
  has_config = os.path.exists(workdir_lib.path(workdir, workdir_lib.CONFIG_FILE))
  model_name = workdir_lib.read_config(workdir).get("model_name") if has_config else None
  return f"{model_name} ({name})" if model_name else name


def comparison_series(workdirs):
  """{label: {metric: (steps, wall_seconds, values)}} of two or more training workdirs, in the order given: the
  metrics of COMPARED_METRICS and EMA_METRICS that a run logged, as numpy arrays over its records that hold the
  metric; wall seconds from `wall_seconds`. Labels are `MODEL (FOLDER)`; runs whose folders share a name are told
  apart by their paths."""
  if len(workdirs) < 2:
    raise UserError(f"compare needs two or more runs, got {len(workdirs)}: pass --workdir once per run, e.g. "
                    "--workdir=runs/quickstart --workdir=runs/cnn_digits")
  seen = {}
  for workdir in workdirs:
    real = os.path.realpath(workdir)
    if real in seen:
      raise UserError(f"--workdir={workdir} is the same run as --workdir={seen[real]}; pass each run once")
    seen[real] = workdir
  basenames = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  runs = {}
  for workdir, basename in zip(workdirs, basenames):
    records = _metrics_records(workdir, "compare runs once each has logged a step")
    name = basename if basenames.count(basename) == 1 else os.path.normpath(workdir)
    seconds = wall_seconds(records)
    if np.isnan(seconds).all():
      logging.warning("%s has no steps_per_sec: its wall-time curves are left out.", workdir)
    series = {}
    for metric in (*COMPARED_METRICS, *EMA_METRICS.values()):
      points = [(r["step"], t, float(r[metric])) for r, t in zip(records, seconds)
                if isinstance(r.get(metric), (int, float))]
      if points:
        steps, times, values = zip(*points)
        series[metric] = (np.asarray(steps), np.asarray(times), np.asarray(values))
    runs[_run_label(workdir, name)] = series
  return runs


def _time_unit(max_seconds):
  """(seconds per unit, unit name) that keeps wall-time ticks short."""
  if max_seconds >= 3 * 3600:
    return 3600.0, "hours"
  if max_seconds >= 3 * 60:
    return 60.0, "minutes"
  return 1.0, "seconds"


def plot_comparison(workdirs, output="compare.png"):
  """Writes two or more runs' train and test loss and accuracy, against steps (left) and wall time (right), to
  `output` (.png, .pdf or .svg); EMA scores, where a run logged them, dashed in its colour."""
  check_figure_path(output)
  runs = comparison_series(workdirs)
  all_seconds = [t for series in runs.values() for _, times, _ in series.values() for t in times if np.isfinite(t)]
  scale, unit = _time_unit(max(all_seconds, default=0.0))
  plt = _pyplot()
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, axes = plt.subplots(2, 4, figsize=(18, 7.5), squeeze=False)
  for row, quantity in enumerate(("loss", "accuracy")):
    for col, (split, against) in enumerate((("train", "step"), ("test", "step"), ("train", "wall"),
                                            ("test", "wall"))):
      ax, metric = axes[row][col], f"{split}_{quantity}"
      values = []
      for i, series in enumerate(runs.values()):
        for key, linestyle in ((metric, "-"), (EMA_METRICS.get(metric), "--")):
          if key in series:
            steps, times, ys = series[key]
            _draw_line(ax, steps if against == "step" else times / scale, ys, color=colors[i % len(colors)],
                       linestyle=linestyle)
            values.extend(ys)
      if not values:
        ax.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=ax.transAxes, fontsize=9)
      if quantity == "loss":
        _log_scale_if_positive(ax, values)
      ax.set_xlabel("step" if against == "step" else f"wall time ({unit})")
      ax.set_title(f"{split} {quantity}", fontsize=10)
      ax.grid(alpha=0.3)
  handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=label) for i, label in enumerate(runs)]
  if any(ema in series for series in runs.values() for ema in EMA_METRICS.values()):
    handles.append(plt.Line2D([], [], color="gray", linestyle="--", label="EMA weights"))
  fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=9)
  fig.suptitle("Training runs compared (wall time integrated from the logged steps per second)", fontsize=11)
  fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(handles) - 1) // 4), 1, 0.96))
  return _save(fig, output)


# --- CLI ------------------------------------------------------------------------------------------------------


def _images(trained, paths, default_count, default_dataset=None):
  """(images [n, size, size, 3], titles) from files or --dataset (else `default_dataset`)."""
  if paths:
    found, _ = files.expand(paths)
    images, titles, skipped = [], [], []
    for path in found:
      image, reason = files.load(path, trained.pp)
      if image is None:
        skipped.append(f"{path} ({reason})")
        continue
      images.append(image)
      titles.append(os.path.basename(path))
    if skipped:
      logging.warning("Skipped %d unreadable image(s): %s", len(skipped), "; ".join(skipped))
    if not images:
      raise UserError(f"none of the {len(found)} image(s) could be read, e.g. {skipped[0]}")
    return np.stack(images), titles
  dataset = FLAGS.dataset or default_dataset
  if not dataset:
    raise UserError("pass image files or folders, or --dataset=NAME to take images from a dataset")
  from vit_jax import data  # pylint: disable=g-import-not-at-top  (grain/TFDS only when needed)
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  source = data.open_source(dataset, FLAGS.split or trained.run_setting("pp.test", "test"),
                            tfds_data_dir=FLAGS.tfds_data_dir or trained.run_setting("tfds_data_dir"))
  count = min(FLAGS.num_images or default_count, len(source))
  if count < 1:
    raise UserError(f"--num_images={FLAGS.num_images} must be at least 1")
  run = preprocess.EvalPreprocess(trained.pp)
  examples = [run(source[i]) for i in range(count)]
  examples = [e for e in examples if not e["_skipped"]]
  if not examples:
    raise UserError(f"no readable image among the first {count} of {source.description}")
  names = source.class_names
  return np.stack([e["image"] for e in examples]), [f"label {names[int(e['label'])]}" for e in examples]


def _model_config_before_loading(checkpoint, model_name):
  """The registry config of --model_name or of a workdir's config.json, as `trained_model.load` will build it, or
  None for a bare .npz (its architecture is only known once its shapes are read)."""
  if model_name:
    return models.get_model_config(model_name)
  if os.path.isdir(checkpoint) and os.path.exists(workdir_lib.path(checkpoint, workdir_lib.CONFIG_FILE)):
    name = workdir_lib.read_config(checkpoint).get("model_name")
    return models.get_model_config(name) if name else None
  return None


def main(args):
  if not args or args[0] not in KINDS:
    raise UserError(f"usage: python -m vit_jax.tools.visualize {{{'|'.join(KINDS)}}} [--flags] [IMAGE...]; "
                    f"got {' '.join(args[:1]) or 'nothing'}")
  kind, paths = args[0], args[1:]
  output = FLAGS.output or (None if kind == "curves" else f"{kind}.png")
  if output:
    check_figure_path(output)
  workdirs = FLAGS.workdir or []
  if kind in RUN_KINDS and paths:
    raise UserError(f"{kind} takes no image arguments, got {' '.join(paths)}; pass runs as --workdir=DIR")
  if kind == "compare":
    print(f"wrote {plot_comparison(workdirs, output)}")
    return
  if kind == "curves":
    if len(workdirs) > 1:
      raise UserError(f"curves draws one run, got {len(workdirs)} --workdir flags; to overlay runs use compare")
    workdir = workdirs[0] if workdirs else FLAGS.checkpoint
    if not workdir:
      raise UserError("curves needs --workdir=DIR (a training workdir)")
    print(f"wrote {plot_training_curves(workdir, output)}")
    return
  if kind == "reconstruction":
    if not FLAGS.checkpoint:
      raise UserError("reconstruction needs --checkpoint=DIR, the workdir of a mae or masked_patch run")
    from vit_jax.tools import reconstruction  # pylint: disable=g-import-not-at-top  (the training stack, only here)
    run = reconstruction.load_run(FLAGS.checkpoint)
    images, titles = _images(reconstruction.as_trained_model(run, FLAGS.checkpoint), paths, 6, run.config.dataset)
    print(f"wrote {reconstruction.plot(run, images, output, titles, seed=FLAGS.seed)}")
    return
  if not FLAGS.checkpoint:
    raise UserError("--checkpoint is required: a training workdir or a zoo .npz file")
  known_config = _model_config_before_loading(FLAGS.checkpoint, FLAGS.model_name)
  if known_config is not None:  # a convolutional model fails at once, before its weights are read
    require_vision_transformer(known_config, kind)
  trained = trained_model.load(FLAGS.checkpoint, model_name=FLAGS.model_name, image_size=FLAGS.image_size,
                               with_class_names=False)
  require_vision_transformer(trained.model_config, kind)
  if kind == "attention":
    # Checked before reading any image: a model this picture cannot apply to fails at once.
    attention_maps.require_attention(trained.model_config, "attention rollout")
    if trained.model_config.get("classifier") == "unpooled":
      attention_maps.rollout_map(np.ones((1, 1, 1)), trained.model_config, trained.image_size)
    images, titles = _images(trained, paths, 6)
    plot_attention(trained, images, output, titles)
  elif kind == "posemb":
    plot_posemb(trained, output)
  elif kind == "filters":
    plot_filters(trained, output)
  elif kind == "distance":
    attention_maps.require_attention(trained.model_config, "mean attention distance")
    images, _ = _images(trained, paths, 32)
    plot_distance(trained, images, output)
  print(f"wrote {output}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, arguments=True)
