"""A corpus of hostile data files, checked at the edge: every case gets one clear line naming file:line and the
field, before any model is built (no traceback, no silent acceptance).

`corpus()` generates the cases: (command, name, file bytes, expected message fragment). The commands are the
readers of each input as the real commands call them:

- train       preference JSONL of `megatron-inpo train` (read through the CLI in-process: log-probs required,
              ids within the init checkpoint's vocabulary, lengths within train.max_seq_len)
- train_sft   SFT JSONL of `megatron-inpo train --loss sft` (CLI in-process)
- logprobs    preference JSONL of `megatron-inpo logprobs` (CLI in-process: lengths within the checkpoint's
              max_position_embeddings)
- prompts     prompt JSONL of `rollout` / `run` / `evaluate` (read_prompts, then the rollout engine's tokenize:
              ids within the tokenizer's vocabulary, text and token counts within the model's positions)
- rollout     the same files through `megatron-inpo rollout` in-process, local engine on a tiny Llama of 64
              positions
- evaluate    prompt JSONL of `megatron-inpo evaluate` (CLI in-process; the checks made when reading)

A handful run the real command lines in a subprocess: exit code 2, one line on stderr, no traceback.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_inpo.data.preferences import DataError, read_preferences
from megatron_inpo.data.prompts import PromptRecord, read_prompts
from megatron_inpo.engine.batches import read_sft

REPO = Path(__file__).resolve().parents[2]
VOCAB = 40             # the fake checkpoint's hf_config.vocab_size
POSITIONS = 24         # its max_position_embeddings (logprobs' length bound)
MAX_SEQ_LEN = 12       # train.max_seq_len of the train cases
PROMPT_POSITIONS = 64  # the rollout engine's positions in the prompt cases


@dataclass(frozen=True)
class Case:
    command: str
    name: str
    content: bytes
    expect: str
    """Fragment the one-line message must contain; '{f}' is the data file's path."""

    @property
    def id(self) -> str:
        return f"{self.command}-{self.name}"


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _pair(logps: bool = True, **kw) -> dict:
    base = dict(prompt_id="p1", prompt="hi", prompt_ids=[1, 2], chosen="a", rejected="b", chosen_ids=[3],
                rejected_ids=[4, 5])
    if logps:
        base.update(ref_chosen_logp=-1.0, ref_rejected_logp=-2.0, last_chosen_logp=-1.0, last_rejected_logp=-2.0)
    base.update(kw)
    return base


