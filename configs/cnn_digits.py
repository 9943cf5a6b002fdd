"""The course's small CNN on the bundled `digits`, with the ViT quickstart's budget: the CNN side of the comparison.

  python -m vit_jax.main --config=configs/cnn_digits.py --workdir=runs/cnn_digits
  python -m vit_jax.tools.visualize compare --workdir=runs/quickstart --workdir=runs/cnn_digits --output=compare.png

Expected: ~99% test accuracy (360 held-out digits) on a 2-core CPU; the measured table (ViT quickstart, this CNN,
BiT-R50x1 from scratch) is in the README. Same data, resolution (16 px), augmentation, optimizer, schedule, batch
and steps as configs/quickstart.py: only the model differs.
"""
from configs import quickstart


def get_config(arg=None):
  """`arg`: a registry name to train instead of the course CNN, e.g. `configs/cnn_digits.py:BiT-R50x1` (BiT needs
  at least 32 px: the crop is raised to 32 for it)."""
  config = quickstart.get_config()
  config.model_name = arg or "CNN-CIFAR"
  for key in ("hidden_size", "patches", "transformer"):  # the quickstart ViT's size overrides
    del config.model[key]
  if config.model_name.startswith("BiT-"):
    config.pp.crop = 32
  return config
