"""The second half of the bad-input corpus (the first, data files, is tests/data/test_bad_inputs.py): hostile or
broken checkpoints, HF directories and run configs, through the real commands that read them.

`corpus()` generates the cases: (command, name, a change made to a good input, the expected message fragment).

- hf_to_mcore   an HF directory given to `megatron-inpo convert hf-to-mcore` (a plain one, as downloaded, and an
                export of this project with its digest record)
- mcore_to_hf   a Megatron dist-checkpoint given to `megatron-inpo convert mcore-to-hf`
- run           a run config (`--config` YAML and overrides) and the prompt files of `megatron-inpo run` with
                model.source 'hf' (checked by the preflight, before any stage runs)

Every case exits 2 with one line naming the file (or field), writes no output, and runs no code from a checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.helpers.engine import convert_to_mcore
from tests.helpers.rollout import make_tiny_llama

from megatron_inpo.engine import trust

MARKER_ENV = "MEGATRON_INPO_TEST_MARKER"


@dataclass(frozen=True)
class Case:
    command: str
    name: str
    change: Callable[[Path], list[str]]
    """Changes the copy of the good input in place; returns extra command-line arguments."""
    expect: str
    """Fragment the one-line message must contain; '{d}' is the input's path."""

    @property
    def id(self) -> str:
        return f"{self.command}-{self.name}"


class _Evil:
    """Unpickling this creates the marker file named by MARKER_ENV (what a hostile checkpoint would do)."""

    def __reduce__(self):
        return os.system, (f'touch "${MARKER_ENV}"',)


# --- small editors -------------------------------------------------------------------------------------------------

def _json(path: Path, edit: Callable[[object], object]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _set(path: Path, **kw) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        _json(d / path, lambda c: {**c, **kw})
        return []
    return change


def _drop(path: str, key: str) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        _json(d / path, lambda c: {k: v for k, v in c.items() if k != key})
        return []
    return change


def _write(path: str, data: bytes | str) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        (d / path).write_bytes(data if isinstance(data, bytes) else data.encode())
        return []
    return change


def _unlink(path: str) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        (d / path).unlink()
        return []
    return change


def _flip(path: str, rerecord: bool = False) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        b = bytearray((d / path).read_bytes())
        b[len(b) // 2] ^= 0x01
        (d / path).write_bytes(bytes(b))
        if rerecord:
            _rerecord(d)
        return []
    return change


def _truncate(path: str, keep: float = 0.5, no_verify: bool = False) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        b = (d / path).read_bytes()
        (d / path).write_bytes(b[: int(len(b) * keep)])
        return ["--no-verify"] if no_verify else []
    return change


def _rerecord(d: Path) -> None:
    """What a hostile author does: a digest record that matches the files as they now are."""
    meta = json.loads((d / "megatron_inpo.json").read_text())
    meta["files"] = trust.file_digests(d)
    (d / "megatron_inpo.json").write_text(json.dumps(meta))


def _safetensors(d: Path, edit: Callable[[dict, bytes], tuple[dict, bytes]]) -> list[str]:
    p = d / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = edit(json.loads(raw[8:8 + n]), raw[8 + n:])
    h = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(h)) + h + body)
    return []


def _st(edit: Callable[[dict, bytes], tuple[dict, bytes]]) -> Callable[[Path], list[str]]:
    return lambda d: _safetensors(d, edit)


def _rename_tensor(h: dict, body: bytes, old: str, new: str) -> tuple[dict, bytes]:
    h[new] = h.pop(old)
    return h, body


def _reshape(h: dict, body: bytes) -> tuple[dict, bytes]:
    t = h["model.norm.weight"]
    n = t["shape"][0]
    t["shape"] = [n // 2, 2]
    return h, body


def _index(weight_map: object, remove_single: bool = False) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        if remove_single:
            (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        return []
    return change


def _all_names_to(shard: str) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        raw = (d / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        names = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in names}}))
        return []
    return change


def _evil_metadata(rerecord: bool) -> Callable[[Path], list[str]]:
    def change(d: Path) -> list[str]:
        (d / ".metadata").write_bytes(pickle.dumps(_Evil()))
        if rerecord:
            _rerecord(d)
        return []
    return change


