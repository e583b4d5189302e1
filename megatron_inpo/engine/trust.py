"""Checkpoint integrity (per-file sha256) and loading without trusting (no pickle runs code).

Integrity: a save records `"files": {relative_name: sha256}` in megatron_inpo.json for every file of the checkpoint
directory except megatron_inpo.json itself and tokenizer/; a load (engine/checkpoint.py `load_checkpoint`) and an
export (convert mcore-to-hf) check them first and name the file that differs, is missing or is extra. Cost: one
extra read pass over the checkpoint's files at load (hashing runs at about the speed of the disk) and one at save.
The issue asked for streaming the digests with the read itself; that is not possible here, since
megatron.core.dist_checkpointing (and torch's FileSystemReader under it) opens and reads the files itself, in
pieces and in an order we do not control. Checkpoints written before this record existed load with a warning.
HF exports carry their own record (EXPORT_RECORD, written last by every export), checked by `verify_export` before
a converter, the local rollout engine or SGLang servers read them; an HF directory without one (a hub download) is
read as it is. Skip the checks with `--no-verify` on any command, `MEGATRON_INPO_NO_VERIFY=1`, or
`verify_digests=False` in the Python API.

Loading without trusting: torch's distributed-checkpoint `.metadata` is a pickle (read with `pickle.load`),
`common.pt` and the byte entries of the `.distcp` files (RNG states, TE `_extra_state`) are read with
`torch.load(weights_only=False)`, so a crafted checkpoint could run code on load. Before dist_checkpointing sees a
directory, `check_loadable` reads:
  - `metadata.json`: the torch_dist / torch backends only (another backend would read other pickles);
  - `.metadata` with a restricted unpickler that resolves only the classes torch's DCP metadata holds
    (`METADATA_GLOBALS`, found by listing the globals of real training and converter checkpoints), and checks that
    every storage entry names a plain file of the directory;
  - `common.pt` with `torch.load(weights_only=True)` (a real one holds only dicts, tensors and numbers), where
    there is one: megatron-core 0.16.1 writes the common state there, 0.19 as the byte entry "common_state" of the
    `.distcp` files instead (engine/compat.py, difference 2), which the next check covers;
  - every byte entry with `torch.load(weights_only=True)` plus numpy's array / dtype rebuilders (the RNG state).
Anything else is refused with a CheckpointError naming the file and the global. What stays trusted: Transformer
Engine unpickles its own FP8 `_extra_state` tensors (NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1); this is set only
when the checkpoint's digests verified. The digest record guards against corruption, not against a hostile author
(who can write a matching record): load TE-spec checkpoints only from sources you trust.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from pathlib import Path

from megatron_inpo.errors import InputError

log = logging.getLogger(__name__)

FILES_KEY = "files"
NO_VERIFY_ENV = "MEGATRON_INPO_NO_VERIFY"
_EXCLUDED_TOP = ("megatron_inpo.json", "tokenizer")
_CHUNK = 8 << 20

# Globals of torch's DCP `.metadata` (torch 2.13): listed with a recording pickle.Unpickler over the `.metadata` of a
# converter output (hf->mcore) and of a training checkpoint (optimizer, scheduler, RNG, TE extra state).
METADATA_GLOBALS = frozenset({
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.distributed.checkpoint.planner.SavePlan",
    "torch.distributed.checkpoint.planner.WriteItem",
    "torch.distributed.checkpoint.planner.WriteItemType",
    "torch.distributed.checkpoint.planner.TensorWriteData",
    "torch.serialization._get_layout",
    "torch.Size",
    "pathlib.PosixPath",  # StorageMeta.checkpoint_id of a converter output
    "pathlib.PurePosixPath",
    "pathlib._local.PosixPath",  # Python >= 3.13 spelling
    "pathlib._local.PurePosixPath",
})


class TrustError(InputError, RuntimeError):
    """A checkpoint file fails the digest or the no-code-on-load check; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Digests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def checkpoint_files(ckpt_dir: str | os.PathLike, excluded: tuple[str, ...] = _EXCLUDED_TOP) -> list[str]:
    """Relative names (posix) of the files a digest record covers: all but the top-level entries `excluded`
    (a checkpoint: megatron_inpo.json and tokenizer/; an HF export: its digest record)."""
    root = Path(ckpt_dir)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts[0] in excluded or p.is_dir():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def file_digests(ckpt_dir: str | os.PathLike) -> dict[str, str]:
    """{relative_name: sha256} of a checkpoint directory (one read pass over its files)."""
    root = Path(ckpt_dir)
    return {rel: _sha256(root / rel) for rel in checkpoint_files(root)}


def verify_enabled(verify_digests: bool | None = None) -> bool:
    if verify_digests is not None:
        return bool(verify_digests)
    return os.environ.get(NO_VERIFY_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def verify_digests(ckpt_dir: str | os.PathLike, meta: dict) -> bool:
    """Check the files of `ckpt_dir` against meta["files"]; True when verified, False (with a warning) when the
    checkpoint has no digest record; TrustError naming the file otherwise."""
    root = Path(ckpt_dir)
    recorded = meta.get(FILES_KEY)
    if recorded is None:
        log.warning("%s: no file digests in megatron_inpo.json (written before they were recorded); integrity "
                    "not checked", root)
        return False
    _check_files(root, recorded, set(checkpoint_files(root)), "megatron_inpo.json")
    return True


def _check_files(root: Path, recorded: object, present: set[str], record: str, kind: str = "checkpoint") -> None:
    """`present` (relative names) against the digest record `recorded` read from `root / record` of a `kind`."""
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in recorded.items()):
        raise TrustError(f"{root / record}: field 'files' is not a mapping of file name -> sha256")
    missing = sorted(set(recorded) - present)
    if missing:
        raise TrustError(f"{root / missing[0]}: missing {kind} file (listed in {record}"
                         f"{f', with {len(missing) - 1} more' if len(missing) > 1 else ''})")
    extra = sorted(present - set(recorded))
    if extra:
        raise TrustError(f"{root / extra[0]}: file not in the {kind}'s digest record ({record})"
                         f"{f', with {len(extra) - 1} more' if len(extra) > 1 else ''}; remove it or re-save")
    for rel in sorted(recorded):
        if _sha256(root / rel) != recorded[rel]:
            raise TrustError(f"{root / rel}: sha256 differs from {record} (corrupted or modified file)")