def _pair_cases(command: str, logps: bool, max_len: int, bound: str) -> list[Case]:
    good = _line(_pair(logps))

    def bad(name: str, expect: str, **kw) -> Case:
        return Case(command, name, good + _line(_pair(logps, **{"prompt_id": "p2", **kw})),
                    "{f}:2: " + expect)

    def raw(name: str, text: bytes, expect: str) -> Case:
        return Case(command, name, good + text, "{f}:2: " + expect)

    head = json.dumps(_pair(logps, prompt_id="p2"))[:-1].encode()
    cases = [
        Case(command, "empty-file", b"", "{f}: no preference pairs"),
        Case(command, "blank-lines-only", b"\n  \n\n", "{f}: no preference pairs"),
        raw("invalid-utf8", head + b', "extra": {"k": "\xff\xfe"}}\n', "invalid UTF-8"),
        raw("truncated-utf8", head + b', "judge": "\xe2\x82"}\n', "invalid UTF-8"),
        raw("latin1-text", b'{"prompt_id": "caf\xe9"}\n', "invalid UTF-8"),
        raw("invalid-json", b'{"prompt_id": "p2",\n', "invalid JSON"),
        raw("nested-too-deep", b"[" * 200000 + b"]" * 200000 + b"\n", "invalid JSON (nested too deeply)"),
        raw("huge-int", head + b', "iteration": ' + b"9" * 5000 + b"}\n", "invalid JSON"),
        raw("duplicate-key", head + b', "prompt_id": "p3"}\n', "field 'prompt_id' appears twice"),
        raw("not-an-object", b"[1, 2]\n", "expected a JSON object"),
        raw("string-line", b'"pair"\n', "expected a JSON object"),
        raw("missing-fields", _line({"prompt_id": "p2"}), "missing field(s)"),
        bad("unknown-field", "unknown field(s) ['colour']", colour="red"),
        bad("id-null", "field 'prompt_id' must be a non-empty string", prompt_id=None),
        bad("id-bool", "field 'prompt_id' must be a non-empty string", prompt_id=True),
        bad("id-empty", "field 'prompt_id' must be a non-empty string", prompt_id=""),
        bad("id-list", "field 'prompt_id' must be a non-empty string", prompt_id=["p"]),
        bad("prompt-int", "field 'prompt' must be a string, got an integer", prompt=7),
        bad("prompt-null", "field 'prompt' must be a string, got null", prompt=None),
        bad("chosen-int", "field 'chosen' must be a string", chosen=3),
        bad("rejected-list", "field 'rejected' must be a string", rejected=["b"]),
        bad("judge-int", "field 'judge' must be a string", judge=1),
        bad("model-version-null", "field 'model_version' must be a string", model_version=None),
        raw("lone-surrogate", head.replace(b'"chosen": "a"', b'"chosen": "\\ud800x"') + b"}\n",
            "field 'chosen' holds an unpaired surrogate"),
        bad("prompt-ids-empty", "field 'prompt_ids' is empty", prompt_ids=[]),
        bad("chosen-ids-empty", "field 'chosen_ids' is empty", chosen_ids=[]),
        bad("rejected-ids-empty", "field 'rejected_ids' is empty", rejected_ids=[]),
        bad("prompt-ids-bool", "field 'prompt_ids' must be a list of non-negative ints (token ids); entry 1 is a "
            "boolean", prompt_ids=[1, True]),
        bad("chosen-ids-float", "field 'chosen_ids' must be a list of non-negative ints", chosen_ids=[3.0]),
        bad("rejected-ids-string", "field 'rejected_ids' must be a list of non-negative ints", rejected_ids=["4"]),
        bad("prompt-ids-negative", "field 'prompt_ids' must be a list of non-negative ints", prompt_ids=[1, -2]),
        bad("prompt-ids-null-entry", "field 'prompt_ids' must be a list of non-negative ints", prompt_ids=[None]),
        bad("prompt-ids-nested", "field 'prompt_ids' must be a list of non-negative ints", prompt_ids=[[1]]),
        bad("prompt-ids-string", "field 'prompt_ids' must be a list of non-negative ints", prompt_ids="1 2"),
        bad("prompt-ids-oov", f"field 'prompt_ids': token id {VOCAB} (entry 1) is outside the model's vocabulary "
            f"(size {VOCAB})", prompt_ids=[1, VOCAB]),
        bad("chosen-ids-huge", "field 'chosen_ids': token id 1000000000000 (entry 0) is outside",
            chosen_ids=[10**12]),
        bad("iteration-zero", "field 'iteration' must be an integer >= 1", iteration=0),
        bad("iteration-string", "field 'iteration' must be an integer >= 1", iteration="1"),
        bad("iteration-bool", "field 'iteration' must be an integer >= 1", iteration=True),
        bad("prob-over-one", "field 'chosen_prob' must be [0.0, 1.0]", chosen_prob=1.5),
        bad("winrate-string", "field 'chosen_winrate' must be a number, got a string", chosen_winrate="0.5"),
        raw("prob-nan", head + b', "rejected_winrate": NaN}\n', "field 'rejected_winrate' must be a finite number"),
        bad("extra-list", "field 'extra' must be a JSON object", extra=[1]),
        Case(command, "duplicate-prompt-id", good + good, "{f}:2: field 'prompt_id': duplicate 'p1' (first on "
             "line 1)"),
        bad("too-long", f"fields 'prompt_ids' + 'chosen_ids'/'rejected_ids': {max_len + 1} tokens > "
            f"{bound}={max_len}",
            prompt_ids=[1] * max_len, chosen_ids=[3, 3], rejected_ids=[4]),
    ]
    if logps:  # the log-prob columns that training reads
        cases += [
            raw("logp-nan", head[:head.rindex(b', "last_rejected_logp"')] + b', "last_rejected_logp": NaN}\n',
                "field 'last_rejected_logp' must be a finite number, got nan"),
            raw("logp-infinity", head[:head.index(b', "ref_chosen_logp"')] + b', "ref_chosen_logp": -Infinity, '
                b'"ref_rejected_logp": -1, "last_chosen_logp": -1, "last_rejected_logp": -1}\n',
                "field 'ref_chosen_logp' must be a finite number, got -inf"),
            bad("logp-string", "field 'ref_rejected_logp' must be a number, got a string", ref_rejected_logp="-1.0"),
            bad("logp-bool", "field 'last_chosen_logp' must be a number, got a boolean", last_chosen_logp=False),
            bad("logp-positive", "field 'ref_chosen_logp' must be <= 0.001, got 5.0", ref_chosen_logp=5.0),
            bad("logp-missing", "log-prob columns missing", ref_chosen_logp=None),
        ]
    return cases


