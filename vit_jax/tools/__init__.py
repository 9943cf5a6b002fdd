"""The command-line tools, each run as `python -m vit_jax.tools.NAME` (training itself is `python -m vit_jax.main`):
`infer`, `evaluate`, `fewshot` and `visualize` use a trained model (`trained_model` loads a workdir or a zoo `.npz`,
`attention_maps` computes what the pictures show); `convert` exports to and imports from timm; `benchmark` and
`memory` measure and plan speed and memory; `inspect` reads a zoo file; `prepare_data` and `data_benchmark` prepare
and time datasets; `check_distributed` tests a multi-process launch. Flags they share, the `--output` writer and
the entry helper live in `cli`. Tools sit at the top of the import graph: they import the library, and library
code never imports a tool (the train CLI `vit_jax.main` draws the curves of a finished run with `visualize`).
"""
