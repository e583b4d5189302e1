"""Megatron-Core dist-checkpoint (any TP / PP, converter output or training checkpoint) -> HF directory.

Streaming: the checkpoint is read with dist_checkpointing one layer at a time (a TP=1 request of that layer's
global tensors; dist_checkpointing gathers the TP shards from the files), mapped to HF names and appended to the
current output shard, which is written when it reaches --max-shard-size. Memory bound: one output shard (at most
max_shard_size, or one tensor when a tensor is larger) + one layer in the checkpoint dtype + the padded embedding.
Output: model-0000i-of-0000N.safetensors + model.safetensors.index.json (or model.safetensors for one shard),
config.json, generation_config.json, tokenizer files; pad rows removed; dtype bf16 by default. Atomic.
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron_inpo.convert import ConvertError
from megatron_inpo.convert.hf_to_mcore import DTYPE_NAMES, arch_for
from megatron_inpo.convert.safetensors_io import INDEX_FILE, SINGLE_FILE
from megatron_inpo.engine import checkpoint as ckpt
from megatron_inpo.engine import mapping as M
from megatron_inpo.engine.checkpoint import META_FILE

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def save_shard(tensors: dict, path: Path) -> None:
    """safetensors' save_file, whose I/O failures (a full disk, a read-only directory) come as SafetensorError
    carrying the OS message: raised again as the OSError they are, naming the file, so that every command reports
    them in one line (errors.describe_os_error) instead of a traceback."""
    import errno

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        msg = str(e)
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            if os.strerror(code) in msg:
                raise OSError(code, os.strerror(code), str(path)) from None
        raise


def parse_size(s) -> int:
    """'5GB', '500MB', '2GiB', or a number of bytes."""
    if isinstance(s, int):
        return s
    t = str(s).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ConvertError(f"--max-shard-size {s!r}: expected e.g. 5GB, 500MB or a byte count") from None


def read_meta(mcore_dir: Path) -> dict:
    """The checkpoint's megatron_inpo.json, read and checked by engine/checkpoint.py; errors as ConvertError."""
    try:
        return ckpt.read_meta(mcore_dir)
    except ckpt.CheckpointError as e:
        raise ConvertError(str(e)) from None


