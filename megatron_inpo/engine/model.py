"""Megatron-Core GPTModel for the Llama family, built from a Hugging Face `config.json` dict.

API (what the engine, converter and tests call; process groups must exist: `engine.parallel.initialize`):

    build_model(hf_config, pre_process=None, post_process=None, precision="fp32", layer_spec="auto", fp8=None,
                fp8_recipe="delayed", sequence_parallel=False, recompute_activations=False,
                padded_vocab_size=None, attention="sdpa") -> Built
        The model chunk of THIS rank (pre/post_process default to this rank's pipeline stage) with RMSNorm,
        SwiGLU, RoPE (incl. Llama-3 "llama3" and "linear" rope scaling, computed exactly like transformers),
        GQA, tied or untied embeddings, vocab padded for TP. On CUDA it is moved to the current device.
        Built = (model, vocab_size, padded_vocab_size, layer_spec ("local" | "te"), arch: LlamaArch, config).
    build_model(hf_config, config=MegatronModelConfig(...), sequence_parallel=...)   the options: engine/config.py.
    LlamaArch.from_hf(hf_config)    validated dimensions (ConfigError names the config.json field).
    padded_vocab(vocab_size, tp, divisor=128)   Megatron's padding: multiple of divisor * tp.

Packed micro-batches (engine/batches.py, MegatronConfig.packing) reach the model as a PackedSeqParams with
qkv_format "thd" (`packed_seq_params`, checked by `check_packed_seq_params`), on either spec.
Layer specs: "te" = Transformer Engine modules (GPU; fused norm+linear names `linear_qkv.layer_norm_weight`),
"local" = Megatron-Core's local modules with OUR core attention on torch scaled_dot_product_attention
(`attention="sdpa"`, default; Megatron's unfused local attention is 0.54x of transformers on an H100) or
Megatron's own (`attention="unfused"`). "auto" = "te" when engine.machine.te_available() else "local".
FP8: fp8="hybrid" (or "e4m3") with fp8_recipe "delayed" or "current" (= Megatron's "tensorwise" current scaling);
needs the TE spec on CUDA and hidden / FFN / head sizes divisible by 16 (validate() says which is not).
transformer_engine is imported only in engine/machine.py (te_available), lazily, and only when CUDA is available.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron_inpo.config import ConfigError
from megatron_inpo.engine.config import FP8_RECIPES, MegatronModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def padded_vocab(vocab_size: int, tp: int, divisor: int = 128) -> int:
    """Megatron's vocab padding: the next multiple of divisor * tp."""
    m = divisor * tp
    return -(-int(vocab_size) // m) * m


# ----------------------------------------------------------------------------------------------------------------
# HF config -> dimensions


def rope_parameters(hf: Mapping[str, Any]) -> dict:
    """RoPE settings of an HF config in one dict {"rope_type", "rope_theta", ...scaling fields}.

    transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling` (or none).
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


@dataclass(frozen=True)
class LlamaArch:
    """The dimensions of a Llama-family model, read from an HF config.json dict."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaArch":
        archs = hf.get("architectures") or []
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(f"config.json architectures={archs}: unsupported (supported: "
                              f"{list(SUPPORTED_ARCHITECTURES)})")
        if not archs and hf.get("model_type", "llama") != "llama":
            raise ConfigError(f"config.json model_type={hf.get('model_type')!r}: unsupported (supported: llama)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(key), int) or hf[key] <= 0:
                raise ConfigError(f"config.json {key}={hf.get(key)!r}: must be a positive integer")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act={hf.get('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ConfigError(f"config.json {key}=true: biases are not supported for the Llama family")
        for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):  # optional, but typed
            if hf.get(key) is not None and (type(hf[key]) is not int or hf[key] <= 0):
                raise ConfigError(f"config.json {key}={hf[key]!r}: must be a positive integer")
        for key in ("rms_norm_eps", "rope_theta"):
            if hf.get(key) is not None and (type(hf[key]) not in (int, float) or not hf[key] > 0):
                raise ConfigError(f"config.json {key}={hf[key]!r}: must be a positive number")
        heads = hf["num_attention_heads"]
        groups = hf.get("num_key_value_heads") or heads
        if heads % groups:
            raise ConfigError(f"config.json num_key_value_heads={groups} must divide num_attention_heads={heads} "
                              "(whole query groups)")
        if not hf.get("head_dim") and hf["hidden_size"] % heads:
            raise ConfigError(f"config.json hidden_size={hf['hidden_size']} must be divisible by "
                              f"num_attention_heads={heads} (no head_dim given)")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = rope_parameters(hf)
        if rope["rope_type"] not in ("default", "llama3", "linear"):
            raise ConfigError(f"config.json rope type {rope['rope_type']!r}: supported are default, llama3, linear")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("config.json partial_rotary_factor != 1 is not supported")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_query_groups=groups, head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rope=rope,
        )

    def check_tp(self, tp: int) -> None:
        """TP must divide heads, query groups (whole groups per rank) and the FFN size."""
        for name, n in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_query_groups),
                        ("intermediate_size", self.intermediate_size)):
            if n % tp:
                raise ConfigError(f"tensor parallel size {tp} does not divide config.json {name}={n}")

    def check_pp(self, pp: int) -> None:
        if self.num_layers % pp:
            raise ConfigError(f"pipeline parallel size {pp} does not divide config.json num_hidden_layers="
                              f"{self.num_layers}")


