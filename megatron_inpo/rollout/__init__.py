"""Rollout: sample K responses per prompt from pi_t (Algorithm 1, step 3) and hand them to the judge stage.

API summary (what the iteration driver calls)::

    from megatron_inpo.data.prompts import read_prompts, PromptRecord       # JSONL {"id", "prompt", ...}
    from megatron_inpo.rollout import SamplingConfig, RolloutConfig, make_engine, generate_preferences

    sampling = SamplingConfig(n=8, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=1234)
    cfg = RolloutConfig(backend="local", model_path="hf_dir", sampling=sampling)   # or backend="sglang",
    engine = make_engine(cfg)                                                       # server_urls=[...]
    rollouts = engine.rollout(prompts, iteration=1)     # list[Rollout]: prompt, prompt_ids, completions (K each)
    # lower level: engine.generate(prompt_ids: list[list[int]], sampling, seeds) -> list[list[Completion]]

    from megatron_inpo.judge import ProgrammaticJudge, build_preferences
    judge = ProgrammaticJudge(pref_fn=lambda prompt, a, b: 0.7)      # P(a beats b | prompt), see judge/__init__
    pairs, dropped, stats = build_preferences(rollouts, judge, method="tournament", iteration=1,
                                              model_version="iter0")  # list[PreferencePair], ids dropped
    # resumable end-to-end stage: generate -> judge -> append JSONL per prompt batch; a re-run skips done prompts
    summary = generate_preferences(prompts, engine, judge, out_path, method="tournament", iteration=1,
                                   model_version="iter0", batch_size=64)
    # the same pieces as two stages (the driver): all samples to rollouts.jsonl, then judged into pairs.jsonl
    from megatron_inpo.rollout.pipeline import judge_stage, rollout_stage
    rollout_stage(prompts, lambda: contextlib.nullcontext(engine), "rollouts.jsonl", iteration=1)
    judge_stage("rollouts.jsonl", judge, "tournament", "pairs.jsonl", iteration=1, model_version="iter0")
    engine.update_weights("new_hf_dir", version="iter1")   # SGLang: /update_weights_from_disk (flush_cache: true)
    engine.close()

SGLang servers from Python (launch/sglang_servers.py is the command-line face of the same code)::

    from megatron_inpo.serving.servers import ServerLaunchConfig, start_servers, stop_servers
    urls = start_servers(ServerLaunchConfig(model_path=hf_dir, num_servers=4, tp=2), "run/sglang.json")
    ...; stop_servers("run/sglang.json")

Stage config for `megatron-inpo rollout`: megatron_inpo.cli.rollout.RolloutStageConfig; its --recipe takes a run
recipe's rollout, judge and pair selection (megatron_inpo.driver.recipes).

Seeds: each (prompt, sample j) gets its own seed derived from (SamplingConfig.seed, iteration, prompt id, j), so
samples do not depend on batching, resumption or the number of servers (``prompt_seed``).

Completion.token_ids are response tokens only, the stop/EOS token included when the policy emitted it (the
PreferencePair convention). Throughput (prompts/s, tokens/s) is logged by both engines: ``engine.meter``.
"""
from megatron_inpo.rollout.engine import (  # noqa: F401
    Completion,
    Rollout,
    RolloutConfig,
    RolloutEngine,
    SamplingConfig,
    Throughput,
    make_engine,
    prompt_seed,
)
from megatron_inpo.rollout.pipeline import generate_preferences  # noqa: F401
