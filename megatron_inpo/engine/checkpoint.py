"""Megatron checkpoints: megatron.core.dist_checkpointing (torch_dist) save / load, atomic, reshardable.

Layout (the project's checkpoint convention, shared with the converter):

    <root>/step_00000012/          one checkpoint; the directory itself is the dist-checkpoint
        metadata.json, *.distcp, [common.pt]      dist_checkpointing files (common.pt: written by megatron-core
                                                   0.16.1 and by the converter; 0.19 keeps the common state in
                                                   the .distcp files instead; both load on both, engine/compat.py)
                                                   top-level keys:
            "model"      model.sharded_state_dict()   (the only key in a converter output)
            "optimizer"  optimizer.sharded_state_dict(model)     (training checkpoints)
            "scheduler"  OptimizerParamScheduler.state_dict()    (common, replicated)
            "rng"        per (pp, tp) rank: python / numpy / torch / cuda / Megatron tracker states
            "data"       data position (step, epoch, data file digest) (common)
        megatron_inpo.json         {"format_version": 1, "hf_config", "padded_vocab_size", "tp", "pp", "layer_spec",
                                    "step", "tokenizer_dir", "optimizer_format",
                                    "files": {relative_name: sha256}} -- written last, before the rename
        tokenizer/                 copy of the tokenizer files, when known

Atomicity: every rank writes into `<root>/.step_00000012.tmp-<nonce>`; after all ranks finished, rank 0 writes
megatron_inpo.json and renames the directory to its final name. Discovery (`latest_checkpoint`) only considers
`step_*` names holding megatron_inpo.json, so a checkpoint cut by a crash is never picked up.

Loading into a different TP / PP is dist_checkpointing's resharding: the model and the non-distributed optimizer
reshard; the distributed optimizer's state loads at the TP / PP that saved it (any DP), and a different layout is a
clear error; the RNG states only load into the layout that saved them (a warning otherwise).

Integrity and trust (engine/trust.py): "files" holds the sha256 of every file but megatron_inpo.json and tokenizer/;
a load checks them (MEGATRON_INPO_NO_VERIFY=1 or verify_digests=False skips) and, always, reads every pickle
dist_checkpointing would unpickle without running code first (`.metadata` through an allow-list, `common.pt` and the
byte entries with weights_only=True), refusing the checkpoint with a CheckpointError naming the file otherwise.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from megatron_inpo.errors import InputError

log = logging.getLogger(__name__)

META_FILE = "megatron_inpo.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message names the directory."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def read_meta(path: str | os.PathLike) -> dict:
    """megatron_inpo.json of a checkpoint directory (raises CheckpointError naming the path)."""
    p = Path(path) / META_FILE
    if not p.exists():
        raise CheckpointError(f"{path}: not a megatron-inpo checkpoint (no {META_FILE}; incomplete or wrong path)")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{p}: invalid UTF-8 (byte {e.start})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got a {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("hf_config", "padded_vocab_size", "tp", "pp"):
        if key not in meta:
            raise CheckpointError(f"{p}: missing field {key!r}")
    if not isinstance(meta["hf_config"], dict):
        raise CheckpointError(f"{p}: field 'hf_config' must be a JSON object")
    for key in ("padded_vocab_size", "tp", "pp"):
        if type(meta[key]) is not int or meta[key] < 1:
            raise CheckpointError(f"{p}: field {key!r} must be a positive integer, got {meta[key]!r}")
    return meta


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and (child / META_FILE).is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------------------------
# RNG


def _rng_state() -> dict:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict | None):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state", state, (pp, tp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


# ----------------------------------------------------------------------------------------------------------------
# Save / load


def _unwrap(model: Any) -> Any:
    # DDP and Float16Module both expose `.module`; GPTModel does not.
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_sharded(model_chunks: list) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    return _unwrap(model_chunks[0]).sharded_state_dict()


def _broadcast_str(s: str) -> str:
    import torch.distributed as dist

    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


# How optimizer state is laid out in a checkpoint (megatron_inpo.json "optimizer_format"):
#   "per_parameter"   Megatron's (mixed-precision) optimizer: state sharded like the model, so it loads at any TP/PP/DP.
#   "dp_reshardable"  the distributed optimizer: each rank's flat buffers; it loads at the same TP and PP.
# The distributed optimizer's default format, 'fully_sharded_model_space', is rejected by megatron-core 0.16.1's own
# dist_checkpointing ("ShardedTensor.flattened_range is not supported"), and its 'fully_reshardable' load fails with
# torch's AdamW (KeyError 'step'); 'dp_reshardable' is Megatron-LM's default for fully parallel saves.
DIST_OPTIMIZER_FORMAT = "dp_reshardable"


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_inpo.engine.optimizer import optimizer_parts

    return any(isinstance(o, DistributedOptimizer) for o in optimizer_parts(optimizer))


def _optimizer_format(optimizer) -> str:
    return DIST_OPTIMIZER_FORMAT if _uses_distributed_optimizer(optimizer) else "per_parameter"


def _optimizer_metadata(fmt: str) -> dict:
    return {"distrib_optim_sharding_type": fmt} if fmt == DIST_OPTIMIZER_FORMAT else {}


def _check_optimizer_layout(path: Path, meta: dict, optimizer, same_layout: bool) -> str:
    """The saved optimizer format, after checking that this optimizer can load it (clear errors, nothing lost)."""
    saved = meta.get("optimizer_format") or "per_parameter"
    wanted = _optimizer_format(optimizer)
    if saved != wanted:
        raise CheckpointError(
            f"{path}: optimizer state was saved with use_distributed_optimizer="
            f"{str(saved == DIST_OPTIMIZER_FORMAT).lower()}; resume with the same setting")
    if saved == DIST_OPTIMIZER_FORMAT and not same_layout:
        raise CheckpointError(
            f"{path}: distributed-optimizer state was saved at TP={meta['tp']} PP={meta['pp']} and loads only at that "
            f"layout (any DP); resume there, or start a new stage from it as --init-checkpoint (weights only)")
    return saved


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model_chunks: list,
    meta: dict,
    optimizer: Any = None,
    scheduler: Any = None,
    data_state: dict | None = None,
    save_rng: bool = True,
    tokenizer_dir: str | os.PathLike | None = None,
    keep_last: int = 0,
) -> Path:
    """Save a training checkpoint of every rank's shard to `<root>/step_<step>` atomically; returns its path.

    `meta` holds hf_config, padded_vocab_size, layer_spec (tp / pp / step / format_version are filled in).
    `keep_last` > 0 removes older complete checkpoints beyond that count after the save.
    """
    import torch.distributed as dist

    final = save_to(Path(root) / checkpoint_name(step), model_chunks, meta, optimizer, scheduler, data_state,
                    save_rng, tokenizer_dir, step=step)
    if dist.get_rank() == 0 and keep_last > 0:
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save_to(
    final: str | os.PathLike,
    model_chunks: list,
    meta: dict,
    optimizer: Any = None,
    scheduler: Any = None,
    data_state: dict | None = None,
    save_rng: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    step: int = 0,
) -> Path:
    """Save into exactly `final` (temp sibling, then rename); model only unless optimizer etc. are given."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    final = Path(final)
    root = final.parent
    tmp_name = _broadcast_str(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}" if dist.get_rank() == 0 else "")
    tmp = root / tmp_name
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()

    model = _Model(model_chunks)
    parts = [model, *([_Optimizer(optimizer, model)] if optimizer is not None else []),
             *([_Scheduler(scheduler)] if scheduler is not None else []),
             *([_Data(data_state)] if data_state is not None else []), *([_Rng()] if save_rng else [])]
    sd = {p.key: p.saved() for p in parts}
    try:
        dist_checkpointing.save(sd, str(tmp))
    except Exception as e:  # name the directory (a full disk, a read-only directory, ...)
        raise CheckpointError(f"{final}: cannot save ({type(e).__name__}: {e})") from e
    except BaseException as e:  # torch's CheckpointException is a BaseException: `except Exception` misses it
        from megatron_inpo.errors import checkpoint_exception_summary, is_checkpoint_exception

        if not is_checkpoint_exception(e):
            raise
        raise CheckpointError(f"{final}: cannot save ({checkpoint_exception_summary(e)})") from e
    dist.barrier()

    if dist.get_rank() == 0:
        full_meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer_dir": None,
            **meta,
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "step": step,
            "iteration": step,
            "has_optimizer": optimizer is not None,
            "optimizer_format": _optimizer_format(optimizer) if optimizer is not None else None,
            "has_rng": bool(save_rng),
        }
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            full_meta["tokenizer_dir"] = "tokenizer"
        from megatron_inpo.engine.trust import FILES_KEY, file_digests
        from megatron_inpo.files import _fsync_dir, atomic_write_json

        # one extra read pass over the files just written (hashing runs at about the speed of the disk); the
        # digests cannot be computed while dist_checkpointing writes, since it writes the files itself
        full_meta[FILES_KEY] = file_digests(tmp)
        atomic_write_json(tmp / META_FILE, full_meta)
        if final.exists():  # a re-save of the same step (e.g. resumed just after it): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    dist.barrier()
    return final


