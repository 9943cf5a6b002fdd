"""Defaults every config starts from: every key of the training config, documented once here.

Not a runnable experiment itself; the other files call `common.get_config()` and change what they need, e.g.
  python -m vit_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.trainer = "supervised"  # the training objective (vit_jax.objectives): supervised | masked_patch | mae
  config.ssl = ml_collections.ConfigDict({  # the self-supervised objectives' settings
      "corruption_rate": 0.5,  # masked_patch: share of patch embeddings corrupted
      "corruption_split": (0.8, 0.1, 0.1),  # masked_patch: of those, [mask] embedding / another patch / unchanged
      "target": "colour",  # masked_patch: colour (3-bit mean colour) | colour_4x4 (of 4x4 sub-patches) | pixels (L2)
      "mask_ratio": 0.75,  # mae: share of patches hidden from the encoder
      "decoder_width": 512, "decoder_depth": 8, "decoder_heads": 16,  # mae: the decoder (MAE's for ViT-B/L/H)
      "norm_pix_loss": True,  # mae: targets normalised by each patch's mean and variance
  })

  # Model: a registry name (`python -c "import vit_jax.models as m; print(m.model_names())"`), plus overrides of
  # its fields, e.g. config.model.update(hidden_size=64, transformer={"num_layers": 4}). The speed options are
  # always there, so `--config.model.remat=full` works with every config (docs/benchmarks.md).
  config.model_name = "ViT-B_16"
  config.model = ml_collections.ConfigDict({
      "remat": "none",  # none | full | save_dots: recompute activations in the backward pass to save memory
      "scan_layers": False,  # one scanned encoder block: compile time independent of depth
      "fused_attention": False,  # jax.nn.dot_product_attention (cuDNN flash attention on GPU)
      # Stochastic depth (drop path): the last block's rate, linear from 0 over depth, per example; training only.
      "stochastic_depth": 0.0,
      # Architecture fields a checkpoint may need (docs/use.md); None keeps the registry model's value.
      "classifier": config_dict.placeholder(str),  # token | gap | map | unpooled | token_unpooled
      "num_registers": config_dict.placeholder(int),  # register tokens (timm's reg4 models: 4)
      "no_embed_class": config_dict.placeholder(bool),  # position embeddings on the patches only (DeiT III)
      "fc_norm": config_dict.placeholder(bool),  # the final LayerNorm after pooling
      "gelu_approximate": config_dict.placeholder(bool),  # tanh GELU (the zoo's); False: exact (transformers, timm)
      "layer_norm_eps": config_dict.placeholder(float),  # the zoo's 1e-6; transformers' ViT 1e-12
  })
  config.pretrained_path = config_dict.placeholder(str)  # zoo .npz to fine-tune from; None trains from scratch
  # Compute dtype: auto, bfloat16 or float32; parameters and optimizer state stay float32. auto is bfloat16 on
  # GPU/TPU and on CPUs with bf16 units, float32 on other CPUs, which emulate bf16 and run it slower
  # (vit_jax/models/precision.py, docs/benchmarks.md).
  config.dtype = "auto"

  # Data (vit_jax.data): a TFDS name, `digits` or an image-folder path.
  config.dataset = "cifar10"
  config.tfds_data_dir = config_dict.placeholder(str)
  config.pp = ml_collections.ConfigDict()
  config.pp.train = "train"
  config.pp.test = "test"
  config.pp.crop = 224
  # Progressive resizing: ((start_step, crop), ...) switches the image size at those steps (position embeddings
  # and their optimizer moments are resampled); empty trains at pp.crop throughout.
  config.crop_stages = ()
  config.pp.resize = config_dict.placeholder(int)
  config.pp.augment = "inception_crop"  # inception_crop | affine | none
  # RandAugment (N ops, magnitude M in [0, 30], 10 the usual maximum) on the uint8 crop, e.g. (2, 10); () is off.
  config.pp.randaug = ()
  config.pp.mixup = 0.0  # mixup alpha; 0 is off
  config.pp.cutmix = 0.0  # CutMix alpha; 0 is off
  config.pp.mix_switch_prob = 0.5  # with mixup and cutmix both on: the share of batches that use cutmix
  config.pp.strict = False  # a corrupt image is an error (True) or skipped and counted (False)
  config.num_workers = 0  # grain worker processes; 0 reads in the main process
  config.read_threads = 2  # reader threads per process
  config.prefetch = 2  # device batches prepared ahead

  # Optimisation (vit_jax.optim).
  config.batch = 512
  config.batch_eval = 512
  config.accum_steps = 1  # micro-batches per step: batch / accum_steps examples in memory at a time
  config.total_steps = 10_000
  config.warmup_steps = 500
  config.base_lr = 0.03
  config.decay_type = "cosine"  # cosine | linear | constant | steps
  config.decay_steps = ()  # `steps`: fractions of total_steps where the learning rate drops 10x, e.g. (0.3, 0.6, 0.9)
  config.grad_norm_clip = 1.0  # 0 disables clipping
  config.optimizer = "sgd"  # sgd (momentum) | adamw (decoupled weight decay on kernels)
  config.momentum = 0.9  # SGD momentum, or AdamW's beta1
  config.beta2 = 0.999
  config.momentum_dtype = "float32"  # bfloat16 halves the optimizer state
  config.weight_decay = 0.0
  # Fine-tuning: learning-rate factor decay^(L + 1) for the embeddings, decay^(L - i) for block i of L, 1 for the
  # head (BEiT/MAE); 1.0 is off.
  config.layer_decay = 1.0
  # ((regex over parameter paths, learning-rate multiplier), ...): the first full match wins, unmatched paths get
  # 1, 0 freezes. E.g. train only the head: (("head/.*", 1.0), (".*", 0.0)). A regex matching nothing is an error.
  config.lr_mults = ()
  # An exponential moving average of the weights (e.g. 0.9999; 0 is off), kept sharded in the train state, scored
  # as test_loss_ema / test_accuracy_ema beside the raw weights; export_ema: model.npz holds it (else the raw ones).
  config.ema_decay = 0.0
  config.export_ema = True
  config.label_smoothing = 0.0
  config.loss = "softmax_xent"  # softmax_xent | sigmoid_xent
  config.seed = 0

  # Devices (vit_jax.sharding): sizes of the mesh axes; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # CPU hosts only (vit_jax.host.cpu_devices): JAX devices the cores are split into; 0 = auto (2 per core, at most
  # 8, fewer for large models); small models train faster split (docs/benchmarks.md). Ignored on GPU/TPU.
  config.cpu_devices = 0

  # Bookkeeping. 0 for eval_every/checkpoint_every means only at the end.
  config.progress_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.peak_flops = config_dict.placeholder(float)  # FLOP/s ceiling for MFU; None measures a matmul at start

  # Few-shot linear probes on frozen features during training (vit_jax.evaluators.fewshot); every=0 is off. Unset
  # fields take the run's dataset and preprocessing, e.g. --config.fewshot.every=1000 --config.fewshot.dataset=cifar100.
  config.fewshot = ml_collections.ConfigDict({
      "every": 0,  # steps between few-shot evaluations; 0 = off
      "dataset": config_dict.placeholder(str), "tfds_data_dir": config_dict.placeholder(str),
      "train_split": "train", "test_split": "test",
      "shots": (1, 5, 10, 25), "seeds": 3, "l2_reg": 0.1,  # ridge regularisation on unit-scale features
      "batch": 256,  # images per feature batch
      "crop": config_dict.placeholder(int), "resize": config_dict.placeholder(int),
  })
  return config
