"""PNG figures of a trained ViT (as in the paper's Figs. 6 and 7) and of a training run.

  python -m vit_jax.tools.visualize attention --checkpoint=runs/quickstart --output=attention.png IMAGE...
  python -m vit_jax.tools.visualize attention --checkpoint=runs/quickstart --dataset=digits --num_images=6
  python -m vit_jax.tools.visualize posemb --checkpoint=ViT-B_16.npz --output=posemb.png
  python -m vit_jax.tools.visualize filters --checkpoint=ViT-B_16.npz --output=filters.png
  python -m vit_jax.tools.visualize distance --checkpoint=runs/quickstart --dataset=digits --num_images=64
  python -m vit_jax.tools.visualize curves --workdir=runs/quickstart            # writes runs/quickstart/curves.png

- attention: attention rollout over each input image: the image, the rollout map, the image masked by it (Fig. 6).
- posemb: cosine similarity of each patch's position embedding with every other patch's, a grid of grids (Fig. 7
  centre).
- filters: the top principal components of the patch-embedding filters, as RGB patches (Fig. 7 left); plain ViTs
  only (a hybrid's patch embedding sees ResNet features, not pixels).
- distance: mean attention distance of every head against depth, over a batch of images (Fig. 7 right).
- curves: loss, accuracy and learning rate of a workdir's metrics.jsonl (`plot_training_curves(workdir)`, which
  `vit_jax.main` calls when training ends).
Images come from files (any format, through the test preprocessing) or from `--dataset` (its `--split`).
`--output` is the PNG to write; default KIND.png (curves: WORKDIR/curves.png).
"""
import os

from absl import flags, logging
import numpy as np

from vit_jax import workdir as workdir_lib
from vit_jax.data import files
from vit_jax.errors import UserError
from vit_jax.models import geometry
from vit_jax.tools import attention_maps, cli, trained_model

FLAGS = flags.FLAGS
KINDS = ("attention", "posemb", "filters", "distance", "curves")
_DPI = 120


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("checkpoint", "model_name", "image_size", "dataset", "split", "tfds_data_dir", "output")
  flags.DEFINE_integer("num_images", None, "Images from --dataset (default: 6 attention, 32 distance).")
  flags.DEFINE_string("workdir", None, "Training workdir, for `curves`.")


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
  attention_maps.require_attention(config, "position-embedding similarity")
  grid = geometry.grid_shape(config, trained.image_size)
  prefix = int(geometry.has_class_token(config))
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
  attention_maps.require_attention(config, "mean attention distance")
  weights = attention_maps.attention_weights(trained.model, trained.params, images)
  grid = geometry.grid_shape(config, trained.image_size)
  stride = geometry.stride(config)
  prefix = int(geometry.has_class_token(config))
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


def plot_training_curves(workdir, output=None):
  """Writes loss / accuracy / learning-rate curves of `workdir` to `output` (default WORKDIR/curves.png)."""
  records = workdir_lib.read_metrics(workdir)
  if not records:
    raise UserError(f"{workdir_lib.path(workdir, workdir_lib.METRICS_FILE)} holds no metrics yet; plot once the run "
                    "has logged a step")
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
      ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key.replace("_", " "))
    if title == "loss" and all(v > 0 for k in keys for r in records if k in r for v in [r[k]]):
      ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(os.path.basename(os.path.normpath(workdir)), fontsize=10)
  fig.tight_layout()
  return _save(fig, output)


# --- CLI ------------------------------------------------------------------------------------------------------


def _images(trained, paths, default_count):
  """(images [n, size, size, 3], titles) from files or --dataset."""
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
  if not FLAGS.dataset:
    raise UserError("pass image files or folders, or --dataset=NAME to take images from a dataset")
  from vit_jax import data  # pylint: disable=g-import-not-at-top  (grain/TFDS only when needed)
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  source = data.open_source(FLAGS.dataset, FLAGS.split or trained.run_setting("pp.test", "test"),
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


def main(args):
  if not args or args[0] not in KINDS:
    raise UserError(f"usage: python -m vit_jax.tools.visualize {{{'|'.join(KINDS)}}} [--flags] [IMAGE...]; "
                    f"got {' '.join(args[:1]) or 'nothing'}")
  kind, paths = args[0], args[1:]
  if kind == "curves":
    workdir = FLAGS.workdir or FLAGS.checkpoint
    if not workdir:
      raise UserError("curves needs --workdir=DIR (a training workdir)")
    print(f"wrote {plot_training_curves(workdir, FLAGS.output)}")
    return
  if not FLAGS.checkpoint:
    raise UserError("--checkpoint is required: a training workdir or a zoo .npz file")
  trained = trained_model.load(FLAGS.checkpoint, model_name=FLAGS.model_name, image_size=FLAGS.image_size,
                               with_class_names=False)
  output = FLAGS.output or f"{kind}.png"
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
