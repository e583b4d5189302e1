"""`megatron-inpo compare`: one run per algorithm (torch engine, tiny sizes), one table and one PNG; resumable."""
from __future__ import annotations

import json

from megatron_inpo.cli import compare
from tests.helpers.driver import tiny_overrides

TINY_GAME = ["--task.games=4", "--task.prompts_per_iteration=32", "--task.eval_prompts=8", "--task.sft_examples=64",
             "--task.hidden_size=16", "--task.intermediate_size=32", "--task.num_heads=2", "--task.num_kv_heads=1",
             "--task.num_layers=1"]


def test_compare_writes_table_json_and_png_and_replays(tmp_path, capsys):
    base = tmp_path / "cmp"
    argv = ["--recipe", "game_cpu", "--algorithms", "inpo,dpo", "--no-progress",
            *tiny_overrides(base, trainer="torch", iterations=2), *TINY_GAME]
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    for title in ("KL(pi* || pi_t)", "duality gap of pi_t", "win rate of pi_t vs pi_ref", "certificate"):
        assert title in out
    text = (base / "compare.txt").read_text()
    assert "0 pi_ref" in text and "inpo" in text and "dpo" in text
    assert (base / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((base / "compare.json").read_text())
    assert data["algorithms"] == ["inpo", "dpo"]
    rows = {(r["algorithm"], r["iteration"]): r for r in data["table"]}
    assert set(rows) == {(a, i) for a in ("inpo", "dpo") for i in (0, 1, 2)}
    # same task, seed and pi_ref: iteration 0 (pi_ref) reads the same in both runs
    assert abs(rows[("inpo", 0)]["kl_to_nash"] - rows[("dpo", 0)]["kl_to_nash"]) < 1e-12
    assert all("duality_gap" in r and "kl_to_nash" in r for r in data["table"])
    assert all("win_rate" in r for (a, i), r in rows.items() if i > 0)
    for a in ("inpo", "dpo"):
        res = json.loads((base / a / "results.json").read_text())
        assert len(res["table"]) == 2 and all("kl_to_nash" in r for r in res["table"])
    # rerun: both runs are finished, nothing is recomputed, the same table comes out
    before = {a: (base / a / "manifest.json").read_text() for a in ("inpo", "dpo")}
    assert compare.main(argv) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert (base / "compare.txt").read_text() == text
    assert {a: (base / a / "manifest.json").read_text() for a in ("inpo", "dpo")} == before


def test_compare_refuses_unknown_algorithm(tmp_path, capsys):
    argv = ["--recipe", "game_cpu", "--algorithms", "inpo,nope", *tiny_overrides(tmp_path / "x", trainer="torch")]
    assert compare.main(argv) == 2
    assert "nope" in capsys.readouterr().err
