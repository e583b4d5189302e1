"""Hostile model directories (issue 21, item 4): every reader of an HF directory answers one line naming the file
and field, exit 2, and writes nothing, with `--no-verify` too (no digest record stops the file first).

- rollout: a corrupt tokenizer.json; a config.json whose vocab_size is smaller than the embedding it describes;
- convert hf-to-mcore: an invalid generation_config.json (refused before any weight is written), config.json field
  types (num_key_value_heads "2"), a hidden size the heads do not divide ("divisible"), an unsupported
  architecture (the supported ones as a list).
Seconds each (a tiny Llama).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_verify(monkeypatch):
    """--no-verify, scoped to the test (the flag itself sets the variable for the rest of the process)."""
    from megatron_inpo.engine.trust import NO_VERIFY_ENV

    monkeypatch.setenv(NO_VERIFY_ENV, "1")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    from tests.helpers.rollout import make_tiny_llama

    d = tmp_path_factory.mktemp("policy")
    make_tiny_llama(d, seed=0)
    return d


def _copy(policy: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(policy, d)
    return d


def _edit_config(d: Path, **fields) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from megatron_inpo.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def _rollout(d: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hello?"}\n')
    return _cli(["rollout", "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"), "--no-progress",
                 f"rollout.model_path={d}", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=2",
                 "judge.kind=programmatic", "judge.function=megatron_inpo.task.oracle:prob_a_beats_b"], capsys)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_rollout_with_a_corrupt_tokenizer_json(policy, tmp_path, capsys):
    d = _copy(policy, tmp_path)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    rc, err = _rollout(d, tmp_path, capsys)
    assert rc == 2
    line = _one_line(err)
    assert str(d) in line and "cannot load a tokenizer" in line, line
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob("out.jsonl.*"))


def test_rollout_with_a_config_vocab_smaller_than_the_weights(policy, tmp_path, capsys):
    d = _copy(policy, tmp_path)
    _edit_config(d, vocab_size=10)
    rc, err = _rollout(d, tmp_path, capsys)
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after transformers' weight-loading progress bar
    assert str(d) in line and "model.embed_tokens.weight: shape (99, 32) in the weights, (10, 32) from config.json" \
        in line, line
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob("out.jsonl.*"))


def _convert(d: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    return _cli(["convert", "hf-to-mcore", "--hf-dir", str(d), "--mcore-dir", str(tmp_path / "mc"),
                 "--no-progress"], capsys)


@pytest.mark.megatron
@pytest.mark.parametrize("edit, expect", [
    (lambda d: (d / "generation_config.json").write_text("{not json"), "generation_config.json: invalid JSON"),
    (lambda d: _edit_config(d, num_key_value_heads="2"), "num_key_value_heads='2': must be a positive integer"),
    (lambda d: _edit_config(d, rms_norm_eps="1e-6"), "rms_norm_eps='1e-6': must be a positive number"),
    (lambda d: _edit_config(d, hidden_size=66, num_key_value_heads=1, head_dim=None),
     "hidden_size=66 must be divisible by num_attention_heads"),
    (lambda d: _edit_config(d, architectures=["MistralForCausalLM"]), "(supported: ['LlamaForCausalLM'])"),
], ids=["generation-config", "kv-heads-string", "eps-string", "hidden-not-divisible", "architecture"])
def test_convert_refuses_a_broken_directory_before_writing(policy, tmp_path, capsys, edit, expect):
    from megatron_inpo.driver.stages import missing_megatron_parts

    if missing_megatron_parts():
        pytest.skip("convert needs: " + ", ".join(missing_megatron_parts()))
    d = _copy(policy, tmp_path)
    edit(d)
    rc, err = _convert(d, tmp_path, capsys)
    assert rc == 2
    line = _one_line(err)
    assert expect in line, line
    assert not (tmp_path / "mc").exists() and not list(tmp_path.glob("mc*"))
