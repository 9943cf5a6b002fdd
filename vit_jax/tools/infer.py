"""Classify images with a trained model: top-k labels and probabilities.

  python -m vit_jax.tools.infer --checkpoint=runs/quickstart digit.png photos/
  python -m vit_jax.tools.infer --checkpoint=ViT-B_16.npz --model_name=ViT-B_16 --labels=imagenet.txt \
      --image_size=384 --top_k=3 --output=preds.jsonl cat.jpg

`--checkpoint` is a training workdir (its config.json gives the model, the test preprocessing and the class
names) or a zoo `.npz` (`--model_name` names its architecture; without it the architecture is read off the
parameter shapes), of any model family: ViT, BiT ResNet-v2 (a big_transfer file too) or the course CNN. Images of
any size and format go through the test preprocessing; `--image_size` runs the model at another resolution
(a ViT's position embeddings interpolated; BiT takes any size of at least 32 px; the CNN only its trained size). A file that cannot be decoded is skipped,
counted and listed at the end (`--strict` makes it an error). Models trained with `sigmoid_xent` report
per-class sigmoid probabilities, others a softmax.

Each batch is split over all devices (data parallel; `--batch_size` is rounded up to a multiple of their count),
and on a CPU host the cores are split into several devices first, as training does (`--cpu_devices`; why and by
how much: docs/benchmarks.md). `--output` writes one JSON object per image (JSON lines).
"""
import json
import sys

from absl import flags
import jax
import numpy as np
import tqdm

from vit_jax import host, sharding
from vit_jax.data import files
from vit_jax.errors import UserError
from vit_jax.tools import cli, trained_model

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("checkpoint", "model_name", "labels", "image_size", "batch_size", "output", "strict",
                   "cpu_devices", batch_size=32)
  flags.DEFINE_integer("top_k", 5, "How many labels to report per image.")


def make_predict_fn(model, sigmoid):
  @jax.jit
  def predict(variables, images):
    logits = model.apply(variables, images, train=False)
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
  sigmoid = trained.run_setting("loss") == "sigmoid_xent"
  predict = make_predict_fn(trained.model, sigmoid)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  variables = jax.device_put(trained.variables, sharding.tree_shardings(trained.variables, mesh))
  images_sharding = sharding.batch_sharding(mesh)
  batch_size = cli.device_batch(batch_size, mesh.size)
  predictions, skipped = [], []
  with tqdm.tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
    for batch_paths, images, batch_skipped in files.batches(paths, trained.pp, batch_size):
      if batch_skipped and strict:
        path, reason = batch_skipped[0]
        raise UserError(f"cannot read image {path} ({reason}); remove it, or drop --strict to skip such files")
      skipped.extend(batch_skipped)
      if images is not None:
        # Pad the last batch to the full size: one compiled shape for the whole run.
        padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
        padded[:len(images)] = images
        probabilities = np.asarray(predict(variables, jax.device_put(padded, images_sharding)))[:len(images)]
        if not np.isfinite(probabilities).all():  # finite parameters (checked on loading) that still overflow
          path = batch_paths[int(np.flatnonzero(~np.isfinite(probabilities).all(axis=1))[0])]
          raise UserError(f"checkpoint {trained.source} computes non-finite probabilities (NaN or infinity) for "
                          f"{path}; its parameters are finite, so its activations overflow; use another "
                          "checkpoint")
        for path, p in zip(batch_paths, probabilities):
          predictions.append({"path": path, "top_k": top_k(p, k, trained.label)})
      bar.update(len(batch_paths) + len(batch_skipped))
  return predictions, skipped


def main(args):
  if not FLAGS.checkpoint:
    raise UserError("--checkpoint is required: a training workdir or a zoo .npz file")
  trained = trained_model.load(FLAGS.checkpoint, model_name=FLAGS.model_name, image_size=FLAGS.image_size,
                               labels_path=FLAGS.labels)
  # Loading reads numpy arrays only, so JAX has no devices yet; the batch is rounded up to their count.
  host.split_cpu_devices(FLAGS.cpu_devices,
                         num_params=lambda: sum(leaf.size for leaf in jax.tree.leaves(trained.params)))
  paths, any_folder = files.expand(args)
  predictions, skipped = predict_files(trained, paths, k=FLAGS.top_k, batch_size=FLAGS.batch_size,
                                       strict=FLAGS.strict, progress=any_folder or len(paths) > FLAGS.batch_size)
  for prediction in predictions:
    best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in prediction["top_k"])
    print(f"{prediction['path']}: {best}")
  if FLAGS.output:
    cli.write_output(FLAGS.output, "".join(json.dumps(prediction) + "\n" for prediction in predictions))
  if skipped:
    print(f"skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
    for path, reason in skipped:
      print(f"  {path}: {reason}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  cli.run(main, arguments=True)