def _sft_cases() -> list[Case]:
    good = _line({"prompt_ids": [1, 2], "response_ids": [3, 4]})

    def bad(name: str, expect: str, **kw) -> Case:
        obj = {"prompt_ids": [1, 2], "response_ids": [3, 4], **kw}
        return Case("train_sft", name, good + _line({k: v for k, v in obj.items() if v != "<drop>"}),
                    "{f}:2: " + expect)

    return [
        Case("train_sft", "empty-file", b"", "{f}: no SFT records"),
        Case("train_sft", "invalid-utf8", good + b'{"prompt_ids": [1], "response_ids": [2], "text": "\xc3"}\n',
             "{f}:2: invalid UTF-8"),
        Case("train_sft", "invalid-json", good + b"{prompt_ids: [1]}\n", "{f}:2: invalid JSON"),
        Case("train_sft", "not-an-object", good + b"[[1], [2]]\n", "{f}:2: expected a JSON object"),
        bad("missing-response", "missing field 'response_ids'", response_ids="<drop>"),
        bad("prompt-empty", "field 'prompt_ids' is empty", prompt_ids=[]),
        bad("response-empty", "field 'response_ids' is empty", response_ids=[]),
        bad("bool-ids", "field 'response_ids' must be a list of non-negative ints", response_ids=[True, False]),
        bad("float-ids", "field 'prompt_ids' must be a list of non-negative ints", prompt_ids=[1.5]),
        bad("negative-ids", "field 'prompt_ids' must be a list of non-negative ints", prompt_ids=[-1]),
        bad("ids-not-a-list", "field 'response_ids' must be a list of non-negative ints", response_ids={"0": 1}),
        bad("oov", f"field 'response_ids': token id {VOCAB + 5} (entry 0) is outside", response_ids=[VOCAB + 5]),
        bad("too-long", f"fields 'prompt_ids' + 'response_ids': {MAX_SEQ_LEN + 1} tokens > "
            f"train.max_seq_len={MAX_SEQ_LEN}",
            prompt_ids=[1] * MAX_SEQ_LEN, response_ids=[2, 2]),
    ]


