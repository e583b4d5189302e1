"""HF Llama-family safetensors directory -> Megatron-Core dist-checkpoint (torch_dist) at a target TP / PP.

Streaming, in ONE process: the converter declares the sharded state dict that a TP x PP run of the engine would
save (every TP rank's shard of every tensor, with Megatron's keys and global offsets; PP only changes which
process writes a layer, not the checkpoint content) with storage-less (meta) placeholder tensors, and hands it to
torch.distributed.checkpoint through Megatron's own translation (`mcore_to_pyt_state_dict`, MCoreSavePlanner).
The planner computes each shard only when the writer asks for it, reading just the needed rows from the HF files.
Memory bound: one shard of one tensor (the largest: one TP rank's rows of the padded embedding, or of one layer's
linear_fc1 / linear_qkv) plus the header tables; nothing else is resident. The result loads at any TP / PP with
dist_checkpointing (resharding), e.g. through engine.checkpoint.load_checkpoint.

Output (the project's checkpoint convention): the dist-checkpoint files, `megatron_inpo.json` (with the files'
sha256 digests), `tokenizer/`.
Written atomically (temp dir next to the target, renamed at the end).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.convert import ConvertError
from megatron_inpo.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsSource
from megatron_inpo.engine import mapping as M
from megatron_inpo.engine.checkpoint import FORMAT_VERSION, META_FILE
from megatron_inpo.engine.model import LlamaArch, padded_vocab
from megatron_inpo.engine.trust import FILES_KEY, file_digests

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_NOT_TOKENIZER = {"config.json", INDEX_FILE, SINGLE_FILE, "generation_config.json"}
_TOKENIZER_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")


def check_export(hf_dir: Path, verify_digests: Optional[bool] = None) -> bool:
    """An HF directory's digest record (when this project wrote it) checked before any byte is read."""
    from megatron_inpo.engine import trust

    try:
        return trust.verify_export(hf_dir, verify_digests)
    except trust.TrustError as e:
        raise ConvertError(str(e)) from None


def read_json_object(p: Path) -> dict:
    """A JSON object file (config.json, generation_config.json, ...); ConvertError naming the file otherwise."""
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConvertError(f"{p}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{p}: invalid UTF-8 (byte {e.start})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{p}: expected a JSON object of config fields, got a {type(cfg).__name__}")
    return cfg


def read_hf_config(hf_dir: Path) -> dict:
    p = Path(hf_dir) / "config.json"
    if not p.exists():
        raise ConvertError(f"{p}: missing (not a Hugging Face model directory)")
    return read_json_object(p)


def arch_for(hf_config: dict, where: Path, tp: int = 1, pp: int = 1) -> LlamaArch:
    try:
        arch = LlamaArch.from_hf(hf_config)
        arch.check_tp(tp)
        arch.check_pp(pp)
    except ConfigError as e:
        raise ConvertError(f"{where}: {e}") from None
    return arch


def tokenizer_files(hf_dir: Path) -> list[Path]:
    """Tokenizer files of an HF directory (everything small that is not weights or model config)."""
    return sorted(p for p in Path(hf_dir).iterdir()
                  if p.is_file() and p.name not in _NOT_TOKENIZER and p.suffix in _TOKENIZER_SUFFIXES
                  and not p.name.startswith("."))


def _placeholder(shape, dtype) -> torch.Tensor:
    """A tensor with the right shape/dtype and no storage (the planner never reads it; a meta tensor is
    contiguous, so Megatron's translation does not materialize it)."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


class _LazySharded:
    """Megatron ShardedTensors with placeholder data + a producer for each (key, global offset)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.state: dict = {}
        self.producers: dict[tuple[str, tuple[int, ...]], Callable[[], torch.Tensor]] = {}
        self.nbytes = 0

    def add(self, name: str, key: str, local_shape, rank_offsets, produce, prepend: int = 0):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        st = ShardedTensor.from_rank_offsets(key, _placeholder(local_shape, self.dtype), *rank_offsets,
                                             replica_id=0, prepend_axis_num=prepend)
        self.state[name] = st
        self.producers[(key, tuple(st.global_offset))] = (produce, (1,) * prepend + tuple(local_shape))
        n = 1
        for s in local_shape:
            n *= s
        self.nbytes += n * torch.empty((), dtype=self.dtype).element_size()

    def add_object(self, name: str, key: str, layer: int, layers: int):
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        self.state[name] = ShardedObject(key, None, (layers,), (layer,), replica_id=0)


