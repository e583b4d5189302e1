"""megatron-inpo: Iterative Nash Policy Optimization (arXiv 2407.00617) at cluster scale.

The algorithm (objectives, Nash verification, tournament, data types) is plain torch / Python; Megatron-Core,
Transformer Engine and SGLang are imported lazily, each in one place, so this import works without them.
"""
__version__ = "0.1.0"