class CheckpointReader:
    """Global (TP=1 layout) tensors of a Megatron torch_dist checkpoint, read region by region.

    Reads the torch.distributed.checkpoint files directly: the `.metadata` lists every stored chunk (offsets,
    sizes) and where its bytes are; a request for one layer of a stacked key reads only the chunks that overlap
    that layer (any TP / PP layout that wrote them) and assembles them. No process group is needed.
    """

    def __init__(self, mcore_dir: Path, layers: int, verify_digests: Optional[bool] = None):
        from megatron_inpo.engine import trust

        self.dir = Path(mcore_dir)
        self.layers = layers
        if not (self.dir / "metadata.json").is_file():
            raise ConvertError(f"{self.dir}: not a dist-checkpoint (no metadata.json)")
        # Before any byte is unpickled: the recorded file digests (one extra read pass; MEGATRON_INPO_NO_VERIFY=1 or
        # verify_digests=False skips it) and the no-code-on-load checks (engine/trust.py), whose restricted
        # unpickler also gives the metadata read here.
        try:
            if trust.verify_enabled(verify_digests):
                trust.verify_digests(self.dir, read_meta(self.dir))
            md = trust.check_loadable(self.dir)
        except trust.TrustError as e:
            raise ConvertError(str(e)) from None
        self.meta = {k: v for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
        self.storage = md.storage_data

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key].properties.dtype

    def _chunk(self, key, offsets) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.storage.get(MetadataIndex(key, offsets))
        if info is None:
            raise ConvertError(f"{self.dir}: metadata has no storage entry for {key} at {tuple(offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise ConvertError(f"{self.dir}: {key} is stored with transforms {info.transform_descriptors} "
                               "(unsupported)")
        path = self.dir / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
        except FileNotFoundError:
            raise ConvertError(f"{path}: missing checkpoint file (needed for {key})") from None
        if len(raw) != info.length:
            raise ConvertError(f"{path}: truncated (needed bytes for {key})")
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"{path}: corrupted chunk of {key} ({e})") from None

    def read(self, key: str, shape: tuple[int, ...], layer: Optional[int] = None) -> torch.Tensor:
        """The whole tensor `key` (layer None) or its slice [layer] along the stacked layer axis."""
        if key not in self.meta:
            raise ConvertError(f"{self.dir}: checkpoint lacks tensor {key!r}")
        tmd = self.meta[key]
        have = tuple(tmd.size)
        want = ((self.layers,) if layer is not None else ()) + tuple(shape)
        if have != want:
            raise ConvertError(f"{self.dir}: {key} has global shape {have}, expected {want} from config.json")
        lo = [layer] + [0] * len(shape) if layer is not None else [0] * len(shape)
        hi = [layer + 1] + list(shape) if layer is not None else list(shape)
        out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=tmd.properties.dtype)
        covered = 0
        for ch in tmd.chunks:
            c_lo, c_sz = list(ch.offsets), list(ch.sizes)
            a = [max(x, y) for x, y in zip(lo, c_lo)]
            b = [min(x, y + s) for x, y, s in zip(hi, c_lo, c_sz)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            t = self._chunk(key, ch.offsets)
            if tuple(t.shape) != tuple(c_sz):
                raise ConvertError(f"{self.dir}: chunk of {key} at {tuple(c_lo)} has shape {tuple(t.shape)}, "
                                   f"metadata says {tuple(c_sz)}")
            src = t[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c_lo))]
            out[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))] = src
            covered += src.numel()
            del t
        if covered != out.numel():
            raise ConvertError(f"{self.dir}: chunks of {key} cover {covered} of {out.numel()} elements "
                               f"(layer {layer}): incomplete checkpoint")
        return out[0] if layer is not None else out

    def load(self, request: dict[str, tuple[str, tuple[int, ...], Optional[int]]]) -> dict[str, torch.Tensor]:
        """request: name -> (checkpoint key, global shape without the layer axis, layer or None)."""
        return {name: self.read(key, shape, layer) for name, (key, shape, layer) in request.items()}


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def convert_mcore_to_hf(mcore_dir, hf_dir, dtype: str = "bf16", max_shard_size="5GB", overwrite: bool = False,
                        progress: bool = True, verify: bool = False, verify_digests: Optional[bool] = None) -> dict:
    """Convert; returns {"bytes", "seconds", "shards", "tensors", "verify_max_abs_err"}. dtype: bf16 | fp16 |
    fp32 | keep (the checkpoint's dtype). verify_digests: check the checkpoint's recorded file digests first
    (None: unless MEGATRON_INPO_NO_VERIFY=1). The tensors stream layer by layer (_hf_tensors) into size-limited
    safetensors shards (_ShardWriter); the configs and the tokenizer follow (_write_side_files)."""
    from tqdm import tqdm

    from megatron_inpo.engine import trust
    from megatron_inpo.files import atomic_directory

    t0 = time.perf_counter()
    mcore_dir, hf_dir = Path(mcore_dir), Path(hf_dir)
    if dtype != "keep" and dtype not in DTYPE_NAMES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {sorted(DTYPE_NAMES) + ['keep']}")
    limit = parse_size(max_shard_size)
    meta = read_meta(mcore_dir)
    arch = arch_for(dict(meta["hf_config"]), mcore_dir / META_FILE)
    reader = CheckpointReader(mcore_dir, arch.num_layers, verify_digests=verify_digests)
    out_dtype = None if dtype == "keep" else DTYPE_NAMES[dtype]
    bar = tqdm(total=arch.num_layers + 2, unit="layer", desc="mcore->hf", disable=not progress)
    with atomic_directory(hf_dir, overwrite=overwrite) as tmp:
        shards = _ShardWriter(tmp, limit, out_dtype)
        for name, t in _hf_tensors(reader, arch, int(meta["padded_vocab_size"]), bar.update):
            shards.add(name, t)
        weight_map = shards.finish()
        bar.close()
        _write_side_files(tmp, meta, mcore_dir, str(out_dtype or reader.dtype(M.EMBED)).replace("torch.", ""))
        # last, over the bytes just written (still in the page cache): what every reader of the export checks
        trust.record_export_digests(tmp)
    summary = {"bytes": shards.written, "seconds": time.perf_counter() - t0, "shards": shards.count,
               "tensors": len(weight_map)}
    if verify:
        from megatron_inpo.convert.verify import verify_mcore_against_hf

        summary["verify_max_abs_err"] = verify_mcore_against_hf(mcore_dir, hf_dir)
    return summary


