"""The Megatron-Core policy engine: one config tree, the model, its parallel runtime, the training and log-prob
stages and their checkpoints.

    config.py      MegatronConfig (parallel, model), TrainConfig(OptimizerConfig), LogprobConfig, and the stage
                   configs TrainStageConfig / LogprobStageConfig that `megatron-inpo train` / `logprobs` run
    train.py       train(TrainStageConfig): the step loop, checkpoints, exact resume
    logprobs.py    run_logprobs(LogprobStageConfig): the resumable forward-only pass
    step.py        run_schedule(model, batches, loss, head): one forward_step for every stage; losses as objects
                   (PreferenceLoss, SFTLoss, PairLogpsProbe); OutputHead; global_metrics
    head.py        label_logps: log p(label) from the final hidden states, a chunk of tokens at a time
    rope.py, swiglu.py   the local spec's RoPE and SwiGLU without concatenations, keeping less for backward
                   (model.py builds them in)
    batches.py     SequenceBatch, pair / SFT micro-batches padded or packed (plan_step: first-fit decreasing rows,
                   THD cu_seqlens), the seeded data order (step_items, optionally length-grouped)
    optimizer.py   build_optimizer, the fused torch AdamW, the torch-Adam repairs around loads
    policy.py      init_runtime, build_policy, wrap_ddp, load_frozen_policy
    model.py       build_model: GPTModel for the Llama family from an HF config.json (local / TE spec);
                   packed_seq_params (THD) and the local spec's per-sequence attention of packed rows
    checkpoint.py  the checkpoint format (META_FILE, read_meta; shared with the converters), save / load
    parallel.py, cpu.py   Megatron's process groups; the CPU (gloo) mode
    mapping.py     HF <-> Megatron parameter names and layouts;  metrics.py  FLOPs, MFU, scalar log, progress
    compat.py      the supported megatron-core releases (0.16.1, 0.19.x): every difference between them, named
                   with the release that made it, and the upstream notices a user cannot act on (filtered)

This is the only package that imports megatron.core (and transformer_engine), always lazily inside functions, so
`import megatron_inpo.engine` itself stays cheap and works without them.
"""
from megatron_inpo.engine.compat import quiet_upstream_notices

# Before anything here imports Megatron-Core (whose imports print some of them): the CLI does the same first thing,
# and a library user of the engine or the converters gets the same output.
quiet_upstream_notices()
