"""The Megatron-Core releases this project runs on, and every upstream difference between them, in one place.

Supported: megatron-core 0.16.1 (the newest release that installs on Python 3.11) and 0.19.x (Python >= 3.12; 0.19.2
is the release tested). The rest of the package calls the helpers below and never compares versions itself. Each
difference names the release that made it:

  1. `dist_checkpointing.core.CheckpointingConfig` (0.19 dropped the fields `common_backend` /
     `common_backend_version`): `checkpointing_config()` builds it with the fields both releases have; the
     metadata.json it writes is the same on both ({"sharded_backend": "torch_dist", "sharded_backend_version": 1}
     plus, on 0.16.1, the common backend "torch" / 1, which 0.19 ignores when it reads).
  2. Where the common (non-sharded) state lives (0.19): `dist_checkpointing.save` no longer writes `common.pt`; the
     common state goes into the `.distcp` files as one byte entry, "common_state" (a `ShardedObject`, read back with
     `torch.load(weights_only=True)`). 0.19 still reads a legacy `common.pt`; 0.16.1 reads only `common.pt`.
     `load` and `load_common_state` read either layout on either release: on 0.16.1 a checkpoint without `common.pt`
     is read through `ByteEntryCommonLoad`, which does what 0.19's `load_common_state_dict` does. So a training
     checkpoint of either release resumes on the other (tests/engine/test_cross_version.py). The converter writes
     its (empty) common state in the installed release's layout (`common_state_entry`): 0.19 logs that it will drop
     `common.pt` in a future release.
  3. `GPTModel` logs "GPTModel IS DEPRECATED" at every build (0.19; upstream points to `HybridModel`, whose layer
     specs are Transformer-Engine-only and which 0.16.1 lacks, so the engine stays on GPTModel): filtered by
     `quiet_upstream_notices`, with the other notices below.
  4. `megatron.core.__version__` (0.19) runs `git rev-parse` in its own directory, so inside a git checkout it reads
     "0.19.2+<that checkout's commit>": `mcore_version()` reads the installed distribution's metadata instead.

Upstream notices a user cannot act on (`NOTICES`): Megatron-Core's "Transformer Engine and Apex are not installed.
Falling back to ..." on machines without them, its deprecation notices about its own internals, torch's
deprecations that Megatron-Core's checkpoint code triggers, and torch's "No CUDA runtime is found, using CUDA_HOME"
from the CUDA build of torch on a machine without a GPU. `quiet_upstream_notices()` (called once by the CLI, before
any command runs) filters exactly these, by message, and leaves every other warning and log record alone.
"""
from __future__ import annotations

import functools
import io
import logging
import re
import warnings
from pathlib import Path

