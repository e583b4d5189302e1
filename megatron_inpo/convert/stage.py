"""One conversion as a typed call: `run_convert(ConvertStageConfig)`, what `megatron-inpo convert` and the driver's
import / export stages (in the stage worker or a subprocess) run. torch and Megatron-Core are imported only once a
conversion starts."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_inpo.config import ConfigError

DIRECTIONS = ("hf-to-mcore", "mcore-to-hf")


@dataclass
class ConvertStageConfig:
    """One conversion between a Hugging Face directory and a Megatron-Core dist-checkpoint."""

    direction: str = "hf-to-mcore"
    """'hf-to-mcore' (writes mcore_dir) or 'mcore-to-hf' (writes hf_dir)."""
    hf_dir: str = ""
    """The HF model directory: the input of hf-to-mcore, the output of mcore-to-hf (written atomically)."""
    mcore_dir: str = ""
    """The checkpoint directory: the output of hf-to-mcore (written atomically), the input of mcore-to-hf."""
    tp: int = 1
    """hf-to-mcore: target tensor parallel size (sets the vocab padding)."""
    pp: int = 1
    """hf-to-mcore: target pipeline parallel size (checked against the layers)."""
    dtype: str | None = None
    """Parameter dtype written: bf16, fp16, fp32 (mcore-to-hf also 'keep'); None: hf-to-mcore keeps the HF dtype,
    mcore-to-hf writes bf16."""
    layer_spec: str = "local"
    """hf-to-mcore: the layer spec recorded for the engine, 'local' or 'te' (checkpoint keys are the same)."""
    vocab_divisor: int = 128
    """hf-to-mcore: pad the vocab to a multiple of this x TP."""
    max_shard_size: str = "5GB"
    """mcore-to-hf: safetensors shard size limit, e.g. 5GB, 500MB."""
    overwrite: bool = False
    """Replace an existing output directory."""
    verify: bool = False
    """Afterwards compare logits of both checkpoints (convert/verify.py); a failure removes the output."""
    progress: bool = True
    """A progress bar."""

    def validate(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction: one of {list(DIRECTIONS)}, got {self.direction!r}")

    @property
    def output(self) -> str:
        """The directory this conversion writes."""
        return self.mcore_dir if self.direction == "hf-to-mcore" else self.hf_dir


def run_convert(cfg: ConvertStageConfig) -> dict:
    """Convert (and verify, if asked); the summary: sizes, seconds and verify_* figures."""
    cfg.validate()
    if cfg.direction == "hf-to-mcore":
        from megatron_inpo.convert.hf_to_mcore import convert_hf_to_mcore

        summary = convert_hf_to_mcore(cfg.hf_dir, cfg.mcore_dir, tp=cfg.tp, pp=cfg.pp, dtype=cfg.dtype,
                                      layer_spec=cfg.layer_spec, make_vocab_size_divisible_by=cfg.vocab_divisor,
                                      overwrite=cfg.overwrite, progress=cfg.progress)
    else:
        from megatron_inpo.convert.mcore_to_hf import convert_mcore_to_hf

        summary = convert_mcore_to_hf(cfg.mcore_dir, cfg.hf_dir, dtype=cfg.dtype or "bf16",
                                      max_shard_size=cfg.max_shard_size, overwrite=cfg.overwrite,
                                      progress=cfg.progress)
    if cfg.verify:  # a failed verify removes the output it checked
        from megatron_inpo.convert.verify import verify_output

        if not cfg.progress:  # transformers' "Loading weights" bar too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        summary.update(verify_output(cfg.mcore_dir, cfg.hf_dir, cfg.output))
    return summary
