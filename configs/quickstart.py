"""Quickstart: a small ViT from scratch on the bundled `digits` (1,797 8x8 handwritten digits), on a laptop CPU.

  make train
  # or: python -m vit_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Expected: >= 98% test accuracy (360 held-out digits) in a few minutes on a 2-core CPU (docs/benchmarks.md has the
measurements per host). The last line of runs/quickstart/metrics.jsonl has the figure.
A 4-layer ViT of width 64 on the digits upsampled to 16 px (patch 4: 16 tokens + class token), AdamW with
label smoothing and small random affine augmentation; plain shifts reach only ~96%.
"""
from configs import common


def get_config():
  config = common.get_config()
  config.model_name = "testing"
  config.model.update({"hidden_size": 64, "patches": {"size": (4, 4)},
                       "transformer": {"num_layers": 4, "mlp_dim": 128, "num_heads": 4, "dropout_rate": 0.0}})
  config.dataset = "digits"
  config.pp.crop = 16
  config.pp.augment = "affine"
  config.batch = 128
  config.batch_eval = 512
  config.total_steps = 1200  # ~100 epochs of the train split
  config.warmup_steps = 100
  config.base_lr = 2e-3
  config.optimizer = "adamw"
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  config.progress_every = 50
  config.eval_every = 300
  config.checkpoint_every = 300
  return config