def _hf_tensors(reader: CheckpointReader, arch, vp: int, done: Callable[[int], Any]):
    """(HF name, tensor) of every weight in the HF order: embedding, each layer, final norm, untied head;
    `done(1)` after each of those parts."""
    H = arch.hidden_size
    emb = reader.load({"e": (M.EMBED, (vp, H), None)})["e"]
    yield M.HF_EMBED, emb[: arch.vocab_size].clone()
    del emb
    done(1)
    for layer in range(arch.num_layers):
        req = {s: (M.LAYER_PREFIX + s, M.megatron_shape(arch, s, vp), layer) for s in M.LAYER_PARAMS}
        yield from M.layer_to_hf(reader.load(req), arch, layer).items()
        done(1)
    top = {"n": (M.FINAL_NORM, (H,), None)}
    if not arch.tie_word_embeddings:
        top["o"] = (M.OUTPUT, (vp, H), None)
    got = reader.load(top)
    yield M.HF_NORM, got["n"]
    if "o" in got:
        yield M.HF_LM_HEAD, got["o"][: arch.vocab_size].clone()
    del got
    done(1)


class _ShardWriter:
    """Tensors into safetensors shards of at most `limit` bytes (one tensor may exceed it alone), named as
    transformers does, with the index file when there is more than one."""

    def __init__(self, directory: Path, limit: int, dtype: Optional[torch.dtype]) -> None:
        self.dir, self.limit, self.dtype = directory, limit, dtype
        self.shards: list[list[str]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written = 0

    @property
    def count(self) -> int:
        return len(self.shards)

    def add(self, name: str, t: torch.Tensor) -> None:
        t = (t if self.dtype is None else t.to(self.dtype)).contiguous()
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.limit:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += n
        self.written += n

    def _flush(self) -> None:
        if self.pending:
            save_shard(self.pending, self.dir / f".shard{len(self.shards)}.safetensors")
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Write what is pending, give the shards their final names; the weight map."""
        from megatron_inpo.files import atomic_write_json

        self._flush()
        n = len(self.shards)
        if n == 1:
            (self.dir / ".shard0.safetensors").rename(self.dir / SINGLE_FILE)
            return {k: SINGLE_FILE for k in self.shards[0]}
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self.shards):
            final = _shard_name(i + 1, n)
            (self.dir / f".shard{i}.safetensors").rename(self.dir / final)
            weight_map.update({k: final for k in names})
        atomic_write_json(self.dir / INDEX_FILE, {"metadata": {"total_size": self.written}, "weight_map": weight_map})
        return weight_map


def _write_side_files(tmp: Path, meta: dict, mcore_dir: Path, dtype_name: str) -> None:
    """config.json (with the written dtype), generation_config.json and the tokenizer files of the checkpoint."""
    from megatron_inpo.files import atomic_write_json

    hf_config = dict(meta["hf_config"])
    hf_config["dtype"] = dtype_name
    hf_config.pop("torch_dtype", None)
    atomic_write_json(tmp / "config.json", hf_config)
    gen = meta.get("generation_config") or {
        k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    atomic_write_json(tmp / "generation_config.json", gen)
    tok = meta.get("tokenizer_dir")
    if tok:
        tok_dir = (mcore_dir / tok) if not Path(tok).is_absolute() else Path(tok)
        if not tok_dir.is_dir():
            raise ConvertError(f"{mcore_dir / META_FILE}: tokenizer_dir {tok_dir} does not exist")
        for p in sorted(tok_dir.iterdir()):
            if p.is_file():
                (tmp / p.name).write_bytes(p.read_bytes())
