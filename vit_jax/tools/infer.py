"""Classify images with a trained model: top-k labels and probabilities.

  python -m vit_jax.infer --checkpoint=runs/quickstart digit.png photos/
  python -m vit_jax.infer --checkpoint=ViT-B_16.npz --model_name=ViT-B_16 --labels=imagenet.txt \
      --image_size=384 --top_k=3 --output=preds.jsonl cat.jpg

`--checkpoint` is a training workdir (its config.json gives the model, the test preprocessing and the class
names) or a zoo `.npz` (`--model_name` names its architecture; without it the architecture is read off the
parameter shapes). Images of any size and format go through the test preprocessing; `--image_size` runs the
model at another resolution (position embeddings interpolated). A file that cannot be decoded is skipped,
counted and listed at the end (`--strict` makes it an error). Models trained with `sigmoid_xent` report
per-class sigmoid probabilities, others a softmax.

Each batch is split over all devices (data parallel; `--batch_size` is rounded up to a multiple of their count),
and on a CPU host the cores are split into several devices first, as training does (`--cpu_devices`).
"""
import json
import math
import sys

from absl import app, flags
import jax
import numpy as np
import tqdm

from vit_jax import cpu_devices, image_files, sharding, trained_model
from vit_jax.errors import UserError, run_cli, write_output

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this CLI, defined only when it runs (other CLIs use the same names)."""
  flags.DEFINE_string("checkpoint", None, "Training workdir or zoo .npz file.")
  flags.DEFINE_string("model_name", None, "Registry name of the .npz's model, e.g. ViT-B_16.")
  flags.DEFINE_string("labels", None, "Text file with one class name per line (class-index order).")
  flags.DEFINE_integer("image_size", None, "Resolution to run at; default: the checkpoint's.")
  flags.DEFINE_integer("top_k", 5, "How many labels to report per image.")
  flags.DEFINE_integer("batch_size", 32, "Images per forward pass (rounded up to a multiple of the device count).")
  flags.DEFINE_string("output", None, "Also write one JSON object per image to this .jsonl file.")
  flags.DEFINE_bool("strict", False, "Fail on the first unreadable image instead of skipping it.")
  cpu_devices.define_flag()


def make_predict_fn(model, sigmoid):
  @jax.jit
  def predict(params, images):
    logits = model.apply({"params": params}, images, train=False)
    return jax.nn.sigmoid(logits) if sigmoid else jax.nn.softmax(logits, axis=-1)
  return predict


def top_k(probabilities, k, label):
  order = np.argsort(-probabilities, kind="stable")[:k]
  return [{"label": label(int(i)), "index": int(i), "probability": float(probabilities[i])} for i in order]


def predict_files(trained, paths, *, k=5, batch_size=32, strict=False, progress=False):
  """(predictions [{'path', 'top_k'}], skipped [(path, reason)]) for image files, in the order given."""
  if not trained.num_classes:
    raise UserError(f"checkpoint {trained.source} has no classification head; it gives features, not labels")
  if k < 1:
    raise UserError(f"--top_k={k} must be at least 1")
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size} must be at least 1")
  sigmoid = trained.run_config is not None and trained.run_config.get("loss") == "sigmoid_xent"
  predict = make_predict_fn(trained.model, sigmoid)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  params = jax.device_put(trained.params, sharding.tree_shardings(trained.params, mesh))
  images_sharding = sharding.batch_sharding(mesh)
  batch_size = math.ceil(batch_size / mesh.size) * mesh.size
  predictions, skipped = [], []
  with tqdm.tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
    for batch_paths, images, batch_skipped in image_files.batches(paths, trained.pp, batch_size):
      if batch_skipped and strict:
        path, reason = batch_skipped[0]
        raise UserError(f"cannot read image {path} ({reason}); remove it, or drop --strict to skip such files")
      skipped.extend(batch_skipped)
      if images is not None:
        # Pad the last batch to the full size: one compiled shape for the whole run.
        padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
        padded[:len(images)] = images
        probabilities = np.asarray(predict(params, jax.device_put(padded, images_sharding)))[:len(images)]
        for path, p in zip(batch_paths, probabilities):
          predictions.append({"path": path, "top_k": top_k(p, k, trained.label)})
      bar.update(len(batch_paths) + len(batch_skipped))
  return predictions, skipped


def main(argv):
  if not FLAGS.checkpoint:
    raise UserError("--checkpoint is required: a training workdir or a zoo .npz file")
  trained = trained_model.load(FLAGS.checkpoint, model_name=FLAGS.model_name, image_size=FLAGS.image_size,
                               labels_path=FLAGS.labels)
  # Loading reads numpy arrays only, so JAX has no devices yet; the batch is rounded up to their count.
  cpu_devices.configure(FLAGS.cpu_devices, batch_sizes=(),
                        num_params=sum(leaf.size for leaf in jax.tree.leaves(trained.params)))
  paths, any_folder = image_files.expand(argv[1:])
  predictions, skipped = predict_files(trained, paths, k=FLAGS.top_k, batch_size=FLAGS.batch_size,
                                       strict=FLAGS.strict, progress=any_folder or len(paths) > FLAGS.batch_size)
  for prediction in predictions:
    best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in prediction["top_k"])
    print(f"{prediction['path']}: {best}")
  if FLAGS.output:
    write_output(FLAGS.output, "".join(json.dumps(prediction) + "\n" for prediction in predictions))
  if skipped:
    print(f"skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
    for path, reason in skipped:
      print(f"  {path}: {reason}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: run_cli(main, argv))
