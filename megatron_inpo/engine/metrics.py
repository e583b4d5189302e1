"""Training metrics: a FLOP counter for Llama-style models, throughput / MFU, and the per-step scalar log.

FLOPs follow Megatron's current formula (notes/05), causal attention counted half:

    per token, training = 6 * [L*h*(q + 2*kv) + L*q*h + L*3*h*ffn + h*V] + 6*L*q*s

with L layers, h hidden size, q = heads*head_dim, kv = kv_heads*head_dim, ffn the SwiGLU width, V the (padded)
vocabulary and s the sequence length. A forward-only pass (the log-prob pass) is one third of it. MFU is the
achieved FLOP/s divided by a named peak (H100 SXM dense: bf16 989 TFLOP/s, FP8 1,979 TFLOP/s).

Scalars go to a tensorboard event file and, line by line, to `metrics.jsonl` (easy to read from the driver).
Only one process per job writes (the caller decides which; usually global rank 0).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence


@dataclass(frozen=True)
class FlopDims:
    """The shape numbers of a Llama-style decoder that the FLOP formula needs."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, hf: Mapping, padded_vocab_size: int | None = None) -> "FlopDims":
        """Read the dims from a Hugging Face Llama `config.json` dict (padded vocab if given: it is computed)."""
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
        return cls(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=int(hf["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            ffn_hidden_size=int(hf["intermediate_size"]),
            vocab_size=int(padded_vocab_size or hf["vocab_size"]),
        )


def flops_per_token(d: FlopDims, seq_len: int, training: bool = True) -> float:
    """FLOPs spent on one token of a sequence of `seq_len` tokens (training = forward + backward = 3x forward)."""
    L, h = d.num_layers, d.hidden_size
    q = d.num_heads * d.head_dim
    kv = d.num_kv_heads * d.head_dim
    dense = L * h * (q + 2 * kv) + L * q * h + L * 3 * h * d.ffn_hidden_size + h * d.vocab_size
    total = 6.0 * dense + 6.0 * L * q * seq_len
    return total if training else total / 3.0


def batch_flops(d: FlopDims, seq_lens: Sequence[int], training: bool = True) -> float:
    """FLOPs of a batch: each sequence of length s costs s * flops_per_token(s)."""
    return float(sum(s * flops_per_token(d, s, training) for s in seq_lens))


def throughput(flops: float, tokens: int, seconds: float, peak_tflops: float | None) -> dict[str, float]:
    """tokens/s, TFLOP/s and (when a peak is given) MFU for work done in `seconds`."""
    seconds = max(seconds, 1e-12)
    out = {"tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12}
    if peak_tflops:
        out["mfu"] = out["tflops"] / peak_tflops
    return out


class MetricsLog:
    """Per-step scalars to tensorboard (`<dir>/events.*`) and `<dir>/metrics.jsonl`.

    `resume_step` is the first step a resumed run will (re)write.

    A resumed run appends: lines with a step at or beyond the resume step are dropped first, so the jsonl holds
    exactly one line per step, the last one written.
    """

    def __init__(self, log_dir: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) < resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by a crash: everything after it is discarded too
            from megatron_inpo.files import atomic_write_text

            atomic_write_text(path, "".join(k + "\n" for k in kept))
        self._jsonl = open(path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.dir), purge_step=resume_step)

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "train/") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        for k, v in clean.items():
            self._tb.add_scalar(prefix + k, v, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class StageProgress:
    """Rank 0's progress of a stage: a tqdm bar in its own terminal (`bar`) and/or a small JSON file that the
    driver polls to show the stage on one live line (`path`; {"stage", "done", "total", "unit", ...postfix}).

    The file is replaced atomically at each update, so a reader never sees half of it. Both are off on other ranks.
    """

    def __init__(self, stage: str, total: int, initial: int = 0, unit: str = "step", bar: bool = False,
                 path: str = "", enabled: bool = True) -> None:
        self.stage, self.total, self.done, self.unit = stage, total, initial, unit
        self.path = path if enabled else ""
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=stage, unit=unit)
        self._write({})

    def update(self, n: int = 1, **postfix: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()})
        self._write(postfix)

    def _write(self, postfix: Mapping[str, float]) -> None:
        if not self.path:
            return
        from megatron_inpo.files import atomic_write_json

        atomic_write_json(self.path, {"stage": self.stage, "done": self.done, "total": self.total, "unit": self.unit,
                                      "time": time.time(), **{k: float(v) for k, v in postfix.items()}}, indent=None,
                          durable=False)  # rewritten every step; an fsync per step would stall fast GPU steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
