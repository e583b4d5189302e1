"""The ONE Hugging Face <-> Megatron-Core weight layout mapping for the Llama family (converter + engine + tests).

Megatron-Core's checkpoint keys (the sharded state dict; identical for the local and the TE layer spec, because
the local spec maps its norm names onto TE's fused-norm names when it builds the sharded state dict):

    embedding.word_embeddings.weight                      [Vp, H]        TP: rows      <- model.embed_tokens (+pad)
    output_layer.weight            (untied only)           [Vp, H]        TP: rows      <- lm_head (+pad)
    decoder.final_layernorm.weight                         [H]                          <- model.norm
    decoder.layers.<param> (stacked over layers, axis 0):
      self_attention.linear_qkv.layer_norm_weight          [L, H]                       <- input_layernorm
      self_attention.linear_qkv.weight                     [L, G*(r+2)*d, H]  TP: rows  <- q/k/v_proj interleaved
      self_attention.linear_proj.weight                    [L, H, n*d]    TP: columns   <- o_proj
      mlp.linear_fc1.layer_norm_weight                     [L, H]                       <- post_attention_layernorm
      mlp.linear_fc1.weight                                [L, 2F, H]     TP: [gate_i; up_i] per rank
      mlp.linear_fc2.weight                                [L, H, F]      TP: columns   <- down_proj
    (plus `<linear>._extra_state` objects: None for the local spec, FP8 metadata for TE)

linear_qkv holds, per query group g (G groups, r = heads/groups): [q heads of g (r*d rows), k_g (d), v_g (d)];
TP rank i holds whole groups [i*G/tp, (i+1)*G/tp). linear_fc1 globally is [gate; up]; TP rank i holds
[gate_i; up_i] (Megatron's swiglu sharded factory stores gate_i at rows i*F/tp and up_i at F + i*F/tp).
Module parameter names differ between specs: local `input_layernorm.weight` / `pre_mlp_layernorm.weight`,
TE `self_attention.linear_qkv.layer_norm_weight` / `mlp.linear_fc1.layer_norm_weight` (see `module_name`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from megatron_inpo.engine.model import LlamaArch
from megatron_inpo.errors import InputError

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
LAYER_PREFIX = "decoder.layers."

# checkpoint suffix (under decoder.layers.) -> (HF names in the layer, TP kind)
#   kinds: "rep" replicated, "row" split dim 0, "col" split dim 1, "qkv" row split by query groups, "fc1" swiglu
LAYER_PARAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "rep"),
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "col"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "rep"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "col"),
}
LINEARS_WITH_EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                            "mlp.linear_fc2")
HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"

_LOCAL_MODULE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


class MappingError(InputError, ValueError):
    """A tensor does not fit the layout (shape, missing name); the message names the tensor."""


def module_name(suffix: str, layer_spec: str) -> str:
    """Parameter name inside a TransformerLayer for a checkpoint suffix, for the "local" or "te" spec."""
    return _LOCAL_MODULE_NAMES.get(suffix, suffix) if layer_spec == "local" else suffix


def hf_layer_name(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def hf_names(arch: LlamaArch) -> list[str]:
    """Every HF tensor name of the model, in HF order."""
    names = [HF_EMBED]
    for i in range(arch.num_layers):
        for hf, _ in LAYER_PARAMS.values():
            names += [hf_layer_name(i, n) for n in hf]
    names.append(HF_NORM)
    if not arch.tie_word_embeddings:
        names.append(HF_LM_HEAD)
    return names


def hf_shape(arch: LlamaArch, name: str) -> tuple[int, ...]:
    """Expected shape of an HF tensor (raises MappingError for unknown names)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.intermediate_size
    short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    shapes = {
        HF_EMBED: (arch.vocab_size, h), HF_LM_HEAD: (arch.vocab_size, h), HF_NORM: (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_heads * d, h), "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.v_proj.weight": (arch.num_query_groups * d, h), "self_attn.o_proj.weight": (h, arch.num_heads * d),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    if short not in shapes:
        raise MappingError(f"unknown Llama tensor name {name!r}")
    return shapes[short]


def check_shape(arch: LlamaArch, name: str, shape: Iterable[int], where: str = "") -> None:
    want = hf_shape(arch, name)
    if tuple(shape) != want:
        raise MappingError(f"{where}{name}: shape {tuple(shape)} does not match config.json (expected {want})")


def megatron_shape(arch: LlamaArch, suffix: str, padded_vocab_size: int) -> tuple[int, ...]:
    """Global (TP=1) shape of one layer's tensor (suffix under decoder.layers.) or of a top-level key."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.intermediate_size
    return {
        EMBED: (padded_vocab_size, h), OUTPUT: (padded_vocab_size, h), FINAL_NORM: (h,),
        "self_attention.linear_qkv.layer_norm_weight": (h,), "mlp.linear_fc1.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": ((arch.num_heads + 2 * arch.num_query_groups) * d, h),
        "self_attention.linear_proj.weight": (h, arch.num_heads * d),
        "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f),
    }[suffix]


# ----------------------------------------------------------------------------------------------------------------
# Tensor transforms (global layout; TP slicing below)


def qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch,
              groups: range | None = None) -> torch.Tensor:
    """HF q/k/v_proj -> Megatron linear_qkv rows for `groups` (all by default): per group [q_g; k_g; v_g]."""
    d, g_all = arch.head_dim, arch.num_query_groups
    r = arch.num_heads // g_all
    groups = range(g_all) if groups is None else groups
    h = q.shape[-1]
    q = q.view(g_all, r * d, h)
    k = k.view(g_all, d, h)
    v = v.view(g_all, d, h)
    sel = slice(groups.start, groups.stop)
    return torch.cat([q[sel], k[sel], v[sel]], dim=1).reshape(-1, h)


def qkv_split(qkv: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron linear_qkv (all groups) -> HF (q_proj, k_proj, v_proj)."""
    d, g = arch.head_dim, arch.num_query_groups
    r = arch.num_heads // g
    h = qkv.shape[-1]
    x = qkv.view(g, (r + 2) * d, h)
    q, k, v = torch.split(x, [r * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows up to `rows` (the vocab padding; the pad logits are never used)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def tp_shard(kind: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's part of a global (TP=1 layout) Megatron tensor."""
    if kind == "rep" or tp == 1:
        return t
    if kind in ("row", "qkv"):  # qkv: whole groups per rank, and groups are contiguous rows
        return t.chunk(tp, dim=0)[rank]
    if kind == "col":
        return t.chunk(tp, dim=1)[rank]
    if kind == "fc1":
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    raise ValueError(kind)


def layer_to_megatron(get: Callable[[str], torch.Tensor], arch: LlamaArch, layer: int) -> dict[str, torch.Tensor]:
    """HF tensors of layer `layer` (via `get(hf_name)`) -> {checkpoint suffix: global Megatron tensor}."""
    out = {}
    for suffix, (names, kind) in LAYER_PARAMS.items():
        ts = [get(hf_layer_name(layer, n)) for n in names]
        if kind == "qkv":
            out[suffix] = qkv_merge(*ts, arch)
        elif kind == "fc1":
            out[suffix] = torch.cat(ts, dim=0)
        else:
            out[suffix] = ts[0]
    return out


def layer_to_hf(tensors: Mapping[str, torch.Tensor], arch: LlamaArch, layer: int) -> dict[str, torch.Tensor]:
    """{checkpoint suffix: global Megatron tensor} of one layer -> {HF name: tensor} (HF order)."""
    out = {}
    for suffix, (names, kind) in LAYER_PARAMS.items():
        t = tensors[suffix]
        if kind == "qkv":
            parts = qkv_split(t, arch)
        elif kind == "fc1":
            parts = t.chunk(2, dim=0)
        else:
            parts = (t,)
        for n, p in zip(names, parts):
            out[hf_layer_name(layer, n)] = p.contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------------
# In-memory: HF state dict <-> a built Megatron model chunk (any TP / PP rank)


def _model_layers(model):
    """(global layer index, TransformerLayer) of this pipeline stage."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return []
    return [(layer.layer_number - 1, layer) for layer in decoder.layers]


@torch.no_grad()
def load_hf_state_dict(model, hf_state: Mapping[str, torch.Tensor], hf_config: Mapping, layer_spec: str = "local",
                       tp: int | None = None, tp_rank: int | None = None) -> None:
    """Copy an HF Llama state dict into this rank's Megatron model chunk (any TP / PP; vocab padded with zeros).

    Every parameter of the chunk is written (a missing one raises MappingError), so tests can compare logits.
    """
    from megatron.core import parallel_state as ps

    while hasattr(model, "module"):
        model = model.module
    arch = LlamaArch.from_hf(hf_config)
    tp = ps.get_tensor_model_parallel_world_size() if tp is None else tp
    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank

    def get(name):
        if name not in hf_state:
            raise MappingError(f"HF state dict lacks {name!r}")
        t = hf_state[name]
        check_shape(arch, name, t.shape)
        return t

    params = dict(model.named_parameters())
    written = set()

    def put(name, value):
        p = params.get(name)
        if p is None:
            raise MappingError(f"model has no parameter {name!r}")
        if tuple(p.shape) != tuple(value.shape):
            raise MappingError(f"{name}: model shape {tuple(p.shape)} != mapped shape {tuple(value.shape)}")
        p.copy_(value)
        written.add(name)

    if EMBED in params:
        vp = params[EMBED].shape[0] * tp
        put(EMBED, tp_shard("row", pad_rows(get(HF_EMBED), vp), tp, tp_rank))
    if OUTPUT in params:
        vp = params[OUTPUT].shape[0] * tp
        src = get(HF_EMBED) if arch.tie_word_embeddings else get(HF_LM_HEAD)
        put(OUTPUT, tp_shard("row", pad_rows(src, vp), tp, tp_rank))
    if "decoder.final_layernorm.weight" in params:
        put("decoder.final_layernorm.weight", get(HF_NORM))
    for local_idx, (global_idx, _layer) in enumerate(_model_layers(model)):
        for suffix, t in layer_to_megatron(get, arch, global_idx).items():
            kind = LAYER_PARAMS[suffix][1]
            put(f"{LAYER_PREFIX}{local_idx}.{module_name(suffix, layer_spec)}", tp_shard(kind, t, tp, tp_rank))
    missing = [n for n in params if n not in written]
    if missing:
        raise MappingError(f"parameters not covered by the HF mapping: {missing[:8]}")