def _evil_common(d: Path) -> list[str]:
    torch.save({"data": _Evil()}, d / "common.pt")
    _rerecord(d)
    return []


def _traversal(d: Path) -> list[str]:
    """A .metadata whose storage entry names a file outside the checkpoint (made with the real classes)."""
    md = trust.load_metadata(d)
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (d / ".metadata").write_bytes(pickle.dumps(md))
    _rerecord(d)
    return []


# --- the cases -----------------------------------------------------------------------------------------------------

def _hf_cases() -> list[Case]:
    c = "hf_to_mcore"
    cfg = "config.json"
    return [
        Case(c, "no-config", _unlink(cfg), "{d}/config.json"),
        Case(c, "config-invalid-json", _write(cfg, "{\"hidden_size\": "), "{d}/config.json"),
        Case(c, "config-invalid-utf8", _write(cfg, b"{\"a\": \"\xff\"}"), "{d}/config.json"),
        Case(c, "config-a-list", _write(cfg, "[1, 2]"), "{d}/config.json"),
        Case(c, "config-no-hidden-size", _drop(cfg, "hidden_size"), "hidden_size"),
        Case(c, "config-hidden-size-string", _set(Path(cfg), hidden_size="32"), "hidden_size"),
        Case(c, "config-hidden-size-zero", _set(Path(cfg), hidden_size=0), "hidden_size"),
        Case(c, "config-heads-do-not-divide", _set(Path(cfg), num_attention_heads=5), "num_attention_heads"),
        Case(c, "config-kv-heads-do-not-divide", _set(Path(cfg), num_key_value_heads=3), "num_key_value_heads"),
        Case(c, "config-layers-negative", _set(Path(cfg), num_hidden_layers=-1), "num_hidden_layers"),
        Case(c, "config-vocab-null", _set(Path(cfg), vocab_size=None), "vocab_size"),
        Case(c, "config-other-architecture", _set(Path(cfg), model_type="gpt2", architectures=["GPT2LMHeadModel"]),
             "{d}/config.json"),
        Case(c, "config-vocab-differs-from-embedding", _set(Path(cfg), vocab_size=77), "model.safetensors"),
        Case(c, "no-weights", _unlink("model.safetensors"), "{d}"),
        Case(c, "weights-empty-file", _write("model.safetensors", b""), "model.safetensors: corrupted"),
        Case(c, "weights-truncated", _truncate("model.safetensors"), "model.safetensors"),
        Case(c, "weights-header-too-long", _write("model.safetensors", struct.pack("<Q", 10**12) + b"{}"),
             "model.safetensors: corrupted safetensors file (header length"),
        Case(c, "weights-header-a-list", _write("model.safetensors", struct.pack("<Q", 2) + b"[]"),
             "model.safetensors: corrupted safetensors file (header is a JSON list"),
        Case(c, "weights-header-invalid-json", _write("model.safetensors", struct.pack("<Q", 2) + b"{x"),
             "model.safetensors: corrupted safetensors file (header is not valid JSON"),
        Case(c, "weights-tensor-missing", _st(lambda h, b: _rename_tensor(h, b, "model.norm.weight", "model.nrm")),
             "model.norm.weight"),
        Case(c, "weights-tensor-extra", _st(lambda h, b: (
            {**h, "model.extra.weight": {**h["model.norm.weight"]}}, b)), "model.extra.weight"),
        Case(c, "weights-wrong-shape", _st(_reshape), "model.norm.weight"),
        Case(c, "weights-offsets-outside-file", _st(lambda h, b: (
            {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": [len(b) - 4, len(b) + 60]}}, b)),
             "model.safetensors"),
        Case(c, "weights-unknown-dtype", _st(lambda h, b: (
            {**h, "model.norm.weight": {**h["model.norm.weight"], "dtype": "F7"}}, b)), "model.safetensors"),
        Case(c, "index-outside-directory", _index({"model.norm.weight": "/etc/passwd"}, remove_single=True),
             "model.safetensors.index.json"),
        Case(c, "index-parent-directory", _index({"model.norm.weight": "../x.safetensors"}, remove_single=True),
             "model.safetensors.index.json"),
        Case(c, "index-a-list", lambda d: _write("model.safetensors.index.json", "[1]")(d) + [],
             "model.safetensors.index.json"),
        Case(c, "index-names-missing-shard", _all_names_to("model-00002-of-00002.safetensors"),
             "model-00002-of-00002.safetensors"),
        Case(c, "index-weight-map-a-list", _index([1, 2], remove_single=True), "model.safetensors.index.json"),
        # an export of this project: its digest record is checked first
        Case("hf_export", "flipped-weight-byte", _flip("model.safetensors"),
             "model.safetensors: sha256 differs from megatron_inpo.digests.json"),
        Case("hf_export", "changed-config", _set(Path(cfg), rms_norm_eps=0.5), "config.json: sha256 differs"),
        Case("hf_export", "missing-file", _unlink("generation_config.json"),
             "generation_config.json: missing export file"),
        Case("hf_export", "extra-file", _write("modeling_evil.py", "import os"),
             "modeling_evil.py: file not in the export's digest record"),
        Case("hf_export", "record-invalid", _write(trust.EXPORT_RECORD, "{\"format\": 1}"),
             "megatron_inpo.digests.json: not a megatron-inpo digest record"),
        Case("hf_export", "record-files-a-list", lambda d: _json(d / trust.EXPORT_RECORD, lambda r: {
            **r, "files": []}) or [], "megatron_inpo.digests.json: field 'files' is not a mapping"),
    ]


def _mcore_cases() -> list[Case]:
    c = "mcore_to_hf"
    meta = "megatron_inpo.json"
    return [
        Case(c, "no-metadata-json", _unlink("metadata.json"), "{d}: not a dist-checkpoint (no metadata.json)"),
        Case(c, "metadata-json-invalid", _write("metadata.json", "{"), "metadata.json"),
        Case(c, "metadata-json-other-backend", _set(Path("metadata.json"), sharded_backend="zarr"),
             "metadata.json"),
        Case(c, "no-megatron-inpo-json", _unlink(meta), "megatron_inpo.json"),
        Case(c, "megatron-inpo-json-invalid", _write(meta, "{"), "megatron_inpo.json"),
        Case(c, "megatron-inpo-json-a-list", _write(meta, "[]"), "megatron_inpo.json"),
        Case(c, "megatron-inpo-json-no-hf-config", _drop(meta, "hf_config"), "megatron_inpo.json"),
        Case(c, "megatron-inpo-json-padded-vocab-string", _set(Path(meta), padded_vocab_size="lots"),
             "padded_vocab_size"),
        Case(c, "files-record-a-list", _set(Path(meta), files=[1]),
             "megatron_inpo.json: field 'files' is not a mapping"),
        Case(c, "pickled-metadata", _evil_metadata(rerecord=False), ".metadata: sha256 differs"),
        Case(c, "pickled-metadata-rerecorded", _evil_metadata(rerecord=True),
             ".metadata: refused: references posix.system"),
        Case(c, "pickled-metadata-no-verify", lambda d: _evil_metadata(False)(d) + ["--no-verify"],
             ".metadata: refused: references posix.system"),
        Case(c, "pickled-common", _evil_common, "common.pt: refused"),
        Case(c, "garbage-metadata", lambda d: _write(".metadata", b"\x80\x04garbage")(d) + ["--no-verify"],
             ".metadata: unreadable metadata"),
        Case(c, "missing-metadata", lambda d: _unlink(".metadata")(d) + ["--no-verify"],
             ".metadata: missing (not a complete dist-checkpoint)"),
        Case(c, "flipped-shard-byte", _flip("__0_0.distcp"), "__0_0.distcp: sha256 differs"),
        Case(c, "missing-shard", _unlink("__0_0.distcp"), "__0_0.distcp: missing checkpoint file"),
        Case(c, "truncated-shard", _truncate("__0_0.distcp"), "__0_0.distcp: sha256 differs"),
        Case(c, "truncated-shard-no-verify", _truncate("__0_0.distcp", 0.5, no_verify=True), "__0_0.distcp"),
        Case(c, "extra-file", _write("run.sh", "rm -rf /"), "run.sh: file not in the checkpoint's digest record"),
        Case(c, "storage-outside-directory", _traversal, "names '../../etc/passwd', not a file of the checkpoint"),
    ]


def _run_cases() -> list[Case]:
    c = "run"

    def yaml_(text: str) -> Callable[[Path], list[str]]:
        def change(d: Path) -> list[str]:
            (d / "run.yaml").write_text(text)
            return ["--config", str(d / "run.yaml")]
        return change

    def args(*a: str) -> Callable[[Path], list[str]]:
        return lambda d: list(a)

    def prompts(i: int, text: bytes | str, *extra: str) -> Callable[[Path], list[str]]:
        def change(d: Path) -> list[str]:
            (d / f"p{i}.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
            return list(extra)
        return change

    long_ids = json.dumps({"id": "x", "prompt": "a", "prompt_ids": [5] * 600})
    return [
        Case(c, "yaml-invalid", yaml_("iterations: [1,\n"), "run.yaml"),
        Case(c, "yaml-a-list", yaml_("- 1\n- 2\n"), "run.yaml"),
        Case(c, "yaml-unknown-key", yaml_("iteratoins: 3\n"), "iteratoins"),
        Case(c, "yaml-unknown-nested-key", yaml_("train:\n  lrr: 0.1\n"), "run.yaml: train: unknown field(s) ['lrr']"),
        Case(c, "yaml-wrong-type", yaml_("iterations: three\n"), "iterations"),
        Case(c, "yaml-section-a-number", yaml_("train: 3\n"), "train"),
        Case(c, "yaml-invalid-utf8", lambda d: _write("run.yaml", b"seed: \xff\n")(d) + ["--config",
                                                                                         str(d / "run.yaml")],
             "run.yaml"),
        Case(c, "iterations-zero", args("--iterations=0"), "iterations: must be >= 1"),
        Case(c, "lr-inf", args("--train.lr=inf"), "train.lr"),
        Case(c, "lr-nan", args("--train.lr=nan"), "train.lr"),
        Case(c, "lr-negative", args("--train.lr=-1"), "train.lr"),
        Case(c, "tau-above-eta", args("--algorithm.objective.tau=1", "--algorithm.objective.eta=0.5"),
             "algorithm.objective.tau"),
        Case(c, "unknown-objective", args("--algorithm.objective.name=ppo"), "algorithm.objective.name"),
        Case(c, "unknown-trainer", args("--trainer=jax"), "trainer"),
        Case(c, "renamed-field", args("--engine=torch"), "engine was renamed 'trainer'"),
        Case(c, "k-not-a-tournament", args("--rollout.sampling.n=7"), "7"),
        Case(c, "unknown-recipe", args("--recipe", "llama9"), "--recipe: unknown recipe 'llama9'"),
        Case(c, "override-malformed", args("--train.lr"), "train.lr"),
        Case(c, "override-unknown-field", args("--train.learning_rate=1"), "learning_rate"),
        Case(c, "judge-function-missing", args("--judge.function=nowhere.module:f"), "judge.function"),
        Case(c, "hf-without-path", args("--model.source=hf"), "model.hf_path"),
        # model.source 'hf': every line of the prompt files against the model, before any stage
        Case(c, "hf-prompt-file-missing", lambda d: ["--prompts=[\"" + str(d / "nope.jsonl") + "\"]"],
             "prompts[0]: file"),
        Case(c, "hf-prompt-count", lambda d: ["--iterations=2"], "prompts: need one prompt file per iteration"),
        Case(c, "hf-prompt-invalid-json", prompts(0, '{"id": "a", "prompt": "x"}\n{"id": \n'), "p0.jsonl:2: invalid JSON"),
        Case(c, "hf-prompt-invalid-utf8", prompts(0, b'{"id": "a", "prompt": "\xff"}\n'), "p0.jsonl:1: invalid UTF-8"),
        Case(c, "hf-prompt-oov", prompts(0, json.dumps({"id": "a", "prompt": "a", "prompt_ids": [10**7]}) + "\n"),
             "p0.jsonl:1: field 'prompt_ids': token id 10000000"),
        Case(c, "hf-prompt-ids-beyond-positions", prompts(0, long_ids + "\n"), "p0.jsonl:1: field 'prompt_ids' has 600"),
        Case(c, "hf-prompt-absurdly-long", prompts(0, json.dumps({"id": "a", "prompt": "z" * 3_000_000}) + "\n"),
             "p0.jsonl:1: field 'prompt' has 3000000 characters"),
        Case(c, "hf-prompt-duplicate-id", prompts(0, '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n'),
             "p0.jsonl:2: duplicate prompt id 'a'"),
        Case(c, "hf-prompt-empty", prompts(0, ""), "p0.jsonl: no prompts"),
        Case(c, "hf-eval-prompt-bad", prompts(9, '{"id": "a", "prompt": 5}\n'), "p9.jsonl:1: field 'prompt' must be"),
        Case(c, "hf-model-not-a-model", lambda d: [f"--model.hf_path={d / 'nowhere'}"], "model.hf_path"),
    ]


def corpus() -> list[Case]:
    return _hf_cases() + _mcore_cases() + _run_cases()


CORPUS = corpus()


def test_the_corpus_covers_convert_and_run():
    from tests.data.test_bad_inputs import CORPUS as DATA

    assert len(CORPUS) >= 80 and len({c.id for c in CORPUS}) == len(CORPUS)
    assert {c.command for c in CORPUS} == {"hf_to_mcore", "hf_export", "mcore_to_hf", "run"}
    # with the data-file half: every command that reads an input
    assert len(CORPUS) + len(DATA) >= 250


# --- the good inputs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    from megatron_inpo.convert.mcore_to_hf import convert_mcore_to_hf

    root = tmp_path_factory.mktemp("good")
    make_tiny_llama(root / "hf", seed=0)
    convert_to_mcore(root / "hf", root / "ckpt")
    convert_mcore_to_hf(root / "ckpt", root / "export", dtype="fp32", progress=False)
    return {"hf_to_mcore": root / "hf", "hf_export": root / "export", "mcore_to_hf": root / "ckpt",
            "run": root / "hf"}


def _run_argv(case: Case, d: Path, tmp_path: Path, extra: list[str]) -> list[str]:
    """A one-iteration run on the HF model `d` with the prompt files p0 (training) and p9 (eval)."""
    for i in (0, 9):
        p = d / f"p{i}.jsonl"
        if not p.exists():
            p.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n")
    hf = case.name.startswith("hf-")
    base = ["run", "--recipe", "tiny_cpu", f"--run_dir={tmp_path / 'run'}", "--trainer=torch", "--iterations=1",
            "--no-progress"]
    if hf:
        base += ["--model.source=hf", f"--model.hf_path={d}", f"--prompts=[\"{d / 'p0.jsonl'}\"]",
                 f"--eval.prompts={d / 'p9.jsonl'}", "--rollout.sampling.max_new_tokens=8",
                 "--eval.sampling.max_new_tokens=8"]
    if case.name == "hf-without-path":
        base = [a for a in base if not a.startswith(("--model.hf_path", "--prompts", "--eval.prompts"))]
    if "--recipe" in extra:
        base = [a for a in base if a not in ("--recipe", "tiny_cpu")]
    return base + extra


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_bad_input_exits_2_with_one_line(case, good, tmp_path, capsys, monkeypatch):
    from megatron_inpo.cli import main

    marker = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    monkeypatch.setenv(trust.NO_VERIFY_ENV, "0")  # --no-verify sets it in this process; restored afterwards
    d = tmp_path / "input"
    shutil.copytree(good[case.command], d)
    extra = case.change(d)
    out = tmp_path / "out"
    if case.command in ("hf_to_mcore", "hf_export"):
        argv = ["convert", "hf-to-mcore", "--hf-dir", str(d), "--mcore-dir", str(out), "--no-progress", *extra]
    elif case.command == "mcore_to_hf":
        argv = ["convert", "mcore-to-hf", "--mcore-dir", str(d), "--hf-dir", str(out), "--no-progress", *extra]
    else:
        argv = _run_argv(case, d, tmp_path, extra)
        out = tmp_path / "run" / "manifest.json"
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(err) == 1 and "Traceback" not in err[0] and len(err[0]) < 700, err
    assert case.expect.format(d=d) in err[0], err[0]
    assert not out.exists()  # nothing written
    assert not marker.exists()  # no code from the input ran
