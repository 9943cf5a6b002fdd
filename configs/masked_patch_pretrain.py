"""Masked patch prediction, the ViT paper's self-supervised pretraining (App. B.1.2), for ViT-B/16 on ImageNet-1k
(or a folder of unlabelled images: --config.dataset=DIR, labels unused).

  python -m vit_jax.tools.prepare_data --dataset=imagenet2012 --manual_dir=DIR_WITH_THE_TARS
  python -m vit_jax.main --config=configs/masked_patch_pretrain.py --workdir=runs/mpp_b16
  python -m vit_jax.main --config=configs/vit_b16.py:imagenet2012 --workdir=runs/mpp_b16_ft \
      --config.pretrained_path=runs/mpp_b16/model.npz

The paper's recipe: 50% of the patch embeddings corrupted (80% [mask], 10% another patch, 10% kept), the 3-bit
mean colour of each corrupted patch predicted (512 classes), Adam (0.9, 0.999), lr 2e-4, 10k warmup steps, cosine
decay, batch 4096, 1M steps (ca. 14 epochs of JFT-300M: on ImageNet-1k the same number of steps is ~3,200 epochs;
shorten with --config.total_steps). The appendix names no weight decay for this run; none here.
Expected: the paper's ViT-B/16, pretrained so on JFT and fine-tuned on ImageNet, reaches 79.9% top-1 (+2 points over training
from scratch, 4 below supervised JFT pretraining). No published number exists for pretraining on ImageNet-1k alone;
expect less. The 10-shot linear probe on ImageNet (3 draws, 5,000 validation images) every 10k steps is the
paper's yardstick for choosing SSL settings.
"""
from configs import common


def get_config():
  config = common.get_config()
  config.trainer = "masked_patch"
  config.ssl.update({"corruption_rate": 0.5, "corruption_split": (0.8, 0.1, 0.1), "target": "colour"})
  config.model_name = "ViT-B_16"
  config.model.update({"transformer": {"dropout_rate": 0.0}})
  config.dataset = "imagenet2012"
  config.pp.train = "train"
  config.pp.test = "validation"
  config.pp.crop = 224
  config.pp.augment = "inception_crop"
  config.label_smoothing = 0.0
  config.batch = 4096
  config.total_steps = 1_000_000
  config.warmup_steps = 10_000
  config.base_lr = 2e-4
  config.decay_type = "cosine"
  config.optimizer = "adamw"
  config.weight_decay = 0.0
  config.momentum = 0.9
  config.beta2 = 0.999
  config.grad_norm_clip = 1.0
  config.num_workers = 8
  config.checkpoint_every = 2_000
  config.keep_checkpoints = 2
  config.progress_every = 500
  config.fewshot.update({"every": 10_000, "shots": (10,), "seeds": 3, "test_split": "validation[:10%]"})
  return config