# HF exports (convert mcore-to-hf, the torch engine's exports) carry their own record, a file of the export, since
# config.json belongs to transformers. A directory without one (a download from a model hub) has nothing recorded
# to check and is read as it is.
EXPORT_RECORD = "megatron_inpo.digests.json"
EXPORT_FORMAT = "megatron-inpo hf export digests v1"


def record_export_digests(hf_dir: str | os.PathLike) -> Path:
    """Write `hf_dir/EXPORT_RECORD` with the sha256 of every other file of the directory (call it last, on the
    not yet renamed temporary directory of an atomic export)."""
    from megatron_inpo.files import atomic_write_json

    root = Path(hf_dir)
    files = {rel: _sha256(root / rel) for rel in checkpoint_files(root, (EXPORT_RECORD,))}
    return atomic_write_json(root / EXPORT_RECORD, {"format": EXPORT_FORMAT, FILES_KEY: files})


def verify_export(hf_dir: str | os.PathLike, verify_digests: bool | None = None) -> bool:
    """Check an HF directory against its EXPORT_RECORD before anything reads it. True when verified; False when
    disabled or when the directory has no record (not written by this project); TrustError naming the file that
    is missing, extra or different, or the broken record."""
    root = Path(hf_dir)
    path = root / EXPORT_RECORD
    if not verify_enabled(verify_digests) or not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TrustError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise TrustError(f"{path}: not a megatron-inpo digest record (field 'format' must be {EXPORT_FORMAT!r})")
    _check_files(root, record.get(FILES_KEY), set(checkpoint_files(root, (EXPORT_RECORD,))), EXPORT_RECORD,
                 "export")
    return True


# ----------------------------------------------------------------------------------------------------------------
# No code on load


def _refused(path, what: str) -> TrustError:
    return TrustError(f"{path}: refused: references {what} (not a checkpoint class); this checkpoint may run code "
                      f"on load")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self._path = path

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and "." not in name:
            import torch

            if isinstance(getattr(torch, name, None), torch.dtype):  # torch.float32, torch.bfloat16, ...
                return getattr(torch, name)
        raise _refused(self._path, full)

    def persistent_load(self, pid):
        raise TrustError(f"{self._path}: refused: persistent id in a metadata pickle; this checkpoint may run code "
                         f"on load")


def load_metadata(ckpt_dir: str | os.PathLike):
    """torch DCP Metadata of `ckpt_dir`, read through the restricted unpickler (TrustError on anything else)."""
    path = Path(ckpt_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, path).load()
    except TrustError:
        raise
    except FileNotFoundError:
        raise TrustError(f"{path}: missing (not a complete dist-checkpoint)") from None
    except Exception as e:
        raise TrustError(f"{path}: unreadable metadata ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise TrustError(f"{path}: not a torch distributed-checkpoint Metadata ({type(md).__name__})")
    return md


def _unsafe_globals(raw) -> str:
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(raw)
    except Exception:
        names = []
    return ", ".join(names[:3]) if names else "an unsupported global"


def _weights_only_load(raw: bytes, path, what: str = ""):
    import numpy as np
    import torch

    safe = [np.ndarray, np.dtype, (getattr(np, "_core", None) or np.core).multiarray._reconstruct]
    safe += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _refused(f"{path}{what}", _unsafe_globals(io.BytesIO(raw))) from None
    except Exception as e:
        raise TrustError(f"{path}{what}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def check_loadable(ckpt_dir: str | os.PathLike, check_bytes: bool = True):
    """Everything dist_checkpointing would unpickle in `ckpt_dir`, read without running code first; returns the
    DCP Metadata. TrustError naming the file on a refusal."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    root = Path(ckpt_dir)
    cfg_path = root / "metadata.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrustError(f"{root}: not a dist-checkpoint (no metadata.json)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TrustError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("sharded_backend") != "torch_dist" or \
            cfg.get("common_backend", "torch") != "torch":
        raise TrustError(f"{cfg_path}: refused: only torch_dist checkpoints with a torch common state are loaded "
                         f"(got {cfg!r:.200})")
    md = load_metadata(root)
    files = {}
    for idx, info in (md.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", "..") \
                or not (root / rel).is_file():
            raise TrustError(f"{root / '.metadata'}: refused: storage entry {getattr(idx, 'fqn', idx)!r} names "
                             f"{rel!r}, not a file of the checkpoint directory")
        files[idx] = info
    common = root / "common.pt"
    if common.exists():
        _weights_only_load(common.read_bytes(), common)
    if check_bytes:
        for fqn, item in md.state_dict_metadata.items():
            if not isinstance(item, BytesStorageMetadata):
                continue
            info = files.get(MetadataIndex(fqn))
            if info is None:
                raise TrustError(f"{root / '.metadata'}: byte entry {fqn!r} has no storage entry")
            if getattr(info, "transform_descriptors", None):
                raise TrustError(f"{root / info.relative_path}: refused: byte entry {fqn!r} is stored with "
                                 f"transforms {info.transform_descriptors} (cannot be checked)")
            with open(root / info.relative_path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            _weights_only_load(raw, root / info.relative_path, f" (byte entry {fqn!r})")
    return md