# (category, message regex, why a user cannot act on it). Python warnings, matched at the start of the message.
NOTICES: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to",
     "Megatron-Core's fallback to torch kernels on a machine without TE / NVIDIA apex (CPU; TE installs on GPUs)"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
     "the same fallback for the norm layers"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_",
     "TransformerConfig's own default cuda_graph_scope (0.16.1); CUDA graphs are not used"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load`",
     "torch's DCP deprecation, triggered inside Megatron-Core's torch_dist load strategy"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "torch's ShardedTensor deprecation, triggered by Megatron-Core's torch_dist strategy"),
    (UserWarning, r"MimoModelConfig is experimental and still under active development",
     "0.19 warns when its (unused here) multimodal package is imported along with the rest"),
    (UserWarning, r"The argument order of load has been changed\. Please check the document",
     "torch's DCP notice, triggered by 0.19's load_common_state_dict (it passes the state dict positionally)"),
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                  r"in a single process",
     "torch's DCP notice for the single-process read of the common state (0.19's load_common_state_dict and ours)"),
)
# (logger name, message regex, why). Log records, matched at the start of the formatted message.
LOG_NOTICES: tuple[tuple[str, str, str], ...] = (
    ("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED",
     "0.19 logs it at every build; its successor HybridModel is TE-only and absent from 0.16.1"),
    ("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated",
     "0.19 logs it on the first (synchronous) save through its default torch_dist strategy"),
    ("torch.utils.cpp_extension", r"No CUDA runtime is found, using CUDA_HOME=",
     "the CUDA build of torch on a machine without a GPU, when Megatron-Core imports cpp_extension"),
)


class _NoticeFilter(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_quiet = False


def quiet_upstream_notices() -> None:
    """Filter the notices of `NOTICES` / `LOG_NOTICES` (idempotent; imports neither torch nor Megatron-Core).

    Log filters are attached to the named loggers themselves, so they hold whatever handlers are configured later.
    """
    global _quiet
    for category, pattern, _ in NOTICES:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    if _quiet:
        return
    for name, pattern, _ in LOG_NOTICES:
        logging.getLogger(name).addFilter(_NoticeFilter(pattern))
    _quiet = True


@functools.lru_cache(maxsize=None)
def mcore_version() -> tuple[int, ...]:
    """The installed megatron-core release as integers, e.g. (0, 19, 2) (difference 4: not `__version__`)."""
    from importlib.metadata import version

    return tuple(int(p) for p in re.findall(r"\d+", version("megatron-core"))[:3])


def checkpointing_config():
    """The metadata.json record of a torch_dist checkpoint (difference 1)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    return CheckpointingConfig("torch_dist", 1)


COMMON_FILE = "common.pt"
COMMON_ENTRY = "common_state"


def common_state_layout(path: str | Path) -> str:
    """'file' when the checkpoint keeps its common state in common.pt (0.16.1, converter outputs), else 'entry'
    (0.19 saves: one byte entry of the .distcp files; difference 2)."""
    return "file" if (Path(path) / COMMON_FILE).exists() else "entry"


def common_state_entry(state: dict):
    """What a hand-made dist-checkpoint (the converter's) adds to its sharded state for the common state: on 0.19 the
    byte entry its `save` writes (so its loader takes the current path), on 0.16.x None (write common.pt)."""
    if mcore_version() < (0, 19):
        return None
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(COMMON_ENTRY, state, (1,), (0,), replica_id=0)


def _read_common_entry(path: str | Path) -> dict:
    """The common state of a checkpoint written by 0.19 (no common.pt), read as 0.19's load_common_state_dict does:
    the byte entry "common_state" through torch's DCP reader, then `torch.load(weights_only=True)`."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    key = ShardedObject(COMMON_ENTRY, None, (1,), (0,)).unique_key
    state = {key: io.BytesIO()}
    dcp_load(state_dict=state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    loaded = state[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


@functools.lru_cache(maxsize=None)
def _byte_entry_common_load_cls():
    from megatron.core.dist_checkpointing.strategies.base import LoadCommonStrategy

    class ByteEntryCommonLoad(LoadCommonStrategy):
        """0.16.1's common-state strategy for a checkpoint written by 0.19 (difference 2). Sharded objects are left
        to the torch_dist strategy, which handles them on both releases."""

        def load_common(self, checkpoint_dir):
            return _read_common_entry(checkpoint_dir)

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise NotImplementedError("sharded objects are loaded by the torch_dist strategy")

        def check_backend_compatibility(self, loaded_backend):
            pass

        def check_version_compatibility(self, loaded_version):
            pass

    return ByteEntryCommonLoad


def _common_strategy(path: str | Path):
    """None (Megatron-Core's default) unless 0.16.x meets a checkpoint whose common state is a byte entry."""
    if mcore_version() >= (0, 19) or common_state_layout(path) == "file":
        return None
    return _byte_entry_common_load_cls()()


def load(request: dict, path: str | Path, strict):
    """`dist_checkpointing.load(request, path, strict=strict)` for a checkpoint of either layout."""
    from megatron.core import dist_checkpointing

    kwargs = {}
    strategy = _common_strategy(path)
    if strategy is not None:
        kwargs["common_strategy"] = strategy
    return dist_checkpointing.load(request, str(path), strict=strict, **kwargs)


def load_common_state(path: str | Path) -> dict:
    """The common (non-sharded) state of a checkpoint of either layout (scheduler, data position)."""
    from megatron.core import dist_checkpointing

    if _common_strategy(path) is not None:
        return _read_common_entry(path)
    return dist_checkpointing.load_common_state_dict(str(path))