def _lazy_planner_cls():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(MCoreSavePlanner):
        """Resolves tensor write items by computing the shard on demand (see the module docstring)."""

        def __init__(self, producers, dtype, on_write, **kw):
            super().__init__(**kw)
            self.producers, self.dtype, self.on_write = producers, dtype, on_write

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            key = (write_item.index.fqn, tuple(write_item.index.offset))
            produce, shape = self.producers[key]
            t = produce().to(self.dtype).reshape(shape).contiguous()
            self.on_write(t.numel() * t.element_size())
            return t

    return LazySavePlanner


def convert_hf_to_mcore(hf_dir, mcore_dir, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                        layer_spec: str = "local", make_vocab_size_divisible_by: int = 128, overwrite: bool = False,
                        progress: bool = True, verify: bool = False, verify_digests: Optional[bool] = None) -> dict:
    """Convert; returns a summary {"bytes", "seconds", "padded_vocab_size", "tensors", "verify_max_abs_err"}.

    dtype: None keeps the HF dtype (bit-exact), else "bf16" / "fp16" / "fp32". layer_spec is recorded in the
    metadata (the checkpoint keys are the same for the local and the TE spec). verify_digests: check the digest
    record of an export of this project first (None: unless MEGATRON_INPO_NO_VERIFY=1; see engine/trust.py).
    Three steps, each testable alone: check the input (_checked_source), map names and TP shards
    (_sharded_plan), write the dist-checkpoint (_write).
    """
    t0 = time.perf_counter()
    hf_dir, mcore_dir = Path(hf_dir), Path(mcore_dir)
    src, arch, out_dtype, hf_config, gen_config = _checked_source(hf_dir, tp, pp, dtype, layer_spec, verify_digests)
    vp = padded_vocab(arch.vocab_size, tp, make_vocab_size_divisible_by)
    lazy = _sharded_plan(src, arch, tp, vp, out_dtype)
    meta = {"format_version": FORMAT_VERSION, "hf_config": hf_config, "padded_vocab_size": vp, "tp": tp,
            "pp": pp, "layer_spec": layer_spec, "iteration": 0, "step": 0,
            "tokenizer_dir": None, "dtype": str(out_dtype).replace("torch.", ""),  # tokenizer_dir: set by _write
            "generation_config": gen_config,
            "source": str(hf_dir)}
    _write(lazy, hf_dir, mcore_dir, meta, out_dtype, overwrite,
           progress_desc=f"hf->mcore tp={tp} pp={pp}" if progress else None)
    summary = {"bytes": lazy.nbytes, "seconds": time.perf_counter() - t0, "padded_vocab_size": vp,
               "tensors": len(lazy.producers)}
    if verify:
        from megatron_inpo.convert.verify import verify_mcore_against_hf

        summary["verify_max_abs_err"] = verify_mcore_against_hf(mcore_dir, hf_dir)
    return summary


