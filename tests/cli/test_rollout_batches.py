"""`megatron-inpo rollout` shows life (issue 20): by default it appends one engine batch of prompts at a time, and
with --no-progress it logs a line per batch, written once that batch's pairs are on disk."""
import json
import logging

import pytest

from megatron_inpo.cli import main as top_main
from tests.helpers.rollout import make_tiny_llama, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def test_default_batches_are_one_engine_batch_with_a_line_each(tmp_path, caplog, monkeypatch):
    import megatron_inpo.rollout.pipeline as pipeline

    pol = tmp_path / "pol"
    make_tiny_llama(pol, seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"x{i}", "prompt": f"q{i}?"}) + "\n" for i in range(16)))
    out = tmp_path / "prefs.jsonl"
    on_disk = []
    line = pipeline._batch_line

    def spy(desc, k, batches, done, total, *a, **kw):  # what is on disk when the batch's line is written
        files = [out, pipeline.dropped_path(out)]
        on_disk.append(sum(len(f.read_text().splitlines()) for f in files if f.exists()))
        line(desc, k, batches, done, total, *a, **kw)

    monkeypatch.setattr(pipeline, "_batch_line", spy)
    caplog.set_level(logging.INFO, logger="megatron_inpo.rollout.pipeline")
    # K = 8 and the local engine's default 64 sequences per batch: 8 prompts per batch, 2 batches
    assert top_main(["rollout", "--prompts", str(prompts), "--out", str(out), "--no-progress",
                     f"rollout.model_path={pol}", "rollout.sampling.n=8", "rollout.sampling.max_new_tokens=3",
                     "judge.kind=programmatic", "judge.function=tests.helpers.rollout:first_token_pref",
                     "judge.function_inputs=ids"]) == 0
    lines = [r.getMessage() for r in caplog.records if "batch " in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("rollout+judge it1: batch 1/2 done, 8/16 prompts") and "left" in lines[0]
    assert lines[1].startswith("rollout+judge it1: batch 2/2 done, 16/16 prompts")
    assert on_disk == [8, 16]


def test_batch_size_zero_means_one_engine_batch():
    from megatron_inpo.cli.rollout import RolloutStageConfig
    from megatron_inpo.rollout.engine import RolloutConfig, SamplingConfig

    cfg = RolloutStageConfig(rollout=RolloutConfig(model_path="m", max_batch_sequences=64,
                                                   sampling=SamplingConfig(n=8)))
    assert cfg.batch_size == 0 and cfg.prompts_per_batch() == 8
    cfg.rollout.sampling.n = 128
    assert cfg.prompts_per_batch() == 1
    cfg.rollout = RolloutConfig(backend="sglang", server_urls=["http://x"], concurrency=16, request_prompts=2)
    assert cfg.prompts_per_batch() == 32
    cfg.batch_size = 5
    assert cfg.prompts_per_batch() == 5
