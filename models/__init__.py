"""ML models: tokenizer and pipeline builders, the model registry, training and evaluation code.

Imports torch/diffusers lazily inside functions so that `app` can read the registry without them.
"""
