"""Reading HF safetensors checkpoints tensor by tensor (and row range by row range) with plain file reads.

No mmap: each read allocates exactly the requested bytes, which are freed as soon as the caller drops them, so the
converter's resident memory is bounded by what it holds, not by the page cache of the files it has touched.
Headers are validated up front (a truncated or corrupted file is reported by name before anything is written).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_inpo.convert import ConvertError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header (ConvertError names the file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConvertError(f"{path}: corrupted safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise ConvertError(f"{path}: corrupted safetensors file (header length {n} exceeds the file)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ConvertError(f"{path}: corrupted safetensors file (header is a JSON {type(header).__name__}, not "
                               "an object)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: corrupted safetensors file (header is not valid JSON: {e})") from None
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing safetensors shard") from None
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise ConvertError(f"{path}: corrupted safetensors header entry {name!r} (not an object)")
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(x) for x in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{path}: corrupted safetensors header entry {name!r} ({e!r})") from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise ConvertError(f"{path}: corrupted safetensors file: tensor {name!r} bytes [{begin}, {end}) do not "
                               f"match its shape {list(shape)} / the file size {size} (truncated?)")
        out[name] = TensorInfo(path, dtype, shape, base + begin, nbytes)
    return out


def _shard_name_error(name: object) -> str | None:
    """Why an index's file name is refused (None: a plain relative path inside the model directory)."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name:
        return "contains a NUL byte"
    if os.path.isabs(name):
        return "is an absolute path"
    if ".." in Path(name).parts:
        return "leaves the model directory"
    return None


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of `model.safetensors.index.json`: tensor name -> shard file, each a relative path inside
    the model directory. An absolute path or one with '..' (an index naming /etc/passwd, or ../other/model) is
    refused with a ConvertError naming the entry; symlinks inside the directory (the HF hub cache) are followed as
    usual."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{index}: invalid index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index}: invalid index (no 'weight_map' mapping of tensor name -> file)")
    for name, f in weight_map.items():
        why = _shard_name_error(f)
        if why:
            raise ConvertError(f"{index}: weight_map entry {name!r}: file {f!r} {why}; shards must be files inside "
                               f"{index.parent}")
    return weight_map


class SafetensorsSource:
    """All tensors of an HF directory (sharded with an index, or a single model.safetensors)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.exists():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.dir / f).exists():
                    raise ConvertError(f"{self.dir / f}: missing safetensors shard (listed in {index})")
        elif (self.dir / SINGLE_FILE).exists():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise ConvertError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE} (only safetensors checkpoints are "
                               "supported)")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(self.dir / f).items():
                if weight_map is not None and weight_map.get(name) != f:
                    continue  # the index is authoritative
                self.tensors[name] = info
        if weight_map is not None:
            for name, f in weight_map.items():
                if name not in self.tensors:
                    raise ConvertError(f"{self.dir / f}: tensor {name!r} listed in {INDEX_FILE} is not in the file")
        self.total_bytes = sum(i.nbytes for i in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ConvertError(f"{self.dir}: checkpoint lacks tensor {name!r}")
        return self.tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [a, b) of it along dim 0), freshly allocated."""
        info = self.info(name)
        shape = list(info.shape)
        start, nbytes = info.start, info.nbytes
        if rows is not None:
            a, b = rows
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start += a * row_bytes
            nbytes = (b - a) * row_bytes
            shape[0] = b - a
        buf = bytearray(nbytes)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(start)
            view = memoryview(buf)
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ConvertError(f"{info.file}: truncated while reading {name!r}")
                got += n
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).view(shape)
