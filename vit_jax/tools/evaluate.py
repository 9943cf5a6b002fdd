"""Accuracy and loss of a trained model over a whole dataset split, exactly (every example once).

  python -m vit_jax.evaluate --checkpoint=runs/quickstart                       # the run's dataset and test split
  python -m vit_jax.evaluate --checkpoint=ViT-B_16.npz --model_name=ViT-B_16 --dataset=cifar10 --split=test \
      --image_size=384 --output=result.json

Batches come from the data module's exact evaluation iterator (last batch padded, padding masked out) and go
through the training loop's eval step, so the numbers are those training would log. The result is one JSON
object on stdout: accuracy, loss, number of examples, and what was evaluated.
"""
import json
import math
import sys

from absl import app, flags
import jax
import ml_collections
import tqdm

from vit_jax import cpu_devices, data, sharding, train, trained_model
from vit_jax.errors import UserError, run_cli, write_output

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this CLI, defined only when it runs (other CLIs use the same names)."""
  flags.DEFINE_string("checkpoint", None, "Training workdir or zoo .npz file.")
  flags.DEFINE_string("model_name", None, "Registry name of the .npz's model, e.g. ViT-B_16.")
  flags.DEFINE_string("dataset", None, "digits, a TFDS name or an image folder; default: the run's.")
  flags.DEFINE_string("split", None, "Split (TFDS syntax, e.g. test or train[:10%]); default: the run's.")
  flags.DEFINE_integer("image_size", None, "Resolution to evaluate at; default: the checkpoint's.")
  flags.DEFINE_integer("batch_size", 256, "Global eval batch (rounded up to the device count).")
  flags.DEFINE_string("tfds_data_dir", None, "Where prepared TFDS datasets live.")
  flags.DEFINE_bool("strict", False, "Fail on a corrupt image instead of skipping and counting it.")
  flags.DEFINE_string("output", None, "Also write the JSON result to this file.")
  cpu_devices.define_flag()


def eval_config(trained, *, dataset=None, split=None, batch_size=256, tfds_data_dir=None, strict=False):
  """The data config of the evaluation: the run's (when known), with the given dataset/split/resolution."""
  run = trained.run_config
  if dataset is None and run is None:
    raise UserError("--dataset is required with a .npz checkpoint (a workdir remembers its dataset)")
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size} must be at least 1")
  devices = jax.device_count()
  config = ml_collections.ConfigDict({
      "dataset": dataset or run.dataset,
      "tfds_data_dir": tfds_data_dir or (run.get("tfds_data_dir") if run is not None else None),
      "pp": {"train": run.pp.get("train", "train") if run is not None else "train",
             "test": split or (run.pp.test if run is not None else "test"),
             "crop": trained.pp.crop, "resize": trained.pp.resize, "strict": strict},
      "batch_eval": math.ceil(batch_size / devices) * devices,
      "num_workers": 0, "read_threads": 2, "prefetch": 2,
      "loss": run.get("loss", "softmax_xent") if run is not None else "softmax_xent",
  })
  return config


def evaluate(trained, config, progress=False):
  """{'accuracy', 'loss', 'num_examples', ...} of `trained` over `config.pp.test` of `config.dataset`."""
  source = data.open_source(config, config.pp.test)
  if not trained.num_classes:
    raise UserError(f"checkpoint {trained.source} has no classification head; evaluate a classifier")
  num_classes = len(source.class_names)
  if num_classes != trained.num_classes:
    raise UserError(f"dataset {config.dataset} has {num_classes} classes but checkpoint {trained.source} has "
                    f"{trained.num_classes}; evaluate on the dataset it was trained for")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  param_shardings = sharding.tree_shardings(trained.params, mesh)
  params = jax.device_put(trained.params, param_shardings)
  eval_step = train.make_eval_step(trained.model, config, mesh, param_shardings)
  steps = math.ceil(len(source) / config.batch_eval)
  totals = None
  with tqdm.tqdm(total=steps, unit="batch", disable=not progress, file=sys.stderr) as bar:
    for batch in data.make_eval_iterator(config, sharding.batch_sharding(mesh)):
      sums = eval_step(params, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      bar.update(1)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  if not count:
    raise UserError(f"no readable image in {config.dataset}:{config.pp.test}")
  return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
          "num_examples": int(count), "skipped": len(source) - int(count), "dataset": config.dataset,
          "split": config.pp.test, "image_size": trained.image_size, "checkpoint": trained.source}


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}; pass options as --flag=value")
  if not FLAGS.checkpoint:
    raise UserError("--checkpoint is required: a training workdir or a zoo .npz file")
  trained = trained_model.load(FLAGS.checkpoint, model_name=FLAGS.model_name, image_size=FLAGS.image_size,
                               with_class_names=False)
  # Loading reads numpy arrays only, so JAX has no devices yet; the eval batch is rounded up to their count.
  cpu_devices.configure(FLAGS.cpu_devices, batch_sizes=(),
                        num_params=sum(leaf.size for leaf in jax.tree.leaves(trained.params)))
  config = eval_config(trained, dataset=FLAGS.dataset, split=FLAGS.split, batch_size=FLAGS.batch_size,
                       tfds_data_dir=FLAGS.tfds_data_dir, strict=FLAGS.strict)
  result = evaluate(trained, config, progress=True)
  text = json.dumps(result, indent=2)
  print(text)
  if FLAGS.output:
    write_output(FLAGS.output, text + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: run_cli(main, argv))
