"""DeiT-S (Touvron et al. 2021): ViT-S/16 from scratch on ImageNet-1k with DeiT's augmentation and regularisation.

  python -m vit_jax.tools.prepare_data --dataset=imagenet2012 --manual_dir=DIR_WITH_THE_TARS
  python -m vit_jax.main --config=configs/deit_s.py --workdir=runs/deit_s

Expected: 79.8% top-1 on the ImageNet validation set after 300 epochs (DeiT paper, Table 1; 79.9 in the
facebookresearch/deit README), of the raw weights (`test_accuracy`; DeiT's evaluation does not use its EMA, which it
reports worth about +0.1). The recipe of deit's main.py: batch 1024, AdamW lr 5e-4 x 1024 / 512, weight decay 0.05,
5 warmup epochs, cosine, no clipping, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, CutMix 1.0 (one of them per
batch, switch probability 0.5), label smoothing 0.1, drop path 0.1, EMA 0.99996, resize 256 + central 224 crop at
evaluation. Not here yet, so expect a lower number until they are: random erasing (0.25), repeated augmentation (3
repeats), timm's RandAugment variant (magnitude noise mstd 0.5, per-op probability 0.5, its op set), bicubic and
aspect-preserving resizing, and the final learning rate of 1e-5 (ours decays to 0). docs/recipes.md lists them.
"""
from configs import common

EPOCH_STEPS = 1_281_167 // 1024


def get_config():
  config = common.get_config()
  config.model_name = "ViT-S_16"
  config.model.update({"transformer": {"dropout_rate": 0.0}, "stochastic_depth": 0.1})
  config.dataset = "imagenet2012"
  config.pp.train = "train"
  config.pp.test = "validation"
  config.pp.crop = 224
  config.pp.resize = 256
  config.pp.augment = "inception_crop"  # area 0.05-1 + flip; DeiT's RandomResizedCrop takes 0.08-1
  config.pp.randaug = (2, 9)
  config.pp.mixup = 0.8
  config.pp.cutmix = 1.0
  config.pp.mix_switch_prob = 0.5
  config.label_smoothing = 0.1
  config.batch = 1024
  config.batch_eval = 1024
  config.total_steps = 300 * EPOCH_STEPS
  config.warmup_steps = 5 * EPOCH_STEPS
  config.base_lr = 5e-4 * 1024 / 512
  config.decay_type = "cosine"
  config.optimizer = "adamw"
  config.momentum = 0.9
  config.beta2 = 0.999
  config.weight_decay = 0.05
  config.grad_norm_clip = 0.0
  config.ema_decay = 0.99996
  config.export_ema = False  # the published number is the raw weights'
  config.num_workers = 8
  config.eval_every = 10 * EPOCH_STEPS
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 2
  return config
