"""MAE pretraining (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") on ImageNet-1k without
labels: ViT-B/16 (default), `:L_16` or `:H_14`.

  python -m vit_jax.tools.prepare_data --dataset=imagenet2012 --manual_dir=DIR_WITH_THE_TARS
  python -m vit_jax.main --config=configs/mae_pretrain.py --workdir=runs/mae_b16
  python -m vit_jax.main --config=configs/mae_finetune.py --workdir=runs/mae_b16_ft \
      --config.pretrained_path=runs/mae_b16/model.npz

MAE's recipe (its Table 8): 75% of the patches masked at random per image, the encoder on the rest, a decoder of
width 512, depth 8, 16 heads, loss on per-patch normalised pixels of the masked patches; AdamW (0.9, 0.95), base lr
1.5e-4 x batch / 256 (batch 4096: 2.4e-3), weight decay 0.05, 40 warmup epochs, cosine, 800 epochs (1600 for the
paper's best), no gradient clipping, random resized crop + flip. Expected (published) after fine-tuning (configs/mae_finetune.py)
on ImageNet: B/16 83.6%, L/16 85.9%, H/14 86.9% top-1 (1600 epochs). Differences here: our random resized crop
draws 5-100% of the area (MAE: 20-100%), and the encoder keeps its learned position embeddings (MAE: fixed sin-cos;
the decoder's are sin-cos here too). The 10-shot linear probe (3 draws, 5,000 validation images) every 10k steps.
"""
from configs import common

_MODELS = {"B_16": "ViT-B_16", "L_16": "ViT-L_16", "H_14": "ViT-H_14"}


def get_config(arg="B_16"):
  config = common.get_config()
  config.trainer = "mae"
  config.ssl.update({"mask_ratio": 0.75, "decoder_width": 512, "decoder_depth": 8, "decoder_heads": 16,
                     "norm_pix_loss": True})
  config.model_name = _MODELS[arg or "B_16"]
  config.model.update({"transformer": {"dropout_rate": 0.0}})
  config.dataset = "imagenet2012"
  config.pp.train = "train"
  config.pp.test = "validation"
  config.pp.crop = 224
  config.pp.augment = "inception_crop"
  config.label_smoothing = 0.0
  config.batch = 4096
  steps_per_epoch = 1_281_167 // config.batch
  config.total_steps = 800 * steps_per_epoch
  config.warmup_steps = 40 * steps_per_epoch
  config.base_lr = 1.5e-4 * config.batch / 256
  config.decay_type = "cosine"
  config.optimizer = "adamw"
  config.momentum = 0.9
  config.beta2 = 0.95
  config.weight_decay = 0.05
  config.grad_norm_clip = 0.0
  config.num_workers = 8
  config.checkpoint_every = 2_000
  config.keep_checkpoints = 2
  config.progress_every = 500
  config.fewshot.update({"every": 10_000, "shots": (10,), "seeds": 3, "test_split": "validation[:10%]"})
  return config
