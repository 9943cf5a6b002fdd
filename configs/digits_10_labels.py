"""The quickstart ViT on 10 labelled digits per class (100 images): from scratch, or fine-tuned from a
self-supervised run (configs/ssl_digits.py).

  python -m vit_jax.main --config=configs/digits_10_labels.py --workdir=runs/mae_digits_10_labels \
      --config.pretrained_path=runs/mae_digits/model.npz
  python -m vit_jax.main --config=configs/digits_10_labels.py --workdir=runs/scratch_10_labels \
      --config.total_steps=1500   # from scratch, with pretraining's 1200 steps added

Evaluated on all 360 test digits. Expected: the README's table (3 seeds).
"""
from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.pp.train = "train_10_per_class"  # the first 10 training digits of each class (vit_jax.data.sources)
  config.batch = 100  # all of them in every step
  config.total_steps = 300
  config.warmup_steps = 30
  config.eval_every = 100
  config.checkpoint_every = 100
  return config
