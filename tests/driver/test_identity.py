"""One config identity for `run`: a different config is refused also when config.yaml was deleted (the manifest's
digest is compared); fields that only say where things are (run_dir, ports, server URLs, timeouts) are not part of
it, so a moved run directory resumes, to the same result as an uninterrupted run."""
import json
import shutil
import signal

import pytest
import torch
import yaml

from megatron_inpo.cli.run import resolve_config
from megatron_inpo.config import ConfigError, save_yaml
from megatron_inpo.driver.manifest import Manifest, config_digest, identity, identity_digest
from tests.helpers.driver import run_cli, tensors, tiny_overrides


def _cfg(run_dir, *extra):
    return resolve_config("tiny_cpu", None, tiny_overrides(run_dir) + list(extra))


def test_identity_leaves_out_location_fields(tmp_path):
    a = _cfg(tmp_path / "a")
    b = _cfg(tmp_path / "b", "--launch.master_port=29999", "--stage_timeout_s=60", "--server_memory_saver=true",
             "--rollout.server_urls=[http://x:1]", "--rollout.timeout_s=5", "--judge.max_retries=0",
             "--launch.rdzv_endpoint=h:1", "--launch.stage_runner=subprocess")
    assert identity_digest(a) == identity_digest(b) and config_digest(a) != config_digest(b)
    assert "run_dir" not in identity(a) and "rollout.server_urls" not in identity(a)
    assert "rollout.sampling.temperature" in identity(a) and "launch.nproc_per_node" in identity(a)
    for change in ("--rollout.sampling.temperature=0.5", "--train.lr=0.002", "--rollout_batch_size=8",
                   "--task.seed=7"):
        assert identity_digest(_cfg(tmp_path / "a", change)) != identity_digest(a), change


def test_deleted_config_yaml_still_refuses_a_changed_config(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(run)
    m = Manifest.open(run, cfg)
    m.finish("prepare", {"prompts": [str(run / "p.jsonl")], "eval_prompts": str(run / "e.jsonl")}, 1.0)
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError) as e:
        Manifest.open(run, _cfg(run, "--train.lr=0.002"))
    msg = str(e.value)
    assert "different config" in msg and "config.yaml is missing" in msg and "\n" not in msg
    assert json.loads((run / "manifest.json").read_text())["stages"]  # the records are untouched
    m = Manifest.open(run, _cfg(run, "--stage_timeout_s=9"))  # the same identity: resumes, the YAML comes back
    assert m.done("prepare") and yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.001
    # a config.yaml edited to match a different config does not pass either: the digest differs
    save_yaml(_cfg(run, "--train.lr=0.002"), run / "config.yaml")
    with pytest.raises(ConfigError, match="config.yaml was edited after the run started"):
        Manifest.open(run, _cfg(run, "--train.lr=0.002"))
    # the command line: exit 2 and the message on one line
    (run / "config.yaml").unlink()
    r = run_cli(["run", "--recipe", "tiny_cpu", *tiny_overrides(run), "--train.lr=0.002"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "megatron-inpo run: error: " in r.stderr and "config.yaml is missing" in r.stderr


def test_manifest_from_before_the_identity(tmp_path):
    """An old manifest recorded only config_sha256 (the whole config): that digest is compared."""
    run = tmp_path / "run"
    cfg = _cfg(run)
    Manifest.open(run, cfg)
    data = json.loads((run / "manifest.json").read_text())
    for k in ("identity_sha256", "run_dir"):
        data.pop(k)
    (run / "manifest.json").write_text(json.dumps(data))
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="different config"):
        Manifest.open(run, _cfg(run, "--train.lr=0.002"))
    assert Manifest.open(run, cfg).data["identity_sha256"] == identity_digest(cfg)


def test_moved_manifest_rebases_recorded_outputs(tmp_path):
    old, new = tmp_path / "old", tmp_path / "moved" / "run"
    m = Manifest.open(old, _cfg(old))
    m.finish("prepare", {"prompts": [str(old / "p1.jsonl"), "/elsewhere/p2.jsonl"], "eval_prompts": str(old),
                         "n": 3, "oldish": str(old) + "x/y"}, 1.0)
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    m = Manifest.open(new, _cfg(new))
    assert m.outputs("prepare") == {"prompts": [str(new / "p1.jsonl"), "/elsewhere/p2.jsonl"],
                                    "eval_prompts": str(new), "n": 3, "oldish": str(old) + "x/y"}
    # a stage that finished on disk before the move reports paths under the old location: rebased too
    m.finish("sft", {"policy": str(old / "sft" / "model")}, 1.0)
    assert Manifest.open(new, _cfg(new)).outputs("sft") == {"policy": str(new / "sft" / "model")}


@pytest.mark.slow
def test_moved_run_directory_resumes_to_the_uninterrupted_result(tmp_path):
    ref, cut, moved = tmp_path / "ref", tmp_path / "cut", tmp_path / "elsewhere" / "moved"
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(ref, iterations=1)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(cut, iterations=1)],
                env={"MEGATRON_INPO_FAULT": "iter1/train@step2"})
    assert r.returncode == -signal.SIGKILL
    moved.parent.mkdir()
    shutil.move(str(cut), str(moved))
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(moved, iterations=1)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "iter1/rollout ..." not in r.stdout and "iter1/train ... (resuming, attempt 2)" in r.stdout
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, moved))
    assert b["final_hf"].startswith(str(moved)) and str(cut) not in json.dumps(b)
    ta, tb = tensors(a["final_hf"]), tensors(b["final_hf"])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["table"] == b["table"]
    assert json.loads((moved / "iter_01" / "train" / "result.json").read_text())["resumed_from_step"] == 1


