"""Training configs as code: plain data that imports nothing of vit_jax. Each file begins with the command that
runs it and the result it should reach; `common.get_config()` holds every key with its default."""
