"""vit_jax: pretrain and fine-tune Vision Transformers with JAX/Flax, from one CPU to pods and clusters."""
__version__ = "0.1.0"
