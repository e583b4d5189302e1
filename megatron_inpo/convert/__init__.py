"""Checkpoint converters between Hugging Face Llama-family directories and Megatron-Core dist-checkpoints.

    convert_hf_to_mcore(hf_dir, mcore_dir, tp=1, pp=1, ...)   (megatron_inpo.convert.hf_to_mcore)
    convert_mcore_to_hf(mcore_dir, hf_dir, dtype="bf16", ...)  (megatron_inpo.convert.mcore_to_hf)
Both stream: see their module docstrings for the memory bound.
"""
from megatron_inpo.errors import InputError


class ConvertError(InputError, RuntimeError):
    """Bad input for a conversion; the message names the file, tensor or option."""
