"""A Megatron stage's progress reaches the driver's terminal: rank 0 writes it to a file after each step
(engine.metrics.StageProgress) and the driver shows it on one live line while it waits for the stage."""
import io
import json
import sys

from megatron_inpo.driver.launcher import StageLauncher, _LiveLine
from megatron_inpo.engine.metrics import StageProgress


def test_progress_file_and_live_line(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    p = StageProgress("train[sft]", total=10, initial=3, unit="step", path=str(path))
    assert json.loads(path.read_text())["done"] == 3
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    line = _LiveLine("sft", str(path))
    line.refresh()
    assert line.bar.n == 3 and line.bar.total == 10
    p.update(2, loss=1.25, tokens_per_s=400.0)
    info = json.loads(path.read_text())
    assert (info["done"], info["loss"], info["tokens_per_s"]) == (5, 1.25, 400.0)
    line.refresh()
    assert line.bar.n == 5 and "loss=1.25" in err.getvalue() and "sft: train[sft]" in err.getvalue()
    StageProgress("logprobs[last]", total=4, path=str(path))  # a new phase of the stage: a new bar
    line.refresh()
    assert line.bar.n == 0 and line.bar.total == 4
    line.close()
    assert StageProgress("x", 1, path=str(tmp_path / "off.json"), enabled=False).path == ""
    assert not (tmp_path / "off.json").exists()


def test_launcher_polls_the_progress_file_while_the_stage_runs(tmp_path, monkeypatch):
    """The launcher refreshes the live line while the stage process runs; the log keeps the stage's own output."""
    from megatron_inpo.driver.config import LaunchConfig

    prog = tmp_path / "p.json"
    script = (f"import json, time\nfor k in range(3):\n    json.dump({{'stage': 's', 'done': k + 1, 'total': 3}}, "
              f"open({str(prog)!r}, 'w'))\n    time.sleep(0.6)\nprint('stage output')\n")
    launcher = StageLauncher(LaunchConfig(stage_runner="subprocess"), tmp_path, show_progress=True)
    monkeypatch.setattr(launcher, "command", lambda args, distributed=True, port=0: [sys.executable, "-c", script])
    seen = []
    real = _LiveLine.refresh

    def spy(self):
        real(self)
        if self.bar is not None:
            seen.append(self.bar.n)

    monkeypatch.setattr(_LiveLine, "refresh", spy)
    launcher.run("demo", [], progress_file=str(prog))
    assert seen and max(seen) >= 2
    assert "stage output" in (tmp_path / "logs" / "demo.log").read_text()