def _prompt_cases(command: str = "prompts") -> list[Case]:
    good = _line({"id": "a", "prompt": "ok"})

    def bad(name: str, obj: dict, expect: str) -> Case:
        return Case(command, name, good + _line(obj), "{f}:2: " + expect)

    cases = [
        Case(command, "empty-file", b"", "{f}: no prompts"),
        Case(command, "invalid-utf8", good + b'{"id": "b", "prompt": "\x80"}\n', "{f}:2: invalid UTF-8"),
        Case(command, "invalid-json", good + b'{"id": "b", "prompt": }\n', "{f}:2: invalid JSON"),
        Case(command, "duplicate-key", good + b'{"id": "b", "prompt": "x", "id": "c"}\n',
             "{f}:2: field 'id' appears twice"),
        Case(command, "lone-surrogate", good + b'{"id": "b", "prompt": "\\udfff"}\n',
             "{f}:2: field 'prompt' holds an unpaired surrogate"),
        bad("id-null", {"id": None, "prompt": "x"}, "field 'id' must be a non-empty string or an integer"),
        bad("id-bool", {"id": False, "prompt": "x"}, "field 'id' must be a non-empty string or an integer"),
        bad("id-float", {"id": 1.5, "prompt": "x"}, "field 'id' must be a non-empty string or an integer"),
        bad("prompt-int", {"id": "b", "prompt": 5}, "field 'prompt' must be a string, got an integer"),
        bad("prompt-null", {"id": "b", "prompt": None}, "field 'prompt' must be a string, got null"),
        bad("prompt-list", {"id": "b", "prompt": ["x"]}, "field 'prompt' must be a string, got a list"),
        bad("prompt-empty", {"id": "b", "prompt": ""}, "field 'prompt' is empty"),
        bad("prompt-ids-empty", {"id": "b", "prompt": "x", "prompt_ids": []}, "field 'prompt_ids' is empty"),
        bad("prompt-ids-bool", {"id": "b", "prompt": "x", "prompt_ids": [1, True]},
            "field 'prompt_ids' must be a list of non-negative ints"),
        bad("prompt-ids-float", {"id": "b", "prompt": "x", "prompt_ids": [2.0]},
            "field 'prompt_ids' must be a list of non-negative ints"),
        bad("prompt-ids-negative", {"id": "b", "prompt": "x", "prompt_ids": [-3]},
            "field 'prompt_ids' must be a list of non-negative ints"),
        bad("duplicate-id", {"id": "a", "prompt": "again"}, "duplicate prompt id 'a' (first on line 1)"),
    ]
    # checked against the tokenizer and the model: by the rollout engine (prompts), before the model loads (rollout,
    # evaluate: read_prompts with rollout/engine.prompt_limits) and again by the engine when it tokenizes
    cases += [
        bad("prompt-ids-oov", {"id": "b", "prompt": "x", "prompt_ids": [1, 10**6]},
            "field 'prompt_ids': token id 1000000 (entry 1) is outside the model's vocabulary"),
        bad("prompt-ids-too-many", {"id": "b", "prompt": "x", "prompt_ids": [1] * PROMPT_POSITIONS},
            f"field 'prompt_ids' has {PROMPT_POSITIONS} tokens" + (
                f"; with max_new_tokens=4 that is more than the model's {PROMPT_POSITIONS} positions"
                if command == "prompts" else f", more than the {PROMPT_POSITIONS - 4} the model's positions leave "
                "beside max_new_tokens")),
        bad("prompt-absurdly-long", {"id": "b", "prompt": "z" * 2_000_000},
            "field 'prompt' has 2000000 characters, more than the model's positions can hold as "
            "tokens (limit 1024 characters); refused before tokenizing"),
    ]
    if command in ("prompts", "rollout"):  # the engine's count of a text's tokens (the model loaded)
        cases += [
            bad("prompt-too-many-tokens", {"id": "b", "prompt": "y" * (PROMPT_POSITIONS - 2)},
                "field 'prompt' has 80 tokens; with max_new_tokens=4 that is "
                f"more than the model's {PROMPT_POSITIONS} positions"),
            # a word-level tokenizer reads what it does not know as its unknown token, silently (issue 21)
            bad("prompt-unknown-words", {"id": "b", "prompt": "ok \x00 \u200f"},
                "field 'prompt' has words the tokenizer does not know, which it would read as its unknown token: "
                "['\\x00', '\\u200f']"),
        ]
    return cases


def corpus() -> list[Case]:
    return (_pair_cases("train", True, MAX_SEQ_LEN, "train.max_seq_len")
            + _pair_cases("logprobs", False, POSITIONS, "max_position_embeddings")
            + _sft_cases() + _prompt_cases("prompts") + _prompt_cases("rollout") + _prompt_cases("evaluate"))


CORPUS = corpus()


def test_the_corpus_is_large_and_covers_every_reader():
    assert len(CORPUS) >= 90
    assert {c.command for c in CORPUS} == {"train", "train_sft", "logprobs", "prompts", "rollout", "evaluate"}
    assert len({c.id for c in CORPUS}) == len(CORPUS)


