"""opdkit: on-policy distillation of language models."""

import os as _os

__version__ = "0.1.0"

# Bounded memory on CPU (issue #14, docs/reliability.md). bfloat16 matmuls on CPU run through oneDNN, which keeps
# every primitive it created in a cache keyed by the input shapes (ONEDNN_PRIMITIVE_CACHE_CAPACITY, default 1024
# entries) and ideep keeps a second one (LRU_CACHE_CAPACITY, default 1024). A trainer's shapes change every step
# (response lengths, the number of scored positions), so both caches fill entry by entry: with the embedded
# default's bf16 teacher, RSS grew ~36 MB per 100 steps for 500 steps, and each entry costs more with a larger
# model. With the caches off RSS is flat and steps were within a few percent of the cached speed (measured with
# scripts/soak.py). Both variables are read by oneDNN/ideep at their first use, so setting them here, before any
# matmul ran, takes effect even after `import torch`; a value already in the environment is kept (set e.g.
# ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024 to get the library defaults back).
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"}
for _key, _value in ONEDNN_CACHE_ENV.items():
    _os.environ.setdefault(_key, _value)
del _key, _value
