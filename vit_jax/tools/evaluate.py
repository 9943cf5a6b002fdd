"""Accuracy and loss of a trained model over a whole dataset split, exactly (every example once).

  python -m vit_jax.tools.evaluate --checkpoint=runs/quickstart                 # the run's dataset and test split
  python -m vit_jax.tools.evaluate --checkpoint=ViT-B_16.npz --model_name=ViT-B_16 --dataset=cifar10 --split=test \
      --image_size=384 --output=result.json

Batches come from the data module's exact evaluation iterator (last batch padded, padding masked out) and go
through the classification evaluator training uses (`vit_jax.evaluators.classification`), so the numbers are
those training would log. The result is one JSON object on stdout (and in `--output`): accuracy, loss, number of
examples, and what was evaluated.
"""
import math
import sys

from absl import flags
import jax
import tqdm

from vit_jax import data, host, sharding
from vit_jax.errors import UserError
from vit_jax.evaluators import classification
from vit_jax.tools import cli, trained_model

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("checkpoint", "model_name", "dataset", "split", "image_size", "batch_size", "tfds_data_dir",
                   "strict", "output", "cpu_devices")


def evaluate(trained, *, dataset=None, split=None, batch_size=256, tfds_data_dir=None, strict=False, progress=False):
  """{'accuracy', 'loss', 'num_examples', 'skipped', ...} of `trained` over `split` of `dataset`.

  Unset arguments take the run's (`dataset`, `pp.test`, `tfds_data_dir`) when `trained` comes from a workdir;
  `batch_size` is rounded up to a multiple of the device count.
  """
  if dataset is None and trained.run_config is None:
    raise UserError("--dataset is required with a .npz checkpoint (a workdir remembers its dataset)")
  batch = cli.device_batch(batch_size)
  dataset = dataset or trained.run_setting("dataset")
  split = split or trained.run_setting("pp.test", "test")
  tfds_data_dir = tfds_data_dir or trained.run_setting("tfds_data_dir")
  if not trained.num_classes:
    raise UserError(f"checkpoint {trained.source} has no classification head; evaluate a classifier")
  source = data.open_source(dataset, split, tfds_data_dir=tfds_data_dir)
  if len(source.class_names) != trained.num_classes:
    raise UserError(f"dataset {dataset} has {len(source.class_names)} classes but checkpoint {trained.source} has "
                    f"{trained.num_classes}; evaluate on the dataset it was trained for")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  variable_shardings = sharding.tree_shardings(trained.variables, mesh)
  variables = jax.device_put(trained.variables, variable_shardings)
  eval_step = classification.make_eval_step(trained.model, loss=trained.run_setting("loss", "softmax_xent"),
                                            mesh=mesh, variable_shardings=variable_shardings)
  batches = data.make_eval_iterator(dataset=dataset, split=split, pp={**trained.pp, "strict": strict}, batch=batch,
                                    sharding=sharding.batch_sharding(mesh), tfds_data_dir=tfds_data_dir,
                                    batch_key="--batch_size")
  with tqdm.tqdm(total=math.ceil(len(source) / batch), unit="batch", disable=not progress, file=sys.stderr) as bar:
    metrics = classification.evaluate(eval_step, variables, batches, on_batch=lambda: bar.update(1))
  if not metrics["count"]:
    raise UserError(f"no readable image in {dataset}:{split}")
  if not math.isfinite(metrics["loss"]):  # finite parameters (checked on loading) that still overflow
    raise UserError(f"checkpoint {trained.source} computes a non-finite loss ({metrics['loss']}) on "
                    f"{dataset}:{split}; its parameters are finite, so its activations overflow; use another "
                    "checkpoint")
  return {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "num_examples": metrics["count"],
          "skipped": len(source) - metrics["count"], "dataset": dataset, "split": split,
          "image_size": trained.image_size, "checkpoint": trained.source}


def main():
  if not FLAGS.checkpoint:
    raise UserError("--checkpoint is required: a training workdir or a zoo .npz file")
  trained = trained_model.load(FLAGS.checkpoint, model_name=FLAGS.model_name, image_size=FLAGS.image_size,
                               with_class_names=False)
  # Loading reads numpy arrays only, so JAX has no devices yet; the eval batch is rounded up to their count.
  host.split_cpu_devices(FLAGS.cpu_devices,
                         num_params=lambda: sum(leaf.size for leaf in jax.tree.leaves(trained.params)))
  result = evaluate(trained, dataset=FLAGS.dataset, split=FLAGS.split, batch_size=FLAGS.batch_size,
                    tfds_data_dir=FLAGS.tfds_data_dir, strict=FLAGS.strict, progress=True)
  cli.print_json(result, FLAGS.output)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