# --- how each command reads its input ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory) -> Path:
    """A directory with only the checkpoint metadata: the data checks run before any weight is read."""
    d = tmp_path_factory.mktemp("ckpt")
    (d / "megatron_inpo.json").write_text(json.dumps({
        "format_version": 1, "hf_config": {"vocab_size": VOCAB, "max_position_embeddings": POSITIONS},
        "padded_vocab_size": 64, "tp": 1, "pp": 1}))
    return d


@pytest.fixture(scope="module")
def prompt_engine(tmp_path_factory):
    """The rollout engine's prompt checks with the test tokenizer (character-level) and a 64-position model."""
    from megatron_inpo.rollout.engine import Completion, RolloutConfig, RolloutEngine, SamplingConfig, Throughput
    from tests.helpers.rollout import make_tokenizer

    class Engine(RolloutEngine):
        def __init__(self, tokenizer):
            self.cfg = RolloutConfig(backend="local", model_path="m", sampling=SamplingConfig(n=2, max_new_tokens=4))
            self.tokenizer = tokenizer
            self.meter = Throughput("test")

        def max_positions(self):
            return PROMPT_POSITIONS

        def _generate(self, prompt_ids, sampling, seeds):
            return [[Completion(text="", token_ids=[2], finish_reason="stop")] * sampling.n for _ in prompt_ids]

    return Engine(make_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    """A tiny Llama (character tokenizer) whose config claims 64 positions, like the prompt_engine fixture."""
    from tests.helpers.rollout import make_tiny_llama

    d = tmp_path_factory.mktemp("policy")
    make_tiny_llama(d, seed=0)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": PROMPT_POSITIONS}))
    return d


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from megatron_inpo.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def _run_case(case: Case, path: Path, tmp_path: Path, capsys, fake_checkpoint: Path, prompt_engine,
              tiny_policy: Path) -> str:
    """The one-line error the command gives for the case's file (fails if it gives none)."""
    if case.command in ("train", "train_sft"):
        rc, err = _cli(["train", "--data", str(path), "--init-checkpoint", str(fake_checkpoint), "--output-dir",
                        str(tmp_path / "out"), "--train.global_batch_size=1", f"--train.max_seq_len={MAX_SEQ_LEN}"]
                       + (["--loss=sft"] if case.command == "train_sft" else []), capsys)
        assert rc == 2, err
        assert not (tmp_path / "out").exists()  # refused before anything was written
        return err.strip()
    if case.command == "logprobs":
        out = tmp_path / "scored.jsonl"
        rc, err = _cli(["logprobs", "--data", str(path), "--output", str(out), "--ref-checkpoint",
                        str(fake_checkpoint)], capsys)
        assert rc == 2, err
        assert not out.exists()
        return err.strip()
    if case.command == "rollout":
        out = tmp_path / "pairs.jsonl"
        rc, err = _cli(["rollout", "--prompts", str(path), "--out", str(out), "--no-progress",
                        f"rollout.model_path={tiny_policy}", "rollout.sampling.n=2",
                        "rollout.sampling.max_new_tokens=4",
                        "judge.kind=programmatic", "judge.function=megatron_inpo.task.oracle:prob_a_beats_b"], capsys)
        assert rc == 2, err
        assert not out.exists()  # no pair was written
        assert "Traceback" not in err, err
        return err.strip().splitlines()[-1]  # after transformers' weight-loading progress bar
    if case.command == "evaluate":
        rc, err = _cli(["evaluate", "--policy", str(tiny_policy), "--baseline", str(tiny_policy),
                        "--prompts", str(path), "--judge-function", "megatron_inpo.task.oracle:prob_a_beats_b",
                        "--max-new-tokens", "4", "--out", str(tmp_path / "ev")], capsys)
        assert rc == 2, err
        assert not (tmp_path / "ev").exists()
        return err.strip()
    with pytest.raises(DataError) as e:
        prompt_engine.rollout(read_prompts(path))
    return str(e.value)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_bad_input_gets_one_line_naming_file_line_and_field(case, tmp_path, capsys, fake_checkpoint,
                                                             prompt_engine, tiny_policy):
    path = tmp_path / "data.jsonl"
    path.write_bytes(case.content)
    msg = _run_case(case, path, tmp_path, capsys, fake_checkpoint, prompt_engine, tiny_policy)
    assert case.expect.format(f=path) in msg, msg
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 600, msg


def test_good_files_pass_every_check(tmp_path, prompt_engine):
    pairs = tmp_path / "p.jsonl"
    pairs.write_bytes(b"\xef\xbb\xbf" + _line(_pair())[:-1] + b"\r\n" + _line(_pair(prompt_id=2, iteration=3,
                                                                                chosen_prob=1, chosen="")))
    got = read_preferences(pairs, require_logps=True, vocab_size=VOCAB, max_len=MAX_SEQ_LEN)
    assert [p.prompt_id for p in got] == ["p1", "2"] and got[1].chosen_prob == 1.0 and got[0].has_logps
    sft = tmp_path / "s.jsonl"
    sft.write_bytes(_line({"prompt_ids": [1], "response_ids": [VOCAB - 1] * MAX_SEQ_LEN, "note": "x"}))
    assert len(read_sft(sft, vocab_size=VOCAB, max_len=MAX_SEQ_LEN)) == 1
    prompts = tmp_path / "q.jsonl"
    prompts.write_bytes(_line({"id": 1, "prompt": "é" * 20}) + _line({"id": "b", "prompt": "", "prompt_ids": [1, 5]})
                        + _line({"id": "c", "prompt": "y" * 30}))
    recs = read_prompts(prompts)
    assert recs[0].source == f"{prompts}:1" and recs[0] == PromptRecord("1", "é" * 20)
    rolls = prompt_engine.rollout(recs[1:])
    assert rolls[0].prompt_ids == [1, 5] and len(rolls[1].prompt_ids) + 4 <= PROMPT_POSITIONS
    # read fine, but the test tokenizer (printable ASCII, word level) has no 'é': refused, not read as its '?'
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'prompt' has words the tokenizer does not know"):
        prompt_engine.rollout(recs[:1])


def test_prompt_limits_at_read_time(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "x", "prompt_ids": [1, 9]}) + "\n"
                 + json.dumps({"id": "b", "prompt": "x" * 50}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'prompt_ids': token id 9 \(entry 1\) is outside"):
        read_prompts(f, vocab_size=9)
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'prompt_ids' has 2 tokens, more than the 1 "):
        read_prompts(f, max_tokens=1)
    with pytest.raises(DataError, match=r"q.jsonl:2: field 'prompt' has 50 characters, .*limit 49 characters\); refused before tokenizing"):
        read_prompts(f, max_chars=49)


def test_not_a_file(tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        read_preferences(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        read_sft(tmp_path / "none.jsonl")


def test_local_engine_checks_prompt_ids_against_the_model(tmp_path):
    """The in-process engine bounds ids by its tokenizer and embedding, lengths by max_position_embeddings."""
    from megatron_inpo.rollout import RolloutConfig, SamplingConfig, make_engine
    from tests.helpers.rollout import make_tiny_llama

    make_tiny_llama(tmp_path, seed=0)
    eng = make_engine(RolloutConfig(backend="local", model_path=str(tmp_path),
                                    sampling=SamplingConfig(n=2, max_new_tokens=4)))
    assert eng.max_positions() == 512 and eng.vocab_size() == len(eng.tokenizer)
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "", "prompt_ids": [1, len(eng.tokenizer)]}) + "\n")
    with pytest.raises(DataError, match=rf"q.jsonl:1: field 'prompt_ids': token id {len(eng.tokenizer)} "):
        eng.rollout(read_prompts(f))
    f.write_text(json.dumps({"id": "a", "prompt": "", "prompt_ids": [1] * 509}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'prompt_ids' has 509 tokens; with max_new_tokens=4"):
        eng.rollout(read_prompts(f))
    # in-code records (no file) are named by id
    with pytest.raises(DataError, match=r"prompt 'z': field 'prompt_ids'"):
        eng.rollout([PromptRecord("z", "", [10**9])])


# --- the real command lines ------------------------------------------------------------------------------------

def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_inpo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command,content,expect", [
    ("train", _line(_pair()) + _line(_pair(prompt_id="p2", prompt_ids=[1, VOCAB + 3])),
     "data.jsonl:2: field 'prompt_ids': token id 43"),
    ("train", _line(_pair()) + b"\xff\n", "data.jsonl:2: invalid UTF-8"),
    ("logprobs", b"", "data.jsonl: no preference pairs"),
    ("logprobs", _line(_pair(False)) + _line(_pair(False)), "data.jsonl:2: field 'prompt_id': duplicate"),
    ("rollout", _line({"id": "a", "prompt": None}), "data.jsonl:1: field 'prompt' must be a string, got null"),
])
def test_real_commands_exit_2_with_one_line(command, content, expect, tmp_path, fake_checkpoint):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    if command == "train":
        args = ["train", "--data", str(data), "--init-checkpoint", str(fake_checkpoint), "--output-dir",
                str(tmp_path / "o"), "--train.global_batch_size=1"]
    elif command == "logprobs":
        args = ["logprobs", "--data", str(data), "--output", str(tmp_path / "o.jsonl"), "--ref-checkpoint",
                str(fake_checkpoint)]
    else:
        args = ["rollout", "--prompts", str(data), "--out", str(tmp_path / "o.jsonl"), "rollout.model_path=m",
                "judge.kind=programmatic", "judge.function=m:f"]
    r = _subprocess(args, REPO)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1 and expect in lines[0], r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # a refused command writes nothing