def check_checkpoint(path: str | os.PathLike, meta: dict, verify_digests: bool | None = None) -> bool:
    """Before dist_checkpointing reads `path`: its file digests (unless disabled; see engine/trust.py) and no pickle
    that could run code. Returns True when the digests verified; CheckpointError naming the file otherwise."""
    from megatron_inpo.engine import trust

    try:
        verified = trust.verify_digests(path, meta) if trust.verify_enabled(verify_digests) else False
        trust.check_loadable(path)
    except trust.TrustError as e:
        raise CheckpointError(str(e)) from None
    return verified


def _checked_on_rank0(path: Path, meta: dict, verify_digests: bool | None) -> bool:
    """check_checkpoint on rank 0 (one read pass, not one per rank), its outcome broadcast to every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return check_checkpoint(path, meta, verify_digests)
    outcome = ""
    if dist.get_rank() == 0:
        try:
            outcome = "verified" if check_checkpoint(path, meta, verify_digests) else "unverified"
        except CheckpointError as e:
            outcome = "error:" + str(e)
    outcome = _broadcast_str(outcome)
    if outcome.startswith("error:"):
        raise CheckpointError(outcome[len("error:"):])
    return outcome == "verified"


NVTE_PICKLE_FLAG = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


@contextlib.contextmanager
def _te_extra_state_pickle(allowed: bool):
    """Transformer Engine's FP8 scaling state (delayed recipe) is a pickle in our own checkpoints, which TE >= 2.18
    unpickles only with NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1, checked inside `set_extra_state`, i.e. during
    `model.load_state_dict`. So the flag is set for the whole load (dist_checkpointing.load through
    load_state_dict) of a checkpoint whose files match the digests this code recorded at save, removed for any other
    (also when set in the environment: an unverified checkpoint's extra state is not unpickled), and restored
    afterwards, so a later unverified load in this process does not inherit it. The same path with and without TE."""
    before = os.environ.get(NVTE_PICKLE_FLAG)
    if allowed:
        os.environ[NVTE_PICKLE_FLAG] = "1"
    else:
        os.environ.pop(NVTE_PICKLE_FLAG, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NVTE_PICKLE_FLAG, None)
        else:
            os.environ[NVTE_PICKLE_FLAG] = before


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: list,
    optimizer: Any = None,
    scheduler: Any = None,
    load_rng: bool = True,
    strict: bool = True,
    optimizer_state: bool = True,
    verify_digests: bool | None = None,
) -> dict:
    """Load `path` into the (already built, any TP/PP) model and, when given, optimizer / scheduler / RNG.

    `optimizer_state=False` with an optimizer: load the weights only (an init checkpoint, e.g. a converter output
    or the SFT result) and then point the optimizer's master weights at them; see `sync_master_weights`.
    `verify_digests`: check the recorded file digests first (None: unless MEGATRON_INPO_NO_VERIFY=1); the
    no-code-on-load checks of engine/trust.py always run.
    Returns {"meta": megatron_inpo.json, "data": data state or None, "rng_loaded": bool}.
    """
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine import compat

    path = Path(path)
    meta = read_meta(path)
    digests_verified = _checked_on_rank0(path, meta, verify_digests)
    same_layout = (meta["tp"], meta["pp"]) == (
        ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    model = _Model(model_chunks, path if strict else None)
    parts: list[_Part] = [model]
    if optimizer is not None and optimizer_state:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"{path}: has no optimizer state (a converter output?); cannot resume from it")
        parts.append(_Optimizer(optimizer, model, _check_optimizer_layout(path, meta, optimizer, same_layout)))
    elif optimizer is not None:  # an init checkpoint: the master weights follow the weights just loaded
        parts.append(_MasterWeights(optimizer))
    parts += [_Scheduler(scheduler)] if scheduler is not None else []
    data = _Data(None)
    parts += [data] if meta.get("has_optimizer") else []
    want_rng = bool(load_rng and same_layout and meta.get("has_rng", False))
    if want_rng:
        parts.append(_Rng())
    elif load_rng and meta.get("has_rng"):
        log.warning("%s: saved at TP=%s PP=%s; RNG states are per-rank and are not restored in a new layout",
                    path, meta["tp"], meta["pp"])
    request = {p.key: p.requested() for p in parts if p.sharded}
    with _te_extra_state_pickle(allowed=digests_verified):  # TE (>= 2.18) unpickles in the model's restore
        loaded = _load_sharded(path, request)
        common = compat.load_common_state(path) if any(not p.sharded and p.key for p in parts) else {}
        for p in parts:
            p.restore(loaded.get(p.key) if p.sharded else common.get(p.key))
    return {"meta": meta, "data": data.state, "rng_loaded": want_rng}


def _load_sharded(path: Path, request: dict) -> dict:
    """dist_checkpointing's load of `request`, its errors named by the directory."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_inpo.engine import compat

    try:
        # Keys asked for but absent from the checkpoint come back instead of failing the load: Transformer
        # Engine's modules carry `_extra_state` (FP8 metadata; with TE installed even the final norm is TE's),
        # which a converter output or a checkpoint written without TE does not hold. Anything else is an error.
        loaded, _, unexpected = compat.load(request, path, strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as e:  # name the directory; dist_checkpointing's messages do not always do it
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from e
    except BaseException as e:  # torch's CheckpointException (a missing or truncated shard, wrong shapes) is a
        # BaseException, which `except Exception` misses; Ctrl-C and SystemExit pass
        from megatron_inpo.errors import checkpoint_exception_summary, is_checkpoint_exception

        if not is_checkpoint_exception(e):
            raise
        raise CheckpointError(f"{path}: cannot load ({checkpoint_exception_summary(e)})") from e
    absent = sorted(k for k in unexpected if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"{path}: checkpoint lacks {len(absent)} entries this model needs, e.g. "
                              f"{absent[:6]} (a different architecture, or a model-only checkpoint?)")
    if unexpected:
        log.info("%s: %d TE _extra_state entries not in the checkpoint start empty", path, len(unexpected))
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# The training state, piece by piece (torchtitan's Stateful): each part names its entry of the checkpoint, says
# what to save and what to ask for at load, and restores itself from what was loaded. save_to and load_checkpoint
# are loops over the parts: a new piece of state is a new part, not an edit of either.


class _Part:
    key = ""
    sharded = True
    """In dist_checkpointing's sharded load; False: an entry of the common state, read after it."""

    def saved(self) -> Any:
        raise NotImplementedError

    def requested(self) -> Any:
        return self.saved()

    def restore(self, loaded: Any) -> None:
        pass


class _Model(_Part):
    """The weights; `strict_path`: a checkpoint that lacks one of them is refused, naming it."""

    key = "model"

    def __init__(self, chunks: list, strict_path: Path | None = None) -> None:
        self.chunks, self.strict_path, self._saved = chunks, strict_path, None

    def saved(self) -> Any:
        if self._saved is None:  # one dict for the model entry and the optimizer's references to it
            self._saved = _model_sharded(self.chunks)
        return self._saved

    def requested(self) -> Any:
        return _model_sharded(self.chunks)

    def restore(self, loaded: Any) -> None:
        result = _unwrap(self.chunks[0]).load_state_dict(loaded, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if self.strict_path is not None and missing:
            raise CheckpointError(f"{self.strict_path}: checkpoint lacks model weights {missing[:8]}")


class _Optimizer(_Part):
    """Megatron's optimizer state, fp32 master weights included, in its saved format (`fmt`, checked)."""

    key = "optimizer"

    def __init__(self, optimizer: Any, model: _Model, fmt: str | None = None) -> None:
        self.optimizer, self.model, self.fmt = optimizer, model, fmt

    def saved(self) -> Any:
        return self.optimizer.sharded_state_dict(
            self.model.saved(), metadata=_optimizer_metadata(_optimizer_format(self.optimizer)))

    def requested(self) -> Any:
        from megatron_inpo.engine import optimizer as optimizer_repairs

        optimizer_repairs.prepare_adam_state_for_load(self.optimizer)
        return self.optimizer.sharded_state_dict(_model_sharded(self.model.chunks), is_loading=True,
                                                 metadata=_optimizer_metadata(self.fmt or "per_parameter"))

    def restore(self, loaded: Any) -> None:
        from megatron_inpo.engine import optimizer as optimizer_repairs

        # The state holds the fp32 master weights (fp32_param / the distributed optimizer's shards), so a resume
        # restores them bit for bit; no refresh from the (bf16) model weights here, which would round them
        # (tests/engine/test_parallel.py checks both optimizers).
        with torch.no_grad():  # 0.16.1's dp_reshardable load copies into leaf parameters outside no_grad
            self.optimizer.load_state_dict(loaded)
        optimizer_repairs.restore_adam_steps(self.optimizer)


class _MasterWeights(_Part):
    """An optimizer started from an init checkpoint (weights only): its master weights follow the loaded model
    (optimizer.sync_master_weights). Nothing of it is in the checkpoint."""

    sharded = False

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def restore(self, loaded: Any) -> None:
        from megatron_inpo.engine import optimizer as optimizer_repairs

        optimizer_repairs.sync_master_weights(self.optimizer)


class _Scheduler(_Part):
    key, sharded = "scheduler", False

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def saved(self) -> Any:
        return self.scheduler.state_dict()

    def restore(self, loaded: Any) -> None:
        if loaded is not None:
            self.scheduler.load_state_dict(loaded)


class _Data(_Part):
    """The data position of a training checkpoint (step, data digest, item count); `state` after a load."""

    key, sharded = "data", False

    def __init__(self, state: dict | None) -> None:
        self.state = state

    def saved(self) -> Any:
        return dict(self.state or {})

    def restore(self, loaded: Any) -> None:
        self.state = loaded


class _Rng(_Part):
    """Every RNG of the rank (python, numpy, torch, CUDA, Megatron's tracker), one object per (PP, TP) rank."""

    key = "rng"

    def saved(self) -> Any:
        return _rng_sharded(_rng_state())

    def requested(self) -> Any:
        return _rng_sharded(None)

    def restore(self, loaded: Any) -> None:
        _set_rng_state(loaded)
