"""Self-supervised pretraining on the bundled `digits` without their labels: MAE or the paper's masked patch
prediction, then fine-tuning on 10 labels per class (configs/digits_10_labels.py).

  python -m vit_jax.main --config=configs/ssl_digits.py:mae --workdir=runs/mae_digits
  python -m vit_jax.main --config=configs/digits_10_labels.py --workdir=runs/mae_digits_10_labels \
      --config.pretrained_path=runs/mae_digits/model.npz

The quickstart's ViT (width 64, 4 layers, patch 4 on 16 px: 16 patches) on the 1,437 training images; the
10-shot linear probe on frozen features (3 draws) every 300 steps is the yardstick while pretraining. Expected:
the README's table (measured, 3 seeds: pretraining against training from scratch on the same 100 labels).
`arg`: `mae` (default) or `masked_patch`.
"""
from configs import quickstart


def get_config(arg="mae"):
  config = quickstart.get_config()
  config.trainer = arg or "mae"
  config.label_smoothing = 0.0  # a supervised key; the SSL objectives have no labels
  config.ssl.update({"decoder_width": 64, "decoder_depth": 2, "decoder_heads": 4})  # MAE: scaled to the encoder
  config.weight_decay = 0.05  # MAE's AdamW (betas 0.9, 0.95)
  config.beta2 = 0.95
  config.base_lr = 1e-3
  config.fewshot.update({"every": 300, "shots": (10,), "seeds": 3})
  return config
