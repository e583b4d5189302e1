"""TP=2 and PP=2 (torchrun, 2 gloo processes, one launch): Megatron logits == transformers within LOGITS_ATOL,
both for weights mapped in memory and for converter outputs (written at TP=2 x PP=2 and at TP=1) loaded with
dist_checkpointing's resharding; then checkpoints saved by the ranks (engine.checkpoint.save_to) export to HF
bit-exactly. A second launch runs TP=2 x PP=2 on 4 processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.model import LOGITS_ATOL, free_port, hf_model, tiny_config

pytestmark = pytest.mark.megatron

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = {"gqa_untied_rope": (2, 2), "gqa_tied": (1, 1), "mha_tied_rope": (2, 1)}  # converter target TP, PP


@pytest.mark.slow
def test_tp2_and_pp2_logits_match_transformers(tmp_path):
    _run(tmp_path, NAMES, 2, "2x1,1x2")
    for name in NAMES:
        for lay in ("2x1", "1x2"):
            _export_matches_source(tmp_path, name, f"{name}_saved_{lay}")


@pytest.mark.slow
def test_tp2_x_pp2_four_processes(tmp_path):
    names = {"gqa_headdim": (2, 2), "gqa_tied": (1, 1)}
    _run(tmp_path, names, 4, "2x2")
    _export_matches_source(tmp_path, "gqa_headdim", "gqa_headdim_saved_2x2")


def _run(tmp_path, NAMES, nproc, layouts):
    from megatron_inpo.convert.hf_to_mcore import convert_hf_to_mcore

    for name, (tp, pp) in NAMES.items():
        hf_model(tiny_config(name)).save_pretrained(tmp_path / "hf" / name)
        convert_hf_to_mcore(tmp_path / "hf" / name, tmp_path / "mc" / name, tp=tp, pp=pp, progress=False)
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MODEL_WORKER_LAYOUTS=layouts,
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "tests.helpers.model_worker", str(out), str(tmp_path / "hf"),
           str(tmp_path / "mc"), *NAMES]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == nproc * len(layouts.split(",")) * len(NAMES)
    for r in results:
        assert r["missing"] == [], r
        assert r["err_mapping"] < LOGITS_ATOL, r
        assert r["err_checkpoint"] < LOGITS_ATOL, r
    return tmp_path, results


def _export_matches_source(tmp_path, name, saved):
    """mcore-to-hf of a checkpoint written by the ranks (engine.checkpoint.save_to) == the HF source, bit-exact."""
    from safetensors.torch import load_file

    from megatron_inpo.convert.mcore_to_hf import convert_mcore_to_hf

    out = tmp_path / "export" / saved
    convert_mcore_to_hf(tmp_path / "mc" / saved, out, dtype="keep", progress=False)
    src = load_file(str(tmp_path / "hf" / name / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    if tiny_config(name)["tie_word_embeddings"]:
        src.pop("lm_head.weight", None)
    assert sorted(src) == sorted(got)
    for k in src:
        assert torch.equal(src[k], got[k]), (saved, k)