def _checked_source(hf_dir: Path, tp: int, pp: int, dtype: Optional[str], layer_spec: str,
                    verify_digests: Optional[bool]) -> tuple[SafetensorsSource, LlamaArch, torch.dtype, dict,
                                                             dict | None]:
    """Check an HF directory before any work: options, its export digests, config.json, generation_config.json,
    every tensor's name and shape, one dtype. Returns the tensor source, the architecture, the output dtype,
    config.json and generation_config.json (None if absent)."""
    if tp < 1 or pp < 1:
        raise ConvertError(f"--tp and --pp must be >= 1 (got {tp}, {pp})")
    if layer_spec not in ("local", "te"):
        raise ConvertError(f"--layer-spec {layer_spec!r}: expected 'local' or 'te'")
    check_export(hf_dir, verify_digests)
    hf_config = read_hf_config(hf_dir)
    arch = arch_for(hf_config, hf_dir / "config.json", tp, pp)
    # read now, not after the weights are written: a broken file is refused before any work
    gen = hf_dir / "generation_config.json"
    gen_config = read_json_object(gen) if gen.exists() else None
    src = SafetensorsSource(hf_dir)
    expected = M.hf_names(arch)
    for name in expected:
        info = src.info(name)
        try:
            M.check_shape(arch, name, info.shape, where=f"{info.file}: ")
        except M.MappingError as e:
            raise ConvertError(str(e)) from None
    known = set(expected) | ({M.HF_LM_HEAD} if arch.tie_word_embeddings else set())
    extra = [n for n in src.tensors if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise ConvertError(f"{hf_dir}: tensors not in the Llama layout (unsupported architecture variant?): "
                           f"{extra[:5]}")
    dtypes = {src.info(n).dtype for n in expected}
    if dtype is None:
        if len(dtypes) != 1:
            raise ConvertError(f"{hf_dir}: mixed dtypes {sorted(map(str, dtypes))}; pass --dtype")
        out_dtype = dtypes.pop()
    elif dtype in DTYPE_NAMES:
        out_dtype = DTYPE_NAMES[dtype]
    else:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {sorted(DTYPE_NAMES)}")
    return src, arch, out_dtype, hf_config, gen_config


def _sharded_plan(src: SafetensorsSource, arch: LlamaArch, tp: int, vp: int,
                  out_dtype: torch.dtype) -> _LazySharded:
    """Every tensor of the Megatron checkpoint as a sharded placeholder with the function that computes it from the
    HF tensors (names mapped by engine/mapping.py; vocab padded to `vp` rows; TP slices)."""
    V, L, H = arch.vocab_size, arch.num_layers, arch.hidden_size
    lazy = _LazySharded(out_dtype)

    def vocab_rows(hf_name, r):
        rows = vp // tp
        a, b = r * rows, (r + 1) * rows
        def produce():
            real = src.read(hf_name, (min(a, V), min(b, V))) if a < V else torch.empty(0, H, dtype=out_dtype)
            return M.pad_rows(real.to(out_dtype), b - a)
        return produce

    for r in range(tp):
        lazy.add(f"embed.{r}", M.EMBED, (vp // tp, H), [(0, r, tp)], vocab_rows(M.HF_EMBED, r))
    for layer in range(L):
        _plan_layer(lazy, src, arch, layer, tp, vp)
    lazy.add("final_norm", M.FINAL_NORM, (H,), [], lambda: src.read(M.HF_NORM))
    if not arch.tie_word_embeddings:
        for r in range(tp):
            lazy.add(f"output.{r}", M.OUTPUT, (vp // tp, H), [(0, r, tp)], vocab_rows(M.HF_LM_HEAD, r))
    return lazy


def _plan_layer(lazy: _LazySharded, src: SafetensorsSource, arch: LlamaArch, layer: int, tp: int,
                vp: int) -> None:
    """One transformer layer's tensors: replicated, fused QKV, column-split and swiglu fc1 TP slices."""
    L, H = arch.num_layers, arch.hidden_size
    g_per = arch.num_query_groups // tp
    d, F = arch.head_dim, arch.intermediate_size
    q_rows = arch.num_heads // arch.num_query_groups * d
    lay = (0, layer, L)
    name = lambda n, _l=layer: M.hf_layer_name(_l, n)  # noqa: E731
    for suffix, (hf_names, kind) in M.LAYER_PARAMS.items():
        key = M.LAYER_PREFIX + suffix
        full = M.megatron_shape(arch, suffix, vp)
        if kind == "rep":
            lazy.add(f"{layer}.{suffix}", key, full, [lay], lambda n=name(hf_names[0]): src.read(n), prepend=1)
            continue
        for r in range(tp):
            if kind == "qkv":
                def produce(r=r, n=[name(x) for x in hf_names]):
                    ga, gb = r * g_per, (r + 1) * g_per
                    q = src.read(n[0], (ga * q_rows, gb * q_rows))
                    k = src.read(n[1], (ga * d, gb * d))
                    v = src.read(n[2], (ga * d, gb * d))
                    sub = LlamaArch(**{**arch.__dict__, "num_query_groups": g_per,
                                       "num_heads": arch.num_heads // tp})
                    return M.qkv_merge(q, k, v, sub)
                lazy.add(f"{layer}.{suffix}.{r}", key, (full[0] // tp, H), [lay, (1, r, tp)], produce, prepend=1)
            elif kind == "col":
                def produce(r=r, n=name(hf_names[0]), cols=full[1] // tp):
                    return src.read(n)[:, r * cols:(r + 1) * cols]
                lazy.add(f"{layer}.{suffix}.{r}", key, (full[0], full[1] // tp), [lay, (2, r, tp)], produce,
                         prepend=1)
            elif kind == "fc1":  # Megatron's swiglu layout: gate_r at fragment r, up_r at fragment tp + r
                rows = F // tp
                for half, hf_n in enumerate(hf_names):
                    lazy.add(f"{layer}.{suffix}.{r}.{half}", key, (rows, H), [lay, (1, half * tp + r, 2 * tp)],
                             lambda n=name(hf_n), a=r * rows: src.read(n, (a, a + rows)), prepend=1)
            else:
                raise AssertionError(kind)
    for lin in M.LINEARS_WITH_EXTRA_STATE:
        lazy.add_object(f"{layer}.{lin}._extra_state", f"{M.LAYER_PREFIX}{lin}._extra_state", layer, L)


def _write(lazy: _LazySharded, hf_dir: Path, mcore_dir: Path, meta: dict, out_dtype: torch.dtype, overwrite: bool,
           progress_desc: str | None) -> None:
    """The dist-checkpoint, written atomically: every shard computed as torch's writer asks for it, the common
    state in the installed release's layout, the tokenizer files, the metadata with each file's sha256."""
    from megatron.core.dist_checkpointing.core import save_config
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed import checkpoint as dcp
    from tqdm import tqdm

    from megatron_inpo.engine import compat
    from megatron_inpo.engine.parallel import init_distributed
    from megatron_inpo.files import atomic_directory, atomic_write_json

    init_distributed()  # DCP's sharded-tensor types need a process group (a world of 1 here)
    # the (empty) common state in the layout of the installed release (engine/compat.py, difference 2)
    common_entry = compat.common_state_entry({})
    sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(
        {"model": lazy.state, **({compat.COMMON_ENTRY: common_entry} if common_entry is not None else {})})
    pyt_sd = mcore_to_pyt_state_dict(sharded, False)
    bar = tqdm(total=lazy.nbytes, unit="B", unit_scale=True, desc=progress_desc, disable=progress_desc is None)
    planner = _lazy_planner_cls()(lazy.producers, out_dtype, bar.update, can_run_decentralized_global_plan=False,
                                  flatten_state_dict=False)
    with atomic_directory(mcore_dir, overwrite=overwrite) as tmp:
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1, sync_files=True)
        dcp.save(pyt_sd, storage_writer=writer, planner=planner)
        if common_entry is None:
            torch.save({}, tmp / compat.COMMON_FILE)
        save_config(compat.checkpointing_config(), str(tmp))
        tok_files = tokenizer_files(hf_dir)
        if tok_files:
            (tmp / "tokenizer").mkdir()
            for p in tok_files:
                shutil.copy2(p, tmp / "tokenizer" / p.name)
        meta = {**meta, "tokenizer_dir": "tokenizer" if tok_files else None}  # keeps its place in the record
        # per-file sha256 (engine/trust.py): one extra read pass over the files just written
        meta[FILES_KEY] = file_digests(tmp)
        atomic_write_json(tmp / META_FILE, meta)
    bar.close()
