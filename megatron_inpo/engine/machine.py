"""What this machine can run: CUDA and Transformer Engine (imported here only, lazily, and only with CUDA), and the
checks of a model build against them. No torch or megatron import at module level."""
from __future__ import annotations

from typing import Optional

from megatron_inpo.config import ConfigError

_te_checked: Optional[bool] = None


def te_available() -> bool:
    """True when CUDA is available and transformer_engine imports (it must never be imported on CPU)."""
    global _te_checked
    if _te_checked is None:
        import torch

        if not torch.cuda.is_available():
            _te_checked = False
        else:
            try:  # TE raises OSError/RuntimeError (not only ImportError) when its CUDA libraries are missing
                import transformer_engine  # noqa: F401
                import transformer_engine.pytorch  # noqa: F401

                _te_checked = True
            except Exception:
                _te_checked = False
    return _te_checked


def check_model_on_this_machine(cfg, arch, tp: int) -> None:
    """What a ModelConfig (`cfg`) needs of this machine and of the architecture `arch` (engine.model.LlamaArch) at
    `tp` tensor-parallel ranks: CUDA and TE for the TE spec and FP8, and FP8's size constraints on each rank."""
    if cfg.layer_spec == "te" and not te_available():
        raise ConfigError("layer_spec='te' needs CUDA and an importable transformer_engine (install the GPU "
                          "extra); use 'local' or 'auto'")
    if not cfg.fp8:
        return
    if not te_available():
        raise ConfigError("fp8 needs Transformer Engine on a CUDA GPU (transformer_engine does not import "
                          "here); set fp8 to ''")
    if cfg.resolved_layer_spec() != "te":
        raise ConfigError("fp8 needs layer_spec 'te' (or 'auto' with Transformer Engine)")
    for name, n in (("hidden_size", arch.hidden_size), ("intermediate_size", arch.intermediate_size),
                    ("head_dim", arch.head_dim)):
        if n % 16:
            raise ConfigError(f"fp8: FP8 GEMMs need config.json {name}={n} divisible by 16")
    per_rank = (("intermediate_size / TP", arch.intermediate_size, arch.intermediate_size // max(tp, 1)),
                ("num_attention_heads * head_dim / TP", arch.num_heads * arch.head_dim,
                 arch.num_heads * arch.head_dim // max(tp, 1)))
    for name, n, local in per_rank:
        if tp > 1 and (n % tp or local % 16):
            raise ConfigError(f"fp8: FP8 GEMMs need {name} = {n} / {tp} divisible by 16 on each "
                              f"tensor-parallel rank; use a smaller tensor_model_parallel_size")
