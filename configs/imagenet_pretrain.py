"""Pretrain ViT-B/16 from scratch on ImageNet-1k with the AdamW recipe of the paper (Table 3 / Appendix B.1).

  python -m vit_jax.tools.prepare_data --dataset=imagenet2012 --manual_dir=DIR_WITH_THE_TARS
  python -m vit_jax.main --config=configs/imagenet_pretrain.py --workdir=runs/imagenet_pretrain

Batch 4096, lr 1e-3, weight decay 0.1 (decoupled, kernels only), 10k warmup steps then cosine, 300 epochs,
clip 1.0, dropout 0.1, bf16 compute. Expected: ~74-77% top-1 for ViT-B/16 on ImageNet-1k alone (the paper;
AugReg's stronger augmentation reaches ~79%). Needs a pod slice: `--config.mesh.fsdp=8` shards the state.
`:sigmoid` switches to the sigmoid cross-entropy used for ImageNet-21k pretraining.
"""
from configs import common


def get_config(arg=None):
  config = common.get_config()
  config.model_name = "ViT-B_16"
  config.model.update({"transformer": {"dropout_rate": 0.1}})
  config.dataset = "imagenet2012"
  config.pp.train = "train[:99%]"
  config.pp.test = "validation"
  config.pp.crop = 224
  config.pp.augment = "inception_crop"
  config.batch = 4096
  config.batch_eval = 4096
  config.total_steps = 300 * 1_281_167 // 4096
  config.warmup_steps = 10_000
  config.base_lr = 1e-3
  config.decay_type = "cosine"
  config.optimizer = "adamw"
  config.momentum = 0.9
  config.beta2 = 0.999
  config.weight_decay = 0.1
  config.grad_norm_clip = 1.0
  config.loss = "sigmoid_xent" if arg == "sigmoid" else "softmax_xent"
  config.eval_every = 5000
  config.checkpoint_every = 1000
  return config
