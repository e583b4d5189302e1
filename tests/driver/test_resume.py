"""SIGKILL in every stage, resume with the same command: the result equals an uninterrupted run bit for bit.

The run is the tiny_cpu recipe shrunk to seconds (tests/helpers/driver.py), trainer=torch (the in-process reference
stages). Faults are injected with MEGATRON_INPO_FAULT: the driver SIGKILLs itself at the named point (mid-stage:
after a rollout / judge batch was appended, after an optimizer step; or at '@end', when a stage's outputs are
complete but not yet recorded in the manifest, the most dangerous moment).
"""
import json
import signal

import pytest
import torch

from tests.helpers.driver import run_cli, tensors, tiny_overrides

POINTS = ["prepare@end", "sft@step2", "sft@end", "iter1/rollout@batch1", "iter1/judge@batch1",
          "iter1/logprobs@end", "iter1/train@step2", "iter1/checkpoint@end", "iter2/export@end", "iter1/eval@end",
          "iter2/rollout@end", "iter2/judge@end", "iter2/train@step3", "iter2/eval@end"]


@pytest.mark.slow
@pytest.mark.one_stack
def test_sigkill_in_every_stage_then_resume_equals_uninterrupted(tmp_path):
    ref_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(ref_dir)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "win rate vs pi_ref" in r.stdout

    args = ["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(cut_dir)]
    env = {"MEGATRON_INPO_FAULT": ",".join(POINTS)}
    kills = 0
    for _ in range(len(POINTS) + 2):
        r = run_cli(args, env=env)
        if r.returncode != -signal.SIGKILL:
            break
        kills += 1
    assert r.returncode == 0, r.stderr[-3000:]
    assert kills == len(POINTS)
    fired = sorted(p.name for p in (cut_dir / ".faults").iterdir())
    assert fired == sorted(p.replace("/", "_") for p in POINTS)

    a, b = (json.loads((d / "results.json").read_text()) for d in (ref_dir, cut_dir))
    # the torch engine exports every iterate to run_dir/hf/pi_t as the Megatron engine does, with a digest record
    from megatron_inpo.engine.trust import verify_export

    assert a["final_hf"] == str(ref_dir / "hf" / "pi_3") and verify_export(a["final_hf"]) is True
    assert verify_export(cut_dir / "hf" / "pi_2") is True
    ta, tb = tensors(a["final_hf"]), tensors(b["final_hf"])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a["table"] == b["table"]  # same pairs, losses, win rates
    for t in (1, 2):
        for name in ("rollouts.jsonl", "pairs.jsonl", "pairs.logp.jsonl"):
            fa, fb = (d / f"iter_{t:02d}" / name for d in (ref_dir, cut_dir))
            assert fa.read_bytes() == fb.read_bytes(), name
        ids = [json.loads(line)["prompt_id"] for line in open(cut_dir / f"iter_{t:02d}" / "rollouts.jsonl")]
        assert len(ids) == len(set(ids)) == 32  # nothing duplicated, nothing lost
    man = json.loads((cut_dir / "manifest.json").read_text())
    assert man["stages"]["iter1/train"]["attempts"] == 2 and man["stages"]["iter1/rollout"]["attempts"] == 2
    assert man["stages"]["iter2/logprobs"]["attempts"] == 1
    # the killed training stages continued from their step checkpoints (saved every step) instead of restarting
    assert json.loads((cut_dir / "iter_01" / "train" / "result.json").read_text())["resumed_from_step"] == 1
    assert json.loads((cut_dir / "iter_02" / "train" / "result.json").read_text())["resumed_from_step"] == 2
    assert json.loads((cut_dir / "sft" / "result.json").read_text())["resumed_from_step"] == 1
    assert (cut_dir / "table.txt").read_text() == (ref_dir / "table.txt").read_text()
    assert (cut_dir / "win_rate.png").stat().st_size > 1000
    # a finished run rerun: every stage is skipped, nothing is redone, the same table is printed
    r = run_cli(args)
    assert r.returncode == 0 and " ..." not in r.stdout and (cut_dir / "table.txt").read_text() in r.stdout
    assert json.loads((cut_dir / "manifest.json").read_text())["stages"] == man["stages"]
    assert list((cut_dir / "tensorboard").glob("events.out.tfevents.*"))