def test_engine_without_known_positions_bounds_text_by_the_tokenizer(tmp_path):
    """No model at hand (an SGLang client): the hard token check is left to the server, but an absurd text is
    still refused before tokenizing, by the tokenizer's model_max_length; without a tokenizer ids are needed."""
    from megatron_inpo.rollout.engine import RolloutConfig, RolloutEngine, SamplingConfig, Throughput
    from tests.helpers.rollout import make_tokenizer

    class Client(RolloutEngine):
        def __init__(self, tokenizer):
            self.cfg = RolloutConfig(backend="local", model_path="m", sampling=SamplingConfig(n=1, max_new_tokens=4))
            self.tokenizer, self.meter = tokenizer, Throughput("test")

        def _generate(self, prompt_ids, sampling, seeds):
            raise AssertionError("not reached")

    tok = make_tokenizer(tmp_path)
    tok.model_max_length = 10
    eng = Client(tok)
    assert eng.max_positions() is None and eng.max_prompt_chars() == 160
    assert len(eng.tokenize([PromptRecord("a", "x" * 100)])[0]) > 100  # no hard check: the server's answer
    with pytest.raises(DataError, match=r"prompt 'b': field 'prompt' has 161 characters.*limit 160 characters"):
        eng.tokenize([PromptRecord("b", "x" * 161)])
    with pytest.raises(DataError, match=r"prompt 'c': no field 'prompt_ids', and the engine has no tokenizer"):
        Client(None).tokenize([PromptRecord("c", "hi")])


