"""The driver's Megatron stages (subprocesses of the engine) against the in-process torch reference stages, and a
whole run with trainer=megatron (needs the converter)."""
import json

import pytest

from tests.helpers.driver import run_cli, stage_processes_left, tiny_overrides
from megatron_inpo.cli.run import resolve_config
from megatron_inpo.driver.stages import MegatronStages, TorchStages, missing_megatron_parts

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """One torch-engine iteration: the SFT policy and iteration 1's pairs (with reference log-probs)."""
    run = tmp_path_factory.mktemp("torch_run")
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(run, iterations=1),
                 "--eval.enabled=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    return run


NEEDS = pytest.mark.skipif(bool(missing_megatron_parts()),
                           reason="trainer=megatron needs: " + ", ".join(missing_megatron_parts()))


@pytest.mark.slow
@NEEDS
def test_megatron_logprob_and_train_stages_match_torch_reference(torch_run, tmp_path):
    """The same SFT weights and pairs through the driver's Megatron stages (convert, logprobs, train subprocesses)
    and through the torch reference stages."""
    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "m", trainer="megatron", iterations=1))
    st = MegatronStages(cfg, tmp_path / "m")
    try:
        _logprob_and_train_stages_match(st, torch_run, tmp_path)
    finally:
        st.close()  # the stage worker (the persistent runner, CPU's default)


def _logprob_and_train_stages_match(st, torch_run, tmp_path):
    ref_ckpt = st.import_hf(torch_run / "sft" / "model", tmp_path / "ref_mcore")
    pairs = torch_run / "iter_01" / "pairs.jsonl"
    out = tmp_path / "m" / "iter_01" / "pairs.logp.jsonl"
    out.parent.mkdir(parents=True)
    st.logprobs(pairs, out, ref_ckpt, None)
    got = [json.loads(line) for line in open(out)]
    want = [json.loads(line) for line in open(torch_run / "iter_01" / "pairs.logp.jsonl")]
    assert [g["prompt_id"] for g in got] == [w["prompt_id"] for w in want]
    for g, w in zip(got, want):
        for k in ("ref_chosen_logp", "ref_rejected_logp", "last_chosen_logp", "last_rejected_logp"):
            assert g[k] == pytest.approx(w[k], abs=1e-4), k  # float32 sums of <= 16 tokens
    ckpt, metrics = st.train(out, ref_ckpt, tmp_path / "m" / "iter_01" / "train")
    assert (ckpt / "megatron_inpo.json").exists()
    torch_metrics = json.loads((torch_run / "iter_01" / "train" / "result.json").read_text())["metrics"]
    # Same data order, schedule and AdamW settings; the two implementations differ only in float rounding (and
    # Megatron's clipping epsilon), so after 4 steps the losses agree to a few percent.
    assert metrics["loss"] == pytest.approx(torch_metrics["loss"], rel=0.05)


@pytest.mark.slow
@NEEDS
@pytest.mark.parametrize("runner", ["auto", "subprocess"])
def test_megatron_run_killed_in_stages_resumes_to_the_same_policy(tmp_path, runner):
    """trainer=megatron, one iteration: SIGKILL the driver while the SFT, log-prob and training stages run (after
    their first step checkpoint / chunk) and after the eval; the stage subprocesses or the stage worker (auto on
    CPU: persistent) die with the driver (parent-death signal), the resumed run continues from the engine's
    checkpoints, and the final policy equals an uninterrupted run's bit for bit."""
    import signal

    import torch

    from tests.helpers.driver import tensors

    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(a, trainer="megatron", iterations=1),
                 f"--launch.stage_runner={runner}"], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    points = ["sft@checkpoint", "iter1/logprobs@running", "iter1/train@checkpoint", "iter1/eval@end"]
    args = ["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(b, trainer="megatron", iterations=1),
            f"--launch.stage_runner={runner}"]
    kills = 0
    for _ in range(len(points) + 2):
        r = run_cli(args, env={"MEGATRON_INPO_FAULT": ",".join(points)}, timeout=900)
        if r.returncode != -signal.SIGKILL:
            break
        kills += 1
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert kills == len(points)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    man = json.loads((b / "manifest.json").read_text())
    assert man["trainer"] == "megatron" and man["stages"]["iter1/train"]["attempts"] == 2
    assert (b / "policies" / "pi_2" / "megatron_inpo.json").exists()
    ta, tb = tensors(ra["final_hf"]), tensors(rb["final_hf"])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert ra["table"] == rb["table"] and 0.0 < ra["table"][0]["win_rate"] < 1.0
    log = (b / "logs" / "train_iter_01.log").read_text()
    assert "resuming from" in log  # the training stage continued from its step checkpoint
    # Nothing of a killed stage outlives the resumed run (dist_checkpointing's spawned helpers included).
    assert stage_processes_left() == []


def test_torch_stages_export_is_a_recorded_copy(tmp_path):
    from megatron_inpo.engine.trust import verify_export
    from tests.helpers.engine import tiny_hf_model

    st = TorchStages(resolve_config("tiny_cpu", None, ["trainer=torch"]))
    tiny_hf_model().save_pretrained(tmp_path / "policy")
    out = st.export_hf(tmp_path / "policy", tmp_path / "hf" / "pi_2", "float32")
    assert out == tmp_path / "hf" / "pi_2" and verify_export(out) is True
    for p in (tmp_path / "policy").iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert st.import_hf(tmp_path / "policy", tmp_path / "x") == tmp_path / "policy"