def rope_inv_freq(arch: LlamaArch, device=None) -> torch.Tensor:
    """RoPE inverse frequencies exactly as transformers computes them (default, linear, llama3 scaling).

    Megatron-Core 0.16.1 only has llama3 scaling with low/high_freq_factor 1/4 and an original context of 8192
    hard-coded; Llama-3.2 and custom configs differ, so the engine overrides Megatron's inv_freq with this.
    """
    r = arch.rope
    dim = arch.head_dim
    base = float(r["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    kind = r["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / float(r["factor"])
    elif kind == "llama3":
        factor = float(r["factor"])
        low, high = float(r["low_freq_factor"]), float(r["high_freq_factor"])
        old_ctx = float(r["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(device) if device is not None else inv_freq


# ----------------------------------------------------------------------------------------------------------------
# Options


# ----------------------------------------------------------------------------------------------------------------
# Our core attention for the local spec


@functools.cache
def sdpa_core_attention_class():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.utils import divide

    class SDPACoreAttention(MegatronModule):
        """Drop-in for Megatron's local DotProductAttention on torch.nn.functional.scaled_dot_product_attention.

        Same inputs/outputs: query [sq, b, np, hn], key/value [sk, b, ng, hn] (this TP rank's heads and groups),
        attention_mask None (causal by attn_mask_type) or a boolean mask where True = masked out; returns
        [sq, b, np*hn]. SDPA picks a fused kernel (flash / memory-efficient) and never materializes scores.
        """

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
            super().__init__(config=config)
            if config.context_parallel_size != 1:
                raise ValueError("SDPACoreAttention does not support context parallelism (use the TE spec)")
            from megatron.core import parallel_state as ps

            tp = pg_collection.tp.size() if pg_collection is not None else ps.get_tensor_model_parallel_world_size()
            self.attn_mask_type = attn_mask_type
            self.heads = divide(config.num_attention_heads, tp)
            self.groups = divide(config.num_query_groups, tp)
            self.head_dim = config.kv_channels
            self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
            self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            self._causal = AttnMaskType.causal

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if attention_bias is not None:
                raise NotImplementedError("attention bias needs the TE spec")
            if packed_seq_params is not None:
                return self.forward_packed(query, key, value, packed_seq_params)
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            # [s, b, n, d] -> [b, n, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            dropout = self.dropout if self.training else 0.0
            if attention_mask is None:
                # GQA inside the kernel (flash attention reads each K/V head for its query group): no K/V copies
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale,
                                                     is_causal=mask_type == self._causal,
                                                     enable_gqa=self.heads != self.groups)
            else:  # Megatron masks are True where attention is NOT allowed
                if self.heads != self.groups:  # with a mask the flash kernel is out; others need equal heads
                    rep = self.heads // self.groups
                    k = k.repeat_interleave(rep, dim=1)
                    v = v.repeat_interleave(rep, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(),
                                                     dropout_p=dropout, scale=self.softmax_scale)
            # [b, n, sq, d] -> [sq, b, n*d]
            sq, b = out.shape[2], out.shape[0]
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

        def forward_packed(self, query, key, value, params):
            """THD: query [t, np, hn], key/value [t, ng, hn], the sequences of one packed row; returns [t, np*hn].

            Causal attention per segment of params.cu_seqlens, each one the same SDPA call as a sequence of its
            own (is_causal, flash kernel, GQA inside it): exact, and O(sum L_i^2) rather than the O(t^2) of one
            call with a block-diagonal mask (which would also have to copy K/V per query head, see forward)."""
            bounds = params.cu_seqlens_q.tolist()  # checked by packed_seq_params when the batch was staged
            if bounds[-1] != query.shape[0]:
                raise ValueError(f"packed row of {query.shape[0]} tokens, cu_seqlens end at {bounds[-1]}")
            lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            dropout = self.dropout if self.training else 0.0
            outs = []
            # torch.split, not slicing: its backward is one concatenation, where each slice's backward would
            # write a full-size zero gradient
            for q, k, v in zip(*(torch.split(t, lens) for t in (query, key, value))):
                q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # [1, n, L, d]
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale,
                                                   is_causal=True, enable_gqa=self.heads != self.groups)
                outs.append(o[0].permute(1, 0, 2).reshape(o.shape[2], self.heads * self.head_dim))
            return torch.cat(outs) if len(outs) > 1 else outs[0]

    return SDPACoreAttention


@functools.cache
def rope_self_attention_class():
    from megatron.core.transformer.attention import SelfAttention

    from megatron_inpo.engine import rope

    class RopeSelfAttention(SelfAttention):
        """Megatron's SelfAttention with the rotary embedding applied by engine/rope.py right after the QKV
        projection (no concatenations, cos / sin once per forward, q / k written in the layout SDPA reads) instead
        of by Megatron's unfused RoPE; where rope.supported says no (or in inference) Megatron's own runs."""

        _rope_args = None
        _tables_key = None

        def forward(self, hidden_states, *args, rotary_pos_emb=None, packed_seq_params=None, inference_context=None,
                    **kwargs):
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            ours = (freqs is not None and inference_context is None and kwargs.get("inference_params") is None
                    and (not isinstance(rotary_pos_emb, tuple) or rotary_pos_emb[0] is rotary_pos_emb[1])
                    and rope.supported(self.config, freqs.shape[-1], self.hidden_size_per_attention_head))
            if ours:
                self._rope_args, rotary_pos_emb = (freqs, packed_seq_params), None
            try:
                return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb,
                                       packed_seq_params=packed_seq_params, inference_context=inference_context,
                                       **kwargs)
            finally:
                self._rope_args = None

        def get_query_key_value_tensors(self, *args, **kwargs):
            out = super().get_query_key_value_tensors(*args, **kwargs)
            if self._rope_args is None:
                return out
            if not (isinstance(out, tuple) and len(out) == 3):
                raise RuntimeError("RopeSelfAttention: expected (query, key, value) from the QKV projection")
            q, k, v = out
            tables = self._tables(q)
            return rope.rotate(q, tables), rope.rotate(k, tables), rope.to_sdpa_layout(v)

        def _tables(self, q):
            freqs, packed = self._rope_args
            cu = None
            if packed is not None and packed.qkv_format == "thd":
                cu = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
            # every layer of one forward gets the same table object: the tables are computed by the first one
            key = (freqs, cu, q.dtype, q.shape[0])
            cached = RopeSelfAttention._tables_key
            if cached is None or any(a is not b for a, b in zip(cached[0][:2], key[:2])) or cached[0][2:] != key[2:]:
                RopeSelfAttention._tables_key = (key, rope.RopeTables.of(freqs, q.dtype, cu, q.shape[0]))
            return RopeSelfAttention._tables_key[1]

    return RopeSelfAttention


@functools.cache
def swiglu_mlp_class():
    import torch.nn.functional as F
    from megatron.core.transformer.mlp import MLP

    from megatron_inpo.engine.swiglu import recomputed_when_saved, swiglu

    class SwiGLUMLP(MLP):
        """Megatron's MLP with the gated activation of engine/swiglu.py (no concatenation in backward, silu(gate)
        recomputed rather than kept, and the activation the second linear layer saves recomputed in backward) where
        the MLP is the plain Llama one; any other configuration runs Megatron's."""

        def forward(self, hidden_states, per_token_scale=None, **kwargs):
            c = self.config
            plain = (c.gated_linear_unit and c.activation_func is F.silu and not c.bias_activation_fusion
                     and not getattr(c, "use_te_activation_func", False) and per_token_scale is None
                     and getattr(c, "activation_func_clamp_value", None) is None
                     and not getattr(c, "glu_linear_offset", 0.0))
            if not plain:
                return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
            intermediate, bias = self.linear_fc1(hidden_states)
            if bias is not None:
                intermediate = intermediate + bias
            activation = swiglu(intermediate)
            with recomputed_when_saved(activation, intermediate):
                return self.linear_fc2(activation)

    return SwiGLUMLP


def use_swiglu_mlp(model: torch.nn.Module) -> None:
    """Every plain Megatron MLP of `model` becomes a SwiGLUMLP (same parameters and state; only forward differs).
    Done on the built model rather than in the layer spec: Megatron-Core 0.16.1's TransformerLayer recognises only
    MLP itself in a spec (a subclass gets a warning per layer), and 0.19 wraps the spec's MLP in a partial."""
    from megatron.core.transformer.mlp import MLP

    cls = swiglu_mlp_class()
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = cls


# ----------------------------------------------------------------------------------------------------------------
# Packed sequences (THD)


def packed_seq_params(batch):
    """Megatron's PackedSeqParams (qkv_format "thd") of a packed micro-batch (engine/batches.py: one row, its
    segments in `cu_seqlens`), or None for a padded one. The same object drives both specs: Megatron-Core applies
    RoPE per segment from cu_seqlens; TE's DotProductAttention runs its varlen kernel with mask type
    padding_causal (set by Megatron for thd); the local spec's SDPACoreAttention attends per segment."""
    if not batch.packed:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch.cu_seqlens.to(device=batch.tokens.device, dtype=torch.int32)
    longest = max(batch.segment_lengths)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                             max_seqlen_kv=longest)
    check_packed_seq_params(params, batch.tokens.numel(), batch_rows=int(batch.tokens.shape[0]))
    return params


