"""The resumable rollout + judge stage: resumed == uninterrupted byte for byte, torn tails, no duplicates."""
import json

import pytest

from megatron_inpo.data.preferences import (DataError, append_jsonl, read_done_ids, read_preferences,
                                            repair_torn_tail)
from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.judge import ProgrammaticJudge
from megatron_inpo.rollout import RolloutConfig, SamplingConfig, generate_preferences, make_engine
from megatron_inpo.rollout.pipeline import dropped_path
from tests.helpers.rollout import make_tiny_llama, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # tiny models: see one_torch_thread

PROMPTS = [PromptRecord(id=f"p{i}", prompt="tell me " + "ab"[i % 2] * (i % 5 + 1)) for i in range(10)]


def longer(prompt, a, b):
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


class Crash(RuntimeError):
    pass


def crashing_judge(after_calls):
    calls = {"n": 0}

    def batch(items):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Crash("judge died")
        return [longer(c.prompt, c.a, c.b) for c in items]
    return ProgrammaticJudge(pref_batch_fn=batch, name="len")


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe_llama")
    make_tiny_llama(d, seed=2)
    return make_engine(RolloutConfig(backend="local", model_path=str(d),
                                     sampling=SamplingConfig(n=4, max_new_tokens=6, seed=1)))


@pytest.fixture(scope="module")
def reference(eng, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "prefs.jsonl"
    s = generate_preferences(PROMPTS, eng, ProgrammaticJudge(pref_fn=longer, name="len"), out, iteration=1,
                             model_version="it0", batch_size=3, progress=False)
    return out, s


def test_full_run(reference):
    out, s = reference
    pairs = read_preferences(out)
    dropped = read_done_ids(dropped_path(out))
    assert s["pairs"] == len(pairs) and s["dropped"] == len(dropped) and s["pairs"] + s["dropped"] == 10
    assert s["pairs"] >= 5 and s["comparisons"] == 10 * 5 and s["judge_calls"] == 4 * 3  # 4 batches x 3 rounds
    assert {p.prompt_id for p in pairs} | dropped == {p.id for p in PROMPTS}
    for p in pairs:
        assert len(p.chosen) > len(p.rejected) and p.chosen_prob == 1.0
        assert (p.iteration, p.model_version, p.judge) == (1, "it0", "len")
    assert s["tokens_per_s"] > 0 and s["prompts_per_s"] > 0


def test_rerun_skips_everything(eng, reference, tmp_path):
    out, _ = reference
    copy = tmp_path / "prefs.jsonl"
    copy.write_bytes(out.read_bytes())
    dropped_path(copy).write_bytes(dropped_path(out).read_bytes())
    s = generate_preferences(PROMPTS, eng, crashing_judge(0), copy, batch_size=3, progress=False)
    assert s["skipped"] == 10 and s["generated"] == 0 and copy.read_bytes() == out.read_bytes()


def test_crash_then_resume_equals_uninterrupted(eng, reference, tmp_path):
    out, _ = reference
    mine = tmp_path / "prefs.jsonl"
    with pytest.raises(Crash):  # dies in batch 2 (3 judge calls per batch)
        generate_preferences(PROMPTS, eng, crashing_judge(4), mine, iteration=1, model_version="it0",
                             batch_size=3, progress=False)
    partial = read_done_ids(mine) | read_done_ids(dropped_path(mine))
    assert partial == {"p0", "p1", "p2"}
    s = generate_preferences(PROMPTS, eng, ProgrammaticJudge(pref_fn=longer, name="len"), mine, iteration=1,
                             model_version="it0", batch_size=4, progress=False)  # other batching: same samples
    assert s["skipped"] == 3 and s["generated"] == 7
    assert mine.read_bytes() == out.read_bytes()
    assert dropped_path(mine).read_bytes() == dropped_path(out).read_bytes()


def test_torn_last_line_is_redone(eng, reference, tmp_path):
    out, _ = reference
    lines = out.read_bytes().splitlines(keepends=True)
    mine = tmp_path / "prefs.jsonl"
    mine.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a crash mid-write
    dropped_path(mine).write_bytes(dropped_path(out).read_bytes())
    with pytest.raises(DataError, match=r"prefs.jsonl:\d+: invalid JSON"):
        read_preferences(mine)
    s = generate_preferences(PROMPTS, eng, ProgrammaticJudge(pref_fn=longer, name="len"), mine, iteration=1,
                             model_version="it0", batch_size=3, progress=False)
    assert s["generated"] == 1 and mine.read_bytes() == out.read_bytes()


def test_lost_dropped_records_do_not_duplicate_pairs(eng, reference, tmp_path):
    out, _ = reference
    mine = tmp_path / "prefs.jsonl"
    mine.write_bytes(out.read_bytes())  # crash after the pairs were appended, before the dropped ids
    s = generate_preferences(PROMPTS, eng, ProgrammaticJudge(pref_fn=longer, name="len"), mine, iteration=1,
                             model_version="it0", batch_size=3, progress=False)
    assert s["pairs"] == 0 and s["generated"] == s["dropped"] == len(read_done_ids(dropped_path(out)))
    assert mine.read_bytes() == out.read_bytes()


def test_a_record_changed_after_it_was_written_is_named_dropped_and_done_again(eng, reference, tmp_path, caplog):
    # issue 21: a middle line altered but still valid JSON was counted as finished on resume and kept
    out, _ = reference
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    victim = json.loads(lines[1])
    victim["chosen"] += " (edited)"
    mine = tmp_path / "prefs.jsonl"
    mine.write_text("".join([lines[0], json.dumps(victim, ensure_ascii=False) + "\n", *lines[2:]]), encoding="utf-8")
    dropped_path(mine).write_bytes(dropped_path(out).read_bytes())
    with pytest.raises(DataError, match=r"prefs.jsonl:2: record changed after it was written"):
        read_preferences(mine)  # a reader refuses it
    with caplog.at_level("WARNING"):
        s = generate_preferences(PROMPTS, eng, ProgrammaticJudge(pref_fn=longer, name="len"), mine, iteration=1,
                                 model_version="it0", batch_size=3, progress=False)
    assert f"line 2 (prompt_id {victim['prompt_id']!r})" in caplog.text and "dropped, done again" in caplog.text
    assert s["generated"] == 1  # that prompt alone, regenerated as it was (seeded per prompt)
    assert sorted(mine.read_text(encoding="utf-8").splitlines()) == sorted(out.read_text(encoding="utf-8").splitlines())


def test_seals(tmp_path):
    from megatron_inpo.data.preferences import SEAL_FIELD, drop_damaged, seal, seal_matches

    line = seal(json.dumps({"prompt_id": "a", "x": [1.5, "é"]}))
    obj = json.loads(line)
    assert seal_matches(obj) is True and seal_matches({"prompt_id": "a"}) is None
    assert seal(line) == line  # idempotent: an old seal is replaced, not nested
    assert seal_matches({**obj, "x": [1.5, "e"]}) is False
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt_id": "a"}\n{"prompt_id": "b"}\n')  # hand-made, no seal anywhere: kept as it is
    assert drop_damaged(f) == [] and read_done_ids(f) == {"a", "b"}
    append_jsonl(f, [json.dumps({"prompt_id": "c"})])  # now some records are sealed: the unsealed ones are suspect
    assert drop_damaged(f) == ["line 1 (prompt_id 'a')", "line 2 (prompt_id 'b')"]
    assert read_done_ids(f) == {"c"} and SEAL_FIELD in f.read_text()


def test_append_and_repair_helpers(tmp_path):
    from megatron_inpo.data.preferences import seal

    f = tmp_path / "a.jsonl"
    append_jsonl(f, [json.dumps({"prompt_id": "a"}), json.dumps({"prompt_id": "b"})])
    with open(f, "ab") as h:
        h.write(seal(json.dumps({"prompt_id": "c"})).encode())  # complete object, newline lost: kept
    assert repair_torn_tail(f) == 0 and read_done_ids(f) == {"a", "b", "c"}
    with open(f, "ab") as h:
        h.write(b'{"prompt_id": "d", "x": [1, 2')
    assert repair_torn_tail(f) == len(b'{"prompt_id": "d", "x": [1, 2')
    assert f.read_text().count("\n") == 3 and read_done_ids(f) == {"a", "b", "c"}
    # damage that is not the last line is not a crash artefact: reported with its line
    f.write_text('{"prompt_id": "a"}\n{oops\n{"prompt_id": "b"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: invalid JSON"):
        read_done_ids(f)


def test_resume_into_another_iterations_file_is_refused(eng, reference, tmp_path):
    out, _ = reference
    mine = tmp_path / "prefs.jsonl"
    mine.write_bytes(out.read_bytes())
    with pytest.raises(DataError, match=r"prefs.jsonl:1: pair of iteration 1, but this run is iteration 2"):
        generate_preferences(PROMPTS, eng, ProgrammaticJudge(pref_fn=longer), mine, iteration=2, progress=False)


def test_rollout_then_judge_stages_write_what_the_one_pass_stage_writes(eng, reference, tmp_path):
    """The driver's two stages (all samples first, then the judge) are the same pieces as generate_preferences:
    same pairs and dropped records byte for byte, an event after each batch, the same-iteration check."""
    import contextlib

    from megatron_inpo import events
    from megatron_inpo.rollout.pipeline import judge_stage, rollout_stage

    out, _ = reference
    rolls, pairs, points = tmp_path / "rollouts.jsonl", tmp_path / "prefs.jsonl", []
    stop = events.subscribe(points.append)
    try:
        with events.scope("iter1/rollout"):
            s = rollout_stage(PROMPTS, lambda: contextlib.nullcontext(eng), rolls, iteration=1, batch_size=4,
                              progress=False)
    finally:
        stop()
    assert (s["prompts"], s["sequences"], points) == (10, 40, [f"iter1/rollout@batch{k}" for k in (1, 2, 3)])
    assert rollout_stage(PROMPTS, lambda: pytest.fail("a finished stage opens no engine"), rolls, iteration=1,
                         progress=False) == s
    j = judge_stage(rolls, ProgrammaticJudge(pref_fn=longer, name="len"), "tournament", pairs, iteration=1,
                    model_version="it0", batch_size=3, progress=False)
    assert pairs.read_bytes() == out.read_bytes()
    assert dropped_path(pairs).read_bytes() == dropped_path(out).read_bytes()
    assert j["pairs"] + j["dropped"] == 10 and j["comparisons"] == 10 * 5
    with pytest.raises(DataError, match=r"prefs.jsonl:1: pair of iteration 1, but this run is iteration 2"):
        judge_stage(rolls, ProgrammaticJudge(pref_fn=longer), "tournament", pairs, iteration=2, progress=False)