def test_train_load_items_uses_the_checkpoints_vocabulary(tmp_path, fake_checkpoint):
    from megatron_inpo.engine.config import TrainStageConfig
    from megatron_inpo.engine.train import load_items

    data = tmp_path / "d.jsonl"
    data.write_bytes(_line(_pair()) + _line(_pair(prompt_id="p2", chosen_ids=[VOCAB - 1])))
    cfg = TrainStageConfig(data=str(data), init_checkpoint=str(fake_checkpoint), output_dir=str(tmp_path / "o"))
    cfg.train.global_batch_size = 2
    assert [p.prompt_id for p in load_items(cfg)] == ["p1", "p2"]
    data.write_bytes(_line(_pair()) + _line(_pair(prompt_id="p2", chosen_ids=[VOCAB])))
    with pytest.raises(DataError, match=rf"d.jsonl:2: field 'chosen_ids': token id {VOCAB} \(entry 0\)"):
        load_items(cfg)
    cfg.init_checkpoint = str(tmp_path / "missing")  # no metadata: no vocabulary check here; train() names it next
    assert len(load_items(cfg)) == 2
    cfg.objective.name = "sppo"
    with pytest.raises(DataError, match=r"d.jsonl:1: fields 'chosen_winrate' and 'rejected_winrate' are needed"):
        load_items(cfg)