def test_legacy_manifest_with_its_yaml_allows_mutable_fields(tmp_path):
    """Before the identity, config_sha256 covered every field: with config.yaml present the YAML decides, so a
    changed stage_timeout_s still resumes."""
    run = tmp_path / "run"
    Manifest.open(run, _cfg(run))
    data = json.loads((run / "manifest.json").read_text())
    data.pop("identity_sha256")
    (run / "manifest.json").write_text(json.dumps(data))
    Manifest.open(run, _cfg(run, "--stage_timeout_s=30"))
    for text in ("[]", '{"format_version": 1}', "\udcff"):
        (run / "manifest.json").write_text(text, errors="surrogateescape")
        with pytest.raises(ConfigError, match="corrupt manifest"):
            Manifest(run)


def test_run_directory_from_before_the_rename_of_engine_to_trainer_resumes(tmp_path):
    """A run started when the run switch `trainer` was still called `engine` recorded `engine` in its config.yaml
    and in its identity digest: it resumes under the new name, and a changed switch is refused naming `trainer`."""
    from megatron_inpo import identity as plain
    from megatron_inpo.config import to_dict
    from megatron_inpo.driver.manifest import RESUME_MUTABLE

    run = tmp_path / "run"
    cfg = _cfg(run)
    as_before = to_dict(cfg)
    as_before["engine"] = as_before.pop("trainer")  # the config as the code before the rename resolved it
    Manifest.open(run, cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(as_before))
    data = json.loads((run / "manifest.json").read_text())
    assert data["identity_sha256"] == plain.identity_digest(as_before, RESUME_MUTABLE)  # the digest did not move
    assert data["config_sha256"] == plain.config_digest(as_before)
    m = Manifest.open(run, _cfg(run, "--stage_timeout_s=9"))
    assert m.data["identity_sha256"] == data["identity_sha256"]
    assert "trainer" in yaml.safe_load((run / "config.yaml").read_text())  # saved again under the new name
    (run / "config.yaml").write_text(yaml.safe_dump(as_before))
    other = "torch" if cfg.trainer != "torch" else "megatron"
    with pytest.raises(ConfigError) as e:
        Manifest.open(run, _cfg(run, f"--trainer={other}"))
    assert f"trainer: saved {cfg.trainer!r}, now {other!r}" in str(e.value) and "engine" not in str(e.value)
    (run / "config.yaml").unlink()  # without the YAML the digest still refuses it
    with pytest.raises(ConfigError, match="different config"):
        Manifest.open(run, _cfg(run, f"--trainer={other}"))
