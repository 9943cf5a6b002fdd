"""Few-shot linear probes of a trained model's frozen features (ViT paper, Sec. 4.1), once, from the command line.

  python -m vit_jax.tools.fewshot --checkpoint=runs/quickstart [--dataset=digits --shots=1,5,10,25 --seeds=3]
  python -m vit_jax.tools.fewshot --checkpoint=ViT-B_16.npz --dataset=oxford_iiit_pet --l2_reg=0.1

The probe is `vit_jax.evaluators.fewshot.FewShotEvaluator`, the one training runs every `config.fewshot.every`
steps; it is described there. Images go through the checkpoint's test preprocessing at `--image_size`. The result
is one JSON object on stdout (and in `--output`): `fewshot_{k}shot_accuracy` (mean over seeds) and `..._std`.
"""

from absl import flags

from vit_jax.errors import UserError
from vit_jax.evaluators.fewshot import DEFAULT_L2_REG, DEFAULT_SEEDS, DEFAULT_SHOTS, FewShotEvaluator
from vit_jax.tools import cli, trained_model

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("checkpoint", "model_name", "dataset", "image_size", "tfds_data_dir", "batch_size", "output")
  flags.DEFINE_string("train_split", "train", "Split the shots are drawn from.")
  flags.DEFINE_string("test_split", "test", "Split the probe is scored on.")
  flags.DEFINE_list("shots", [str(k) for k in DEFAULT_SHOTS], "Shots per class.")
  flags.DEFINE_integer("seeds", DEFAULT_SEEDS, "Draws of the shots to average over.")
  flags.DEFINE_float("l2_reg", DEFAULT_L2_REG, "Ridge regularisation (on unit-scale features).")


def fewshot(trained, *, dataset=None, train_split="train", test_split="test", shots=DEFAULT_SHOTS,
            seeds=DEFAULT_SEEDS, l2_reg=DEFAULT_L2_REG, batch_size=256, tfds_data_dir=None):
  """{'checkpoint', 'dataset', 'fewshot_{k}shot_accuracy', ...}; unset `dataset` and `tfds_data_dir` take the
  run's when `trained` comes from a workdir."""
  if not dataset and trained.run_config is None:
    raise UserError("--dataset is required with a .npz checkpoint (a workdir remembers its dataset)")
  dataset = dataset or trained.run_setting("dataset")
  evaluator = FewShotEvaluator(dataset=dataset, pp=trained.pp, train_split=train_split, test_split=test_split,
                               shots=shots, seeds=seeds, l2_reg=l2_reg, batch=batch_size,
                               tfds_data_dir=tfds_data_dir or trained.run_setting("tfds_data_dir"))
  return {"checkpoint": trained.source, "dataset": dataset, **evaluator(trained.variables, trained.model)}


def main():
  if not FLAGS.checkpoint:
    raise UserError("--checkpoint is required: a training workdir or a zoo .npz file")
  try:
    shots = tuple(int(k) for k in FLAGS.shots)
  except ValueError:
    raise UserError(f"--shots={','.join(FLAGS.shots)} must be integers, e.g. --shots=1,5,10,25") from None
  if FLAGS.batch_size < 1:
    raise UserError(f"--batch_size={FLAGS.batch_size} must be at least 1")
  trained = trained_model.load(FLAGS.checkpoint, model_name=FLAGS.model_name, image_size=FLAGS.image_size,
                               with_class_names=False)
  result = fewshot(trained, dataset=FLAGS.dataset, train_split=FLAGS.train_split, test_split=FLAGS.test_split,
                   shots=shots, seeds=FLAGS.seeds, l2_reg=FLAGS.l2_reg, batch_size=FLAGS.batch_size,
                   tfds_data_dir=FLAGS.tfds_data_dir)
  cli.print_json(result, FLAGS.output)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
