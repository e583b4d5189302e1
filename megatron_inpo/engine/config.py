"""The policy engine's one config tree: parallelism, model build, optimizer, training and log-prob stages.

    MegatronConfig (`megatron.` in a run and in every stage YAML)
        parallel: ParallelConfig        TP / PP sizes (Megatron's names), sequence parallel, distributed optimizer
        model:    MegatronModelConfig           precision, layer spec, FP8, recomputation
        packing:  bool                  packed rows (THD) instead of padded micro-batches, in every stage
    TrainConfig(OptimizerConfig)        one training stage's schedule; inherits the optimizer fields
    LogprobConfig                       the forward-only log-prob pass
    TrainStageConfig / LogprobStageConfig   what one `megatron-inpo train` / `logprobs` process runs: paths, the
                                            MegatronConfig and the stage's config, composed whole

The driver's RunConfig embeds the same objects (`megatron`, `train`, `sft`, `logprobs`) and hands them to a stage
as they are, so a field added here is settable from `run`, `train` and `logprobs` under the same dotted name and
reaches the stage without any copying. As in Megatron-Core (`TransformerConfig(ModelParallelConfig)`), a config
that extends another inherits it rather than repeating its fields.

Every field has a docstring (`--help` prints its first line) and `validate()` raises ConfigError naming the field
(megatron_inpo.config.validate_all prefixes the dotted path). Checks that need the machine (CUDA, TE, the world
size) run when the stage starts: `MegatronModelConfig.validate(arch, tp)` and `TrainStageConfig.validate_runtime`.
This module imports no torch or megatron at module level.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_inpo.config import ConfigError
from megatron_inpo.objectives import ObjectiveConfig

AUTO = "auto"
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise", "tensorwise": "tensorwise"}
FP8_FORMATS = ("hybrid", "e4m3")
LAYER_SPECS = (AUTO, "local", "te")
PRECISIONS = (AUTO, "fp32", "bf16", "fp16")
LOSSES = ("preference", "sft")


def _positive_ints(cfg, names) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}: must be a positive integer, got {v!r}")


def _non_negative_ints(cfg, names) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name}: must be an integer >= 0, got {v!r}")


# ----------------------------------------------------------------------------------------------------------------
# Parallelism and model build


@dataclass
class ParallelConfig:
    """How the model is split over processes (Megatron's names); DP = world size / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    """TP size. Must divide the attention heads and KV groups; checkpoints reshard on load."""
    pipeline_model_parallel_size: int = 1
    """PP size. Must divide the number of layers."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1; saves activation memory)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks (Megatron's distributed optimizer, ZeRO-1 like)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (GPU)."""

    def validate(self) -> None:
        _positive_ints(self, ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("sequence_parallel: needs tensor_model_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP of a launch of `world_size` processes; a ConfigError when TP x PP does not divide it."""
        if world_size % self.model_parallel_size:
            raise ConfigError(f"tensor_model_parallel_size x pipeline_model_parallel_size = {self.model_parallel_size}"
                              f" does not divide the world size {world_size}")
        return world_size // self.model_parallel_size


@dataclass
class MegatronModelConfig:
    """How to build the Megatron model; the architecture itself comes from the HF config.json."""

    precision: str = AUTO
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16', 'fp32' or 'fp16'. bf16 keeps fp32 master weights in the
    optimizer; log-softmax is computed in fp32 either way. bf16 also runs on CPU (slowly; the tests use it)."""
    layer_spec: str = AUTO
    """'auto' (Transformer Engine when it imports on CUDA, else local), 'te' (GPU only) or 'local'."""
    attention: str = "sdpa"
    """Core attention of the local spec: 'sdpa' (ours, torch scaled_dot_product_attention) or 'unfused'
    (Megatron's DotProductAttention, materialises the score matrix). Ignored by the TE spec."""
    local_ops: str = "inplace"
    """Rotary embeddings and the SwiGLU activation on the local spec. 'inplace' (ours): RoPE with each half written
    in place, cos / sin once per forward, query, key and value in the layout SDPA reads, so the fused QKV output is
    not kept for backward (engine/rope.py); SwiGLU whose backward writes both halves in place and recomputes
    silu(gate) instead of keeping it, and whose output, the second MLP linear layer's input, is recomputed in
    backward rather than kept (engine/swiglu.py). Both are bit for bit Megatron's values and gradients.
    'megatron': Megatron-Core's unfused RoPE and gated MLP, which concatenate in every layer. Ignored by the TE
    spec (TE's own kernels)."""
    fp8: str = ""
    """'' (off), 'hybrid' (E4M3 forward, E5M2 backward) or 'e4m3': Transformer Engine FP8 (GPU, TE spec, bf16)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling: 'delayed' (amax history) or 'current' (per-tensor current scaling, Megatron's 'tensorwise';
    also accepted under that name)."""
    fp8_amax_history_len: int = 1024
    """Length of the amax history of the delayed recipe."""
    recompute_activations: bool = False
    """Full activation recomputation, one layer at a time (saves memory, costs one extra forward; 70B)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding rows are padded to a multiple of this times TP."""

    def resolved_precision(self, cuda: bool) -> str:
        return ("bf16" if cuda else "fp32") if self.precision == AUTO else self.precision

    def resolved_layer_spec(self) -> str:
        """'te' or 'local': the one rule for 'auto', used by training, the log-prob pass and the driver's import."""
        if self.layer_spec == AUTO:
            from megatron_inpo.engine.machine import te_available

            return "te" if te_available() else "local"
        return self.layer_spec

    def validate(self, arch=None, tp: int = 1) -> None:
        """The values; with `arch` (an engine.model.LlamaArch, at build time) also what needs the machine: CUDA and
        TE for the TE spec and FP8, and FP8's size constraints on each of the `tp` tensor-parallel ranks."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: expected one of {PRECISIONS}")
        if self.layer_spec not in LAYER_SPECS:
            raise ConfigError(f"layer_spec={self.layer_spec!r}: expected one of {LAYER_SPECS}")
        if self.attention not in ("sdpa", "unfused"):
            raise ConfigError(f"attention={self.attention!r}: expected 'sdpa' or 'unfused'")
        if self.local_ops not in ("inplace", "megatron"):
            raise ConfigError(f"local_ops={self.local_ops!r}: expected 'inplace' or 'megatron'")
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError("make_vocab_size_divisible_by must be >= 1")
        if self.fp8:
            if self.fp8 not in FP8_FORMATS:
                raise ConfigError(f"fp8={self.fp8!r}: expected '' or one of {FP8_FORMATS}")
            if self.fp8_recipe not in FP8_RECIPES:
                raise ConfigError(f"fp8_recipe={self.fp8_recipe!r}: expected one of {sorted(FP8_RECIPES)}")
            if self.fp8_amax_history_len < 1:
                raise ConfigError("fp8_amax_history_len must be >= 1")
            if self.layer_spec == "local":
                raise ConfigError("fp8: needs the Transformer Engine layer spec; set layer_spec to 'te' or 'auto'")
            if self.precision == "fp32":
                raise ConfigError("fp8: needs precision 'bf16' (or 'auto' on GPU) for the non-FP8 parts, got 'fp32'")
        if arch is not None:
            from megatron_inpo.engine.machine import check_model_on_this_machine

            check_model_on_this_machine(self, arch, tp)

@dataclass
class MegatronConfig:
    """The Megatron-Core policy engine: how the model is split and built (shared by every Megatron stage)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallelism."""
    model: MegatronModelConfig = field(default_factory=MegatronModelConfig)
    """Model build: precision, layer spec, FP8, recomputation."""
    packing: bool = True
    """Pack the sequences of several pairs (or SFT sequences) into rows instead of padding each micro-batch
    (training, SFT and the log-prob pass). Rows hold up to train.max_seq_len tokens (the log-prob pass: the
    tokens of one padded micro-batch of the chunk), filled first-fit decreasing with whole pairs (a longer pair
    gets a row of its own); each row is a micro-batch, attention and positions stay within each sequence
    (Megatron's THD PackedSeqParams: TE's varlen attention, or per-sequence SDPA on the local spec). Exact: each sequence is computed as it would be alone
    (bit for bit on CPU); log-probs, loss and gradients equal the padded path to float32 rounding (tested at TP=1,
    TP=2, PP=2, DP=2). On by default because it is also faster: `tools/bench_train.py --lengths lognormal`
    (cpu-small, lengths lognormal with median max_seq_len/8) measured 1.43x the real-token throughput of padded
    micro-batches sorted by length (3.1x that of padding a step to its longest, what pipeline parallelism needs)
    on 2 shared CPU cores, 2026-12-02. Where a step is bound by per-op overhead rather than by tokens (the
    2-layer, 64-wide tiny_cpu demo: packed 0.41x), the recipe turns it off. false: padded micro-batches,
    length-sorted within the step (and `train.length_buckets` to group lengths across steps)."""
    logps: str = "chunked"
    """How log p(token) comes out of the model, in training and the log-prob pass. 'chunked': from the final hidden
    states, a chunk of tokens at a time (head matmul, max, log-sum-exp and the label's logit; recomputed in
    backward; vocabulary-parallel under TP; engine/head.py), so no [tokens x vocab] tensor is kept, and only for the
    tokens the loss counts (the response tokens; prompt tokens cost no head matmul). 'logits': the
    model's full logits through Megatron's vocab-parallel cross entropy, the reference path of earlier releases
    (kept for one release; equal to 'chunked' to <= 1e-6 relative in float32, tests/engine/test_head.py)."""
    logps_chunk_tokens: int = 1024
    """Tokens per chunk of logps 'chunked': each chunk's [tokens x vocab/TP] float32 logits exist one at a time
    (1024 x 49k x 4 B = 0.2 GB; at Llama-3's 128k vocabulary 0.5 GB per TP rank)."""

    def validate(self) -> None:
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing: must be true or false, got {self.packing!r}")
        if self.logps not in ("chunked", "logits"):
            raise ConfigError(f"logps: must be 'chunked' or 'logits', got {self.logps!r}")
        _positive_ints(self, ("logps_chunk_tokens",))
        self._check_packing(self.model.layer_spec)

    def _check_packing(self, layer_spec: str) -> None:
        """Packing on the local spec needs our SDPA core attention (Megatron's unfused one has no packed path);
        called with the configured spec here and with 'auto' resolved at launch (validate_runtime)."""
        if self.packing and layer_spec == "local" and self.model.attention != "sdpa":
            raise ConfigError(f"packing: needs model.attention 'sdpa' on the local layer spec (Megatron's "
                              f"{self.model.attention!r} attention has no packed-sequence path); or set packing false")

    def validate_runtime(self, world_size: int, cuda: bool) -> int:
        """Checks that need the launch; returns the data-parallel size."""
        dp = self.parallel.data_parallel_size(world_size)
        try:
            self._check_packing(self.model.resolved_layer_spec())
        except ConfigError as e:
            raise ConfigError(f"megatron.{e}") from None
        if not cuda:
            # bf16 is allowed on CPU: Megatron's bf16 optimizers (fp32 master weights) run under gloo, which is how
            # the CPU suite tests the mixed-precision path; it is slower than fp32 there.
            if self.model.fp8:
                raise ConfigError("model.fp8: needs a GPU with Transformer Engine; this machine has no CUDA")
            if self.model.layer_spec == "te":
                raise ConfigError("model.layer_spec: 'te' needs a GPU with Transformer Engine; use 'auto' or 'local'")
        return dp


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, training, log-probs


@dataclass
class OptimizerConfig:
    """AdamW with warm-up and decay (Megatron's optimizer and OptimizerParamScheduler)."""

    lr: float = 5e-7
    """Peak learning rate (the paper: 5e-7 for 8B)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear warm-up from 0 (the paper: 0.03)."""
    lr_decay_style: str = "cosine"
    """'cosine', 'linear' or 'constant' (Megatron's OptimizerParamScheduler styles)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"min_lr: must lie in [0, lr={self.lr}], got {self.min_lr}")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise ConfigError(f"warmup_ratio: must lie in [0, 1), got {self.warmup_ratio}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_decay_style: 'cosine', 'linear' or 'constant', got {self.lr_decay_style!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ConfigError(f"{name}: must lie in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"adam_eps: must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ConfigError(f"clip_grad: must be >= 0, got {self.clip_grad}")

    def lr_steps(self, total_steps: int) -> tuple[int, int]:
        """(warm-up steps, decay steps) of the schedule."""
        warmup = int(round(self.warmup_ratio * total_steps))
        return warmup, max(total_steps, warmup + 1)


@dataclass
class TrainConfig(OptimizerConfig):
    """One training stage (an INPO iteration's policy update, or SFT): the optimizer (inherited) and the schedule."""

    micro_batch_size: int = 1
    """Pairs (preference) or sequences (SFT) per micro-batch on one data-parallel rank; a pair is 2 sequences."""
    global_batch_size: int = 128
    """Pairs / sequences per optimizer step over all data-parallel ranks (the paper: 128)."""
    epochs: int = 1
    """Passes over the data (each pass reshuffled); ignored when train_iters > 0."""
    train_iters: int = 0
    """Optimizer steps; 0 = epochs x (items // global_batch_size). The remainder of an epoch is dropped."""
    max_seq_len: int = 4096
    """Longest prompt + response allowed; a longer item is an error naming its line."""
    pad_multiple: int = 8
    """Pad the sequence length to a multiple of this (kernels and sequence parallelism like round shapes)."""
    shuffle: bool = True
    """Shuffle the items each epoch (seeded; the order is part of the resumable state)."""
    length_buckets: int = 0
    """Length-grouped global batches, for padded (megatron.packing false) training: 0 = off; k > 0 = each epoch's
    order cut into buckets of k global batches, each sorted by length, the resulting global batches shuffled. Less
    padding; a step's items then have similar lengths. Deterministic in (seed, step), so resume stays exact."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end); a killed stage resumes from the newest."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the stage's checkpoints/ (0 keeps all)."""
    log_interval: int = 1
    """Log scalars every this many steps."""
    peak_tflops: float = 989.0
    """Accelerator peak TFLOP/s for MFU (H100 dense bf16 989; FP8 1979). 0 disables MFU."""
    stop_after_steps: int = 0
    """Exit (without the final save) after this many steps of this process; for tests of interrupted runs."""

    def validate(self) -> None:
        super().validate()
        _positive_ints(self, ("micro_batch_size", "global_batch_size", "epochs", "pad_multiple", "log_interval",
                              "max_seq_len"))
        _non_negative_ints(self, ("train_iters", "save_interval", "keep_checkpoints", "stop_after_steps",
                                  "length_buckets"))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size}")
        if not (self.peak_tflops >= 0 and math.isfinite(self.peak_tflops)):
            raise ConfigError(f"peak_tflops: must be >= 0, got {self.peak_tflops}")

    def total_steps(self, n_items: int) -> int:
        return self.train_iters or self.epochs * (n_items // self.global_batch_size)

    def check_data_parallel(self, dp: int) -> None:
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size x "
                              f"data-parallel size = {self.micro_batch_size} x {dp}")


@dataclass
class LogprobConfig:
    """The forward-only pass that stores log pi_ref and log pi_t of every (y_w, y_l)."""

    micro_batch_size: int = 4
    """Pairs per micro-batch (2x sequences: chosen and rejected always together)."""
    chunk_pairs: int = 256
    """Pairs per resumable chunk (sorted by length inside a chunk to cut padding)."""
    pad_multiple: int = 8
    """Pad the sequence length to a multiple of this."""
    fp8: bool = False
    """Run this forward in FP8 too when training does (megatron.model.fp8). Default false: the stored log-probs are
    the fixed anchors of every step of the iteration (log pi_ref is the KL anchor), computed once by a forward-only
    pass that costs about a third of one training step's FLOPs per pair, so they are computed in the model's
    precision (bf16) rather than with FP8's quantisation error; and with the delayed recipe a forward-only pass over
    a checkpoint without FP8 state (a converter output, e.g. pi_ref) would start from scale 1.0, having no amax
    history. With true, a checkpoint trained in FP8 brings its amax history and scales (TE's extra state); one
    without starts from 1.0 (use fp8_recipe: current there)."""

    def validate(self) -> None:
        _positive_ints(self, ("micro_batch_size", "chunk_pairs", "pad_multiple"))

    def forward_engine(self, engine: MegatronConfig) -> MegatronConfig:
        """The engine config this pass builds its models with: FP8 dropped unless `fp8` is true."""
        if self.fp8 or not engine.model.fp8:
            return engine
        return dataclasses.replace(engine, model=dataclasses.replace(engine.model, fp8=""))


def logprob_row_capacity(micro_batch_size: int, longest: int) -> int:
    """Tokens of a packed row in the log-prob pass (which has no max_seq_len): those of one padded micro-batch of
    the chunk, 2 x micro_batch_size sequences of its `longest` one, so a row needs no more activation memory."""
    return 2 * micro_batch_size * longest


def batch_pad_multiple(pad_multiple: int, engine: MegatronConfig) -> int:
    """`pad_multiple`, raised for FP8: TE's FP8 GEMMs need each rank's token rows divisible by 16, and under
    sequence parallelism a sequence is split over the TP ranks. Padding is masked, so values do not change."""
    if not engine.model.fp8:
        return pad_multiple
    p = engine.parallel
    return math.lcm(pad_multiple, 16 * (p.tensor_model_parallel_size if p.sequence_parallel else 1))


# ----------------------------------------------------------------------------------------------------------------
# Stages: what one process group runs


@dataclass
class StageConfig:
    """What every Megatron stage has: the engine, the seed and how progress is shown."""

    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    """The policy engine (parallelism, model build)."""
    seed: int = 1234
    """Seed of Megatron's RNG and of the data order."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    progress_file: str = ""
    """Where rank 0 writes its progress as JSON after each step or chunk ({"done", "total", ...}); the driver reads
    it to show the stage on one live line. '' = none."""

    REQUIRED_PATHS = ()  # the stage's path fields that must be set

    def validate(self) -> None:
        for name in self.REQUIRED_PATHS:
            if not getattr(self, name):
                raise ConfigError(f"{name}: required (path)")


@dataclass
class TrainStageConfig(StageConfig):
    """One training stage: `megatron-inpo train --config stage.yaml`."""

    data: str = ""
    """Training JSONL. preference: output of `megatron-inpo logprobs`; sft: {"prompt_ids", "response_ids"}."""
    init_checkpoint: str = ""
    """megatron-inpo checkpoint to start from (converter output or a training checkpoint; any TP/PP)."""
    output_dir: str = ""
    """Stage directory: checkpoints/, tensorboard/, train_config.yaml, train_result.json."""
    loss: str = "preference"
    """'preference' (pairs with stored log-probs, the objective below) or 'sft' (NLL of prompt_ids/response_ids)."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The preference objective (unused by the SFT loss)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer and schedule."""

    REQUIRED_PATHS = ("data", "init_checkpoint", "output_dir")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss: must be one of {LOSSES}, got {self.loss!r}")
        super().validate()
        p = self.megatron.parallel
        if p.sequence_parallel and self.train.pad_multiple % p.tensor_model_parallel_size:
            raise ConfigError(f"train.pad_multiple: {self.train.pad_multiple} must be a multiple of "
                              f"megatron.parallel.tensor_model_parallel_size {p.tensor_model_parallel_size} with "
                              "sequence_parallel (the sequence is split over TP)")

    def validate_runtime(self, world_size: int, cuda: bool) -> int:
        """Checks that need the launch: returns the data-parallel size."""
        dp = self.megatron.validate_runtime(world_size, cuda)
        self.train.check_data_parallel(dp)
        return dp


@dataclass
class LogprobStageConfig(StageConfig):
    """One log-prob pass: `megatron-inpo logprobs --config stage.yaml`."""

    data: str = ""
    """Preference JSONL (megatron_inpo.data.preferences) whose pairs need log-probs."""
    output: str = ""
    """Output JSONL: the same pairs with ref_chosen_logp, ref_rejected_logp, last_chosen_logp, last_rejected_logp."""
    ref_checkpoint: str = ""
    """megatron-inpo checkpoint of pi_ref (the SFT model)."""
    last_checkpoint: str = ""
    """Checkpoint of the previous iterate pi_t; '' or the same path as ref_checkpoint at iteration 1."""
    logprobs: LogprobConfig = field(default_factory=LogprobConfig)
    """Micro-batching and chunking of the pass."""

    REQUIRED_PATHS = ("data", "output", "ref_checkpoint")

    def validate(self) -> None:
        from pathlib import Path

        super().validate()
        if Path(self.output).resolve() == Path(self.data).resolve():
            raise ConfigError("output: must differ from data (the input is read while the output is written)")

    def same_models(self) -> bool:
        from pathlib import Path

        return not self.last_checkpoint or Path(self.last_checkpoint).resolve() == Path(self.ref_checkpoint).resolve()
