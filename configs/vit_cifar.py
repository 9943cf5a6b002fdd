"""The from-scratch course's small CIFAR-10 ViT (ViT-CIFAR_4: patch 4, hidden 256, MLP 512, 8 heads, 6 layers,
dropout 0.2), Adam 3e-4, batch 128, 180 epochs.

  python -m vit_jax.tools.prepare_data --dataset=cifar10
  python -m vit_jax.main --config=configs/vit_cifar.py --workdir=runs/vit_cifar

Expected: ~77% CIFAR-10 test accuracy after 180 epochs (70,200 steps), as the course reports. A few hours on one
GPU; impractical on a laptop CPU.
"""
from configs import common


def get_config():
  config = common.get_config()
  config.model_name = "ViT-CIFAR_4"
  config.dataset = "cifar10"
  config.pp.crop = 32
  config.pp.augment = "affine"
  config.batch = 128
  config.batch_eval = 500
  config.total_steps = 180 * 50_000 // 128
  config.warmup_steps = 0
  config.base_lr = 3e-4
  config.decay_type = "constant"
  config.optimizer = "adamw"  # with weight_decay 0: plain Adam
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.grad_norm_clip = 0.0
  config.eval_every = 390 * 10  # every 10 epochs
  config.checkpoint_every = 390 * 10
  return config
