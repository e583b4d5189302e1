"""GPU memory plan of the SGLang servers: the --mem-fraction-static of each server, so that every server on a
shared GPU gets a KV cache that holds at least one batch at full context.

SGLang (0.5.23, mem_cache/kv_cache_configurator.py + distributed/bootstrap.py) sizes a server's KV pool from
the memory free *when that server starts* (`pre`, the minimum over its TP ranks), after its weights are loaded:

    kv = free_after_weights - pre * (1 - f)  =  f * pre - weights        (f = --mem-fraction-static)

and refuses to start when kv <= 0. The fractions of two servers on one GPU are therefore not shares of the GPU:
the second server's `pre` is what the first one left. `plan_server_memory` applies this rule in start order,
either to choose the fractions (equal KV share per server on a shared GPU) or to check given ones, and raises
MemoryPlanError naming the server when one would get less KV cache than its minimum. Beyond weights + KV each
server keeps free its runtime reserve (activations, CUDA graphs), by SGLang's own rule for its default fraction
(`sglang_runtime_reserve_gib`), so that no plan gives a server alone on a GPU more than SGLang itself would.

Model sizes come from the HF config.json (Llama family: parameter count from the architecture numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_inpo.config import ConfigError

GIB = 1 << 30

# SGLang's `--dtype auto` (configs/model_config.py): float32 checkpoints are served in float16, others as stored.
_SERVED_BYTES = {"float32": 2, "float": 2, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "float8_e4m3fn": 1}


class MemoryPlanError(ConfigError):
    """A server would get no (or too little) KV cache, or a GPU is oversubscribed; names the server."""


def llama_param_count(config: dict) -> int:
    """Parameters of a Llama-family HF config (LlamaForCausalLM, or *ForSequenceClassification reward models,
    whose head has num_labels rows instead of vocab_size)."""
    try:
        h, n_layers, ffn = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
        vocab, n_heads = config["vocab_size"], config["num_attention_heads"]
    except KeyError as e:
        raise ConfigError(f"config.json: missing {e.args[0]!r} (needed for the model's size)") from None
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = config.get("head_dim") or h // n_heads
    q, kv = n_heads * head_dim, n_kv * head_dim
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if config.get("attention_bias") else 0)
    mlp = 3 * h * ffn + (2 * ffn + h if config.get("mlp_bias") else 0)  # gate, up, down (SwiGLU)
    per_layer = attn + mlp + 2 * h  # + input / post-attention RMSNorm
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        head = h * (len(config.get("id2label") or {}) or config.get("num_labels") or 1)
    else:
        head = 0 if config.get("tie_word_embeddings") else h * vocab
    return vocab * h + n_layers * per_layer + h + head  # embedding, layers, final norm, output head


def served_bytes_per_param(config: dict, dtype: str = "auto") -> int:
    name = dtype if dtype != "auto" else (config.get("dtype") or config.get("torch_dtype") or "float32")
    if name not in _SERVED_BYTES:
        raise ConfigError(f"dtype: cannot size a server in {name!r}; one of {sorted(_SERVED_BYTES)}")
    return _SERVED_BYTES[name]


@dataclass(frozen=True)
class ModelMemory:
    """One server's per-GPU memory needs."""

    weights_gib: float
    """Weights on each of the server's GPUs: parameters x served bytes / TP."""
    kv_bytes_per_token: int
    """KV cache of one token on each GPU: 2 (K and V) x layers x KV heads per GPU x head dim x bytes."""

    @classmethod
    def from_hf_config(cls, config: dict, tp: int = 1, dtype: str = "auto", kv_dtype: str = "auto") -> "ModelMemory":
        if tp < 1:
            raise ConfigError(f"tp: must be >= 1, got {tp}")
        nbytes = served_bytes_per_param(config, dtype)
        kv_bytes = nbytes if kv_dtype == "auto" else served_bytes_per_param(config, kv_dtype)
        n_heads = config["num_attention_heads"]
        n_kv = config.get("num_key_value_heads") or n_heads
        head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
        kv_heads_per_gpu = max(1, n_kv // tp)  # SGLang replicates KV heads when TP exceeds their number
        return cls(weights_gib=llama_param_count(config) * nbytes / tp / GIB,
                   kv_bytes_per_token=2 * config["num_hidden_layers"] * kv_heads_per_gpu * head_dim * kv_bytes)


@dataclass(frozen=True)
class ServerSlot:
    """One server to place, in start order."""

    name: str
    """Shown in the plan and in errors, e.g. 'policy 0', 'judge'."""
    model: ModelMemory
    gpus: tuple[int, ...]
    """GPU ids of its TP ranks (same numbering for every server of the plan)."""
    min_kv_tokens: int
    """Fewest KV tokens it may have: one batch at full context (see launch/sglang_servers.py plan)."""
    mem_fraction: float | None = None
    """Given --mem-fraction-static to check; None: plan it."""


@dataclass(frozen=True)
class ServerMemory:
    name: str
    gpus: tuple[int, ...]
    mem_fraction: float
    free_at_start_gib: float
    """SGLang's `pre`: free memory on its fullest GPU when it starts, if the servers before it on that GPU hold
    only their static pool and what they had allocated by then (`started_overhead_gib`)."""
    kv_gib: float
    """KV pool per GPU by SGLang's rule f * pre - weights, for that `pre`: the plan's figure."""
    kv_tokens: int
    kv_min_gib: float
    """The KV pool if the servers before it already use their whole runtime reserve when it starts (less free
    memory, so less KV): the figure the minimum is checked against."""
    kv_min_tokens: int
    reserve_gib: float = 0.0
    """Its runtime reserve (activations, CUDA graphs) per GPU: SGLang's rule for its GPU size and TP, or the
    override."""


def sglang_defaults(gpu_gib: float, tp: int = 1) -> tuple[int, int]:
    """(chunked_prefill_size, decode CUDA-graph max batch size) that SGLang 0.5.23 picks for a GPU of `gpu_gib`
    total memory and TP `tp` when neither is given (arg_groups/memory_hook.py handle_gpu_memory_settings)."""
    mib = gpu_gib * 1024
    if mib < 20 * 1024:      # T4, 4080
        return 2048, 8
    if mib < 35 * 1024:      # A10, 4090, 5090
        return 4096, 48 if tp < 4 else 160
    if mib < 60 * 1024:      # A100 40GB, L40
        return 4096, 32 if tp < 4 else 160
    if mib < 160 * 1024:     # H100, A100 80GB, H20, H200
        return 8192, 256 if tp < 4 else 512
    return 16384, 512        # B200, MI300


def prefill_cuda_graph_sizes(max_tokens: int) -> list[int]:
    """The token counts SGLang captures prefill CUDA graphs for, up to `max_tokens` (the chunked-prefill size):
    arg_groups/cuda_graph_hook.py generate_prefill_cuda_graph_batch_sizes."""
    sizes = (list(range(4, 33, 4)) + list(range(48, 257, 16)) + list(range(288, 513, 32))
             + list(range(576, 1024 + 1, 64)) + list(range(1280, 4096 + 1, 256))
             + list(range(4608, max_tokens + 1, 512)))
    return [x for x in sizes if x <= max_tokens]


def sglang_runtime_reserve_gib(gpu_gib: float, tp: int = 1, chunked_prefill_size: int | None = None,
                               cuda_graph_max_bs: int | None = None, prefill_cuda_graph: bool = True,
                               pp: int = 1) -> float:
    """Memory a server uses beyond weights + KV cache (activations, CUDA graphs, attention metadata), by SGLang
    0.5.23's own rule for its default --mem-fraction-static (arg_groups/memory_hook.py
    handle_gpu_memory_settings and reserve_for_graph_mb; a dense model, no disaggregation, no DP attention):

        512 MiB + 1.5 MiB x max(chunked_prefill_size, 2048) + TP x PP / 8 GiB
          + 2 MiB per decode CUDA-graph batch size (max_bs) + 8 MiB per prefill CUDA-graph capture size,
        at least 10 GiB on a GPU over 60 GiB.

    `gpu_gib` is the GPU's total memory (SGLang reads nvidia-smi's memory.total); chunked_prefill_size and
    cuda_graph_max_bs default to SGLang's for that size and TP (sglang_defaults). Prefill CUDA graphs (breakable,
    captured up to the chunked-prefill size) are on by default on CUDA (model_executor/cuda_graph_config.py
    default_prefill_backend); prefill_cuda_graph=False for a server started with --disable-prefill-cuda-graph.
    An 80 GiB GPU at TP1: 512 + 12288 + 128 + 512 + 58 x 8 MiB = 13.58 GiB (13.125 without prefill graphs);
    at TP8: 14.95 GiB (14.5).
    """
    if gpu_gib <= 0 or tp < 1 or pp < 1:
        raise ConfigError(f"runtime reserve: need gpu_gib > 0, tp >= 1, pp >= 1, got {gpu_gib}, {tp}, {pp}")
    chunk_default, bs_default = sglang_defaults(gpu_gib, tp)
    chunk = chunk_default if chunked_prefill_size is None else chunked_prefill_size
    max_bs = bs_default if cuda_graph_max_bs is None else cuda_graph_max_bs
    # chunked prefill switched off (-1): activations scale with max_prefill_tokens (SGLang's default 16384)
    activation_tokens = max(chunk if chunk > 0 else 16384, 2048)
    mib = 512 + activation_tokens * 1.5 + tp * pp / 8 * 1024 + max_bs * 2
    if prefill_cuda_graph and chunk > 0:
        mib += len(prefill_cuda_graph_sizes(chunk)) * 8
    if gpu_gib * 1024 > 60 * 1024:
        mib = max(mib, 10 * 1024)
    return mib / 1024


# What a healthy SGLang server holds beyond its static pool before its first large batch: the CUDA context and
# cuBLAS workspace (~0.5 GiB on an H100) and its CUDA graphs (SGLang budgets 2 MiB per decode batch size, <= 512:
# <= 1 GiB). The rest of its runtime reserve (prefill activations) comes later, under load.
STARTED_OVERHEAD_GIB = 1.0


def _checked_reserves(servers: list[ServerSlot], given: list[bool], gpu_free_gib: float,
                      runtime_reserve_gib: float | None, started_overhead_gib: float, gpu_total_gib: float | None,
                      chunked_prefill_size: int | None) -> dict[str, float]:
    """plan_server_memory's arguments checked (MemoryPlanError naming the first bad one); each server's runtime
    reserve."""
    if any(given) and not all(given):
        raise MemoryPlanError("mem_fraction: give it for every server (check) or for none (plan)")
    if not gpu_free_gib > 0:
        raise MemoryPlanError(f"gpu_memory_gib: must be > 0, got {gpu_free_gib}")
    if runtime_reserve_gib is not None and runtime_reserve_gib < 0:
        raise MemoryPlanError(f"runtime_reserve_gib: must be >= 0, got {runtime_reserve_gib}")
    if gpu_total_gib is not None and gpu_total_gib < gpu_free_gib:
        raise MemoryPlanError(f"gpu_total_gib: {gpu_total_gib} is less than the {gpu_free_gib} GiB free")
    for s in servers:
        if not s.gpus:
            raise MemoryPlanError(f"{s.name}: no GPUs")
        if s.mem_fraction is not None and not 0 < s.mem_fraction < 1:
            raise MemoryPlanError(f"{s.name}: mem_fraction must lie in (0, 1), got {s.mem_fraction}")
    reserve = {s.name: runtime_reserve_gib if runtime_reserve_gib is not None else
               sglang_runtime_reserve_gib(gpu_total_gib or gpu_free_gib, tp=len(s.gpus),
                                          chunked_prefill_size=chunked_prefill_size) for s in servers}
    if not 0 <= started_overhead_gib <= min(reserve.values()):
        raise MemoryPlanError(f"started_overhead_gib: must lie in [0, runtime reserve {min(reserve.values()):g}], "
                              f"got {started_overhead_gib}")
    return reserve


def plan_server_memory(servers: list[ServerSlot], gpu_free_gib: float, runtime_reserve_gib: float | None = None,
                       started_overhead_gib: float = STARTED_OVERHEAD_GIB, gpu_total_gib: float | None = None,
                       chunked_prefill_size: int | None = None) -> list[ServerMemory]:
    """--mem-fraction-static and KV cache of each server, started in the given order on GPUs that each have
    `gpu_free_gib` free before the first one.

    Each server's runtime reserve is SGLang's own (sglang_runtime_reserve_gib) for a GPU of `gpu_total_gib`
    (default: gpu_free_gib), its TP (the number of its GPUs) and `chunked_prefill_size` (default: SGLang's for
    that GPU); `runtime_reserve_gib` overrides it for every server.

    Budget: every server on a GPU holds weights + KV + its runtime reserve at peak, and together they must fit.
    Plan (no mem_fraction given): on each GPU, what is left after every server's weights and reserve is split
    equally between the servers on it (a TP server gets the smallest of its GPUs' shares: its pool is the same
    size on every rank), and f = (weights + kv) / pre, rounded down to SGLang's 3 decimals. `pre` is taken with
    the servers before it holding their static pool + started_overhead_gib (servers start one after another,
    each once the previous answered /health), the most a later server can see: its KV can then only come out
    smaller than planned, never crowd the earlier servers' reserve. kv_min is the other end (earlier servers
    already at their full reserve), and is what must reach min_kv_tokens.
    Check (every mem_fraction given): the same figures for the given fractions, and the GPU must hold them.
    Raises MemoryPlanError listing every server below its min_kv_tokens and every oversubscribed GPU.
    """
    if not servers:
        return []
    given = [s.mem_fraction is not None for s in servers]
    reserve = _checked_reserves(servers, given, gpu_free_gib, runtime_reserve_gib, started_overhead_gib,
                                gpu_total_gib, chunked_prefill_size)

    share: dict[str, float] = {}
    if not all(given):
        on_gpu: dict[int, list[ServerSlot]] = {}
        for s in servers:
            for g in s.gpus:
                on_gpu.setdefault(g, []).append(s)
        for s in servers:
            share[s.name] = min((gpu_free_gib - sum(t.model.weights_gib + reserve[t.name] for t in on_gpu[g]))
                                / len(on_gpu[g]) for g in s.gpus)

    free_hi = {g: gpu_free_gib for s in servers for g in s.gpus}  # earlier servers: static + started overhead
    free_lo = dict(free_hi)                                       # earlier servers: static + full reserve
    peak = {g: 0.0 for g in free_hi}                               # what all servers hold at peak, per GPU
    plans, problems = [], []
    for s in servers:
        pre, pre_lo = min(free_hi[g] for g in s.gpus), min(free_lo[g] for g in s.gpus)  # SGLang: min over ranks
        if s.mem_fraction is None:
            f = math.floor(max(0.0, s.model.weights_gib + share[s.name]) / pre * 1000) / 1000 if pre > 0 else 0.0
        else:
            f = s.mem_fraction
        kv, kv_lo = f * pre - s.model.weights_gib, f * pre_lo - s.model.weights_gib
        tokens, tokens_lo = (max(0, int(x * GIB // s.model.kv_bytes_per_token)) for x in (kv, kv_lo))
        for g in s.gpus:
            free_hi[g] -= f * pre + started_overhead_gib
            free_lo[g] -= max(f * pre_lo, s.model.weights_gib) + reserve[s.name]
            peak[g] += f * pre + reserve[s.name]
        plans.append(ServerMemory(s.name, s.gpus, f, pre, kv, tokens, kv_lo, tokens_lo, reserve[s.name]))
        if tokens_lo < s.min_kv_tokens:
            what = "no KV cache (SGLang refuses to start)" if kv_lo <= 0 else \
                f"a KV cache of {kv_lo:.2f} GiB = {tokens_lo:,} tokens"
            problems.append(f"{s.name} (GPUs {','.join(map(str, s.gpus))}): mem_fraction {f:.3f} of the "
                            f"{pre_lo:.1f} GiB free at its start (the servers before it at their full runtime "
                            f"reserve) leaves {what}, below its minimum of {s.min_kv_tokens:,} tokens "
                            f"({s.min_kv_tokens * s.model.kv_bytes_per_token / GIB:.2f} GiB); weights "
                            f"{s.model.weights_gib:.2f} GiB per GPU")
    for g, used in sorted(peak.items()):
        if used > gpu_free_gib + 1e-9:
            problems.append(f"GPU {g}: the servers' weights + KV + runtime reserve "
                            f"({', '.join(f'{reserve[s.name]:.2f}' for s in servers if g in s.gpus)} GiB) exceed "
                            f"its {gpu_free_gib:g} GiB by {used - gpu_free_gib:.2f} GiB")
    if problems:
        raise MemoryPlanError("SGLang server memory does not fit:\n  " + "\n  ".join(problems) +
                              "\n(give the judge GPUs of its own, fewer / smaller servers per GPU, or a larger GPU)")
    return plans


def format_plan(plans: list[ServerMemory]) -> str:
    rows = [f"{'server':<12} {'GPUs':<16} {'mem_fraction':>12} {'free at start':>14} {'KV GiB/GPU':>14} "
            f"{'KV tokens':>20} {'reserve GiB':>12}"]
    rows += [f"{p.name:<12} {','.join(map(str, p.gpus)):<16} {p.mem_fraction:>12.3f} {p.free_at_start_gib:>14.2f} "
             f"{f'{p.kv_min_gib:.2f}-{p.kv_gib:.2f}':>14} {f'{p.kv_min_tokens:,}-{p.kv_tokens:,}':>20} "
             f"{p.reserve_gib:>12.2f}" for p in plans]
    return "\n".join(rows)
