"""The synthetic task of the embedded default (plain Python / torch, no Megatron).

    from megatron_inpo.task import TaskConfig, prepare_task, prob_a_beats_b, quality
    paths = prepare_task("runs/x/task", TaskConfig(), iterations=3)   # tokenizer, prompts, SFT data, init model

The judge of the task is `megatron_inpo.task.oracle:prob_a_beats_b` (JudgeConfig kind 'programmatic').
"""
from megatron_inpo.task.oracle import prob_a_beats_b, quality, rps, style_of  # noqa: F401
from megatron_inpo.task.synthetic import TaskConfig, make_prompts, make_sft, prepare_task  # noqa: F401