def check_packed_seq_params(params, num_tokens: int, batch_rows: int = 1, tp: int = 1,
                            sequence_parallel: bool = False) -> None:
    """What both specs need of a PackedSeqParams, checked before any kernel sees it (a ValueError naming what is
    wrong): qkv_format 'thd'; one row (THD has no batch dimension); self-attention (kv offsets = q offsets);
    cu_seqlens int32, 1-D, from 0, strictly increasing (no empty segment: Megatron's RoPE split and TE's kernels
    need each length >= 1), ending at the row's token count; max_seqlen the longest segment (TE sizes its work
    by it and Megatron its RoPE table); with sequence parallelism the tokens divide over the TP ranks."""
    if params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params: qkv_format={params.qkv_format!r}, expected 'thd'")
    if batch_rows != 1:
        raise ValueError(f"packed_seq_params: a packed micro-batch is one row, got {batch_rows}")
    cu = params.cu_seqlens_q
    if cu is None or params.cu_seqlens_kv is None:
        raise ValueError("packed_seq_params: cu_seqlens_q and cu_seqlens_kv are required")
    if cu is not params.cu_seqlens_kv and not torch.equal(cu, params.cu_seqlens_kv):
        raise ValueError("packed_seq_params: cu_seqlens_kv must equal cu_seqlens_q (causal self-attention)")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"packed_seq_params: cu_seqlens must be a 1-D int32 tensor of >= 2 offsets, got "
                         f"{cu.dtype} of shape {tuple(cu.shape)}")
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or bool((lens <= 0).any()):
        raise ValueError(f"packed_seq_params: cu_seqlens must start at 0 and increase strictly, got {cu.tolist()}")
    if int(cu[-1]) != num_tokens:
        raise ValueError(f"packed_seq_params: cu_seqlens ends at {int(cu[-1])}, the row has {num_tokens} tokens")
    longest = int(lens.max())
    for name in ("max_seqlen_q", "max_seqlen_kv"):
        if getattr(params, name) != longest:
            raise ValueError(f"packed_seq_params: {name}={getattr(params, name)}, the longest segment is {longest}")
    if sequence_parallel and num_tokens % tp:
        raise ValueError(f"packed_seq_params: {num_tokens} tokens do not split over {tp} sequence-parallel ranks")


