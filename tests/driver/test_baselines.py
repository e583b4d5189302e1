"""The baselines as their authors run them, through the driver (tiny torch-engine runs).

Iterative DPO as RLHFlow's current run_loop.sh runs it anchors on pi_t: in a 2-iteration run, the log-prob columns
that iteration 2 trains on are log pi_2 (recomputed here with plain transformers from the iteration-2 policy
export) and differ from the ref columns (log pi_ref). SPPO's judging stage gets algorithm.sppo_winrate."""
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.driver import run_cli, tiny_overrides


def _sequence_logp(model, prompt_ids, response_ids) -> float:
    """Sum of log p(response token | prefix), one unpadded sequence, float64 softmax."""
    ids = list(prompt_ids) + list(response_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return float(logp[len(prompt_ids) - 1:].sum())


def test_dpo_iteration2_anchor_columns_are_log_pi_2(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "dpo"
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(run_dir, trainer="torch", iterations=2),
                 "--algorithm.objective.name=dpo"])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((run_dir / "manifest.json").read_text())
    assert "dpo_anchor: last" in (run_dir / "config.yaml").read_text()  # the default, part of the run's identity
    pairs = [json.loads(line) for line in open(man["stages"]["iter2/logprobs"]["outputs"]["data"]) if line.strip()]
    assert len(pairs) >= 8 and all(p["iteration"] == 2 for p in pairs)
    models = {name: AutoModelForCausalLM.from_pretrained(man["stages"][f"{name}/export"]["outputs"]["hf"],
                                                         dtype=torch.float32).eval()
              for name in ("iter1", "iter2")}  # pi_1 = pi_ref and pi_2, as exported for rollout
    diffs = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids = p[f"{side}_ids"]
            last = _sequence_logp(models["iter2"], p["prompt_ids"], ids)
            ref = _sequence_logp(models["iter1"], p["prompt_ids"], ids)
            assert p[f"last_{side}_logp"] == pytest.approx(last, abs=2e-4), (p["prompt_id"], side)
            assert p[f"ref_{side}_logp"] == pytest.approx(ref, abs=2e-4), (p["prompt_id"], side)
            diffs.append(abs(p[f"last_{side}_logp"] - p[f"ref_{side}_logp"]))
    assert max(diffs) > 0.05  # pi_2 moved away from pi_ref: the two anchors are different numbers
    # iteration 1's columns: pi_1 = pi_ref, so last = ref there
    first = [json.loads(line) for line in open(man["stages"]["iter1/logprobs"]["outputs"]["data"]) if line.strip()]
    assert all(p["last_chosen_logp"] == p["ref_chosen_logp"] and p["last_rejected_logp"] == p["ref_rejected_logp"]
               for p in first)
    # DPO's implicit margin (metric h_mean) at iteration 2 is anchored on pi_2, not on pi_ref (metric margin)
    m2 = man["stages"]["iter2/train"]["outputs"]["metrics"]
    assert m2["h_mean"] != pytest.approx(m2["margin"], abs=1e-6)
    assert Path(man["stages"]["iter2/export"]["outputs"]["hf"]).is_dir()


@pytest.mark.parametrize("winrate", ["uclaml", "others"])
def test_sppo_run_judges_with_the_configured_winrate(tmp_path, winrate):
    run_dir = tmp_path / winrate
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(run_dir, trainer="torch", iterations=1),
                 "--algorithm.objective.name=sppo", f"--algorithm.sppo_winrate={winrate}", "--eval.enabled=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    pairs = [json.loads(line) for line in open(run_dir / "iter_01" / "pairs.jsonl") if line.strip()]
    assert pairs
    for p in pairs:
        assert p["extra"]["method"] == "all_pairs" and p["extra"]["winrate"] == winrate
        k = len(p["extra"]["winrates"])
        wins = [0.0] * k  # the recorded matches, summed as the definition says
        for i, j, prob in p["extra"]["matches"]:
            wins[i] += prob
            wins[j] += 1 - prob
        want = [(w + 0.5) / k for w in wins] if winrate == "uclaml" else [w / (k - 1) for w in wins]
        assert p["extra"]["winrates"] == pytest.approx(want, abs=1e-12)
        assert p["chosen_winrate"] == pytest.approx(max(want), abs=1e-12)
        assert p["rejected_winrate"] == pytest.approx(min(want), abs=1e-12)
