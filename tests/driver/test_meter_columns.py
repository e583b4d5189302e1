"""The driver's Nash-meter columns on the word task: the style mix of each iterate and of pi_ref (approximation)."""
from __future__ import annotations

import json

from megatron_inpo.cli.run import resolve_config
from megatron_inpo.driver.loop import Driver
from megatron_inpo.driver.report import format_table
from tests.helpers.driver import tiny_overrides


def test_word_task_rows_carry_the_style_mix(tmp_path):
    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "run", iterations=1))
    rows = Driver(cfg, progress=False, out=lambda s: None).run()
    (row,) = rows
    for key in ("style_mix", "ref_style_mix"):
        assert set(row[key]) == {"rock", "paper", "scissors", "none"} and abs(sum(row[key].values()) - 1) < 1e-12
    assert 0 <= row["style_exploitability"] <= 0.5 and 0 <= row["ref_style_exploitability"] <= 0.5
    assert "kl_to_nash" not in row  # exact only on the game task
    assert json.loads((tmp_path / "run" / "results.json").read_text())["table"][0]["style_mix"] == row["style_mix"]
    table = format_table(rows)
    assert "style mix r/p/s" in table and "(pi_ref)" in table and "APPROXIMATION" in table