def layer_spec_for(cfg: MegatronModelConfig):
    """(ModuleSpec, name) for the resolved layer spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    name = cfg.resolved_layer_spec()
    if name == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(), "te"
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if cfg.attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention_class()
    if cfg.local_ops == "inplace":
        spec.submodules.self_attention.module = rope_self_attention_class()
    return spec, "local"


# ----------------------------------------------------------------------------------------------------------------
# Build


@dataclass
class Built:
    """The model chunk of this rank and what was decided while building it."""

    model: torch.nn.Module
    vocab_size: int
    padded_vocab_size: int
    layer_spec: str
    arch: Optional[LlamaArch] = None
    config: Optional[MegatronModelConfig] = None


def can_compile() -> bool:
    """Whether torch.compile (Inductor / Triton) can build kernels here: it needs a C compiler and Python.h."""
    import shutil
    import sysconfig

    cc = os.environ.get("CC", "gcc")
    has_cc = shutil.which(cc) is not None or shutil.which("cc") is not None
    return has_cc and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))


def transformer_config(arch: LlamaArch, cfg: MegatronModelConfig, sequence_parallel: bool = False):
    """Megatron TransformerConfig for `arch`; TP/PP sizes mirror parallel_state (else every stage builds all
    layers silently)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = {}
    if cfg.fp8:
        kw.update(fp8=cfg.fp8, fp8_recipe=FP8_RECIPES[cfg.fp8_recipe], fp8_amax_history_len=cfg.fp8_amax_history_len,
                  fp8_amax_compute_algo="max")
    if cfg.recompute_activations:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    compiled_fusions = cuda and can_compile()
    return TransformerConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=not cuda, sequence_parallel=sequence_parallel,
        # fused kernels exist only on CUDA (and some only with apex / TE); the SwiGLU and bias-dropout-add
        # fusions are torch.compile, which needs a C compiler and Python's headers where the job runs
        gradient_accumulation_fusion=False, persist_layer_norm=False, masked_softmax_fusion=False,
        bias_activation_fusion=compiled_fusions, bias_dropout_fusion=compiled_fusions, apply_rope_fusion=False,
        **kw,
    )


