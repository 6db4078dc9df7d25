"""Recipes: how a model is adapted, over the core.

`strategies` (what trains: linear probe, partial and gradual unfreezing, LP-FT,
layer-wise learning rates, LoRA, BitFit, L2-SP) and the training methods
`distill`, `domain`, `adversarial`; `quantize` and `deploy` (a trained model
made small and fast). They import the core only; `jtl.recipes.distill`,
`jtl.recipes.strategies`, ... are these modules.
"""