def build_model(hf_config: Mapping[str, Any], pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, precision: str = "fp32", layer_spec: str = "auto",
                fp8: Optional[str] = None, fp8_recipe: str = "delayed", sequence_parallel: bool = False,
                recompute_activations: bool = False, padded_vocab_size: Optional[int] = None,
                attention: str = "sdpa", config: Optional[MegatronModelConfig] = None) -> Built:
    """See the module docstring. `config` (engine.config.ModelConfig), when given, replaces the individual option
    arguments; its precision 'auto' resolves here (bf16 with CUDA, else fp32)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    cfg = config or MegatronModelConfig(precision=precision, layer_spec=layer_spec, attention=attention, fp8=fp8 or "",
                                fp8_recipe=fp8_recipe, recompute_activations=recompute_activations)
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision=cfg.resolved_precision(torch.cuda.is_available()))
    arch = LlamaArch.from_hf(hf_config)
    tp = ps.get_tensor_model_parallel_world_size()
    cfg.validate(arch, tp)
    arch.check_tp(tp)
    arch.check_pp(ps.get_pipeline_model_parallel_world_size())
    if padded_vocab_size is None:
        padded_vocab_size = padded_vocab(arch.vocab_size, tp, cfg.make_vocab_size_divisible_by)
    if padded_vocab_size < arch.vocab_size or padded_vocab_size % tp:
        raise ConfigError(f"padded_vocab_size={padded_vocab_size} must be >= vocab_size={arch.vocab_size} and "
                          f"divisible by TP={tp}")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    spec, spec_name = layer_spec_for(cfg)
    tconf = transformer_config(arch, cfg, sequence_parallel)
    model = GPTModel(
        config=tconf, transformer_layer_spec=spec, vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope["rope_theta"]) if float(arch.rope["rope_theta"]).is_integer()
        else arch.rope["rope_theta"],
    )
    if spec_name == "local" and cfg.local_ops == "inplace":
        use_swiglu_mlp(model)
    rot = getattr(model, "rotary_pos_emb", None)
    if rot is not None:  # exact HF inverse frequencies (rope scaling of any llama3 / linear config)
        rot.inv_freq = rope_inv_freq(arch, device=rot.inv_freq.device).to(rot.inv_freq.dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return Built(model, arch.vocab_size, padded_vocab_size, spec_name, arch, cfg)
