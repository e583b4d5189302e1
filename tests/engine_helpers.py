"""Fixtures of the engine tests: a tiny Llama, the converter, preference pairs, a transformers reference, torchrun."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# pytest-xdist workers (the device check runs the GPU tests with -n) each get their own block of ports
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
PORTS = iter(range(29500 + 1000 * _WORKER, 29600 + 1000 * _WORKER))

TINY_HF = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    attention_bias=False, mlp_bias=False, torch_dtype="float32",
)


def tiny_hf_model(seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM (float32, sdpa) with the same weights on every rank for a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINY_HF, **overrides})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def convert_to_mcore(hf_dir: Path, mcore_dir: Path, tp: int = 1, pp: int = 1) -> None:
    """The converter (megatron_inpo.convert) in a subprocess: it opens a process group of its own."""
    code = ("import sys; from megatron_inpo.convert.hf_to_mcore import convert_hf_to_mcore; "
            "convert_hf_to_mcore(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]), pp=int(sys.argv[4]), progress=False)")
    env = {**os.environ, "MASTER_PORT": str(next(PORTS)), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([PY, "-c", code, str(hf_dir), str(mcore_dir), str(tp), str(pp)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def make_pairs(n: int, vocab: int = 100, seed: int = 0, with_logps: bool = True):
    """Random preference pairs (varied prompt / response lengths); frozen log-probs spread around -20."""
    from megatron_inpo.data.preferences import PreferencePair

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 7))]
        c = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 9))]
        r = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 9))]
        kw = {}
        if with_logps:
            kw = dict(ref_chosen_logp=-20 + rng.uniform(-3, 3), ref_rejected_logp=-20 + rng.uniform(-3, 3),
                      last_chosen_logp=-20 + rng.uniform(-3, 3), last_rejected_logp=-20 + rng.uniform(-3, 3))
        pairs.append(PreferencePair(prompt_id=f"p{i}", prompt="", prompt_ids=prompt, chosen="", rejected="",
                                    chosen_ids=c, rejected_ids=r, **kw))
    return pairs


def write_pairs(path: Path, pairs) -> Path:
    path.write_text("".join(p.to_json() + "\n" for p in pairs))
    return path


def hf_pair_logps(hf_model, pairs) -> list[tuple[float, float]]:
    """Reference: plain transformers forward, one unpadded sequence at a time, float64 sums of log-softmax."""
    out = []
    with torch.no_grad():
        for p in pairs:
            vals = []
            for resp in (p.chosen_ids, p.rejected_ids):
                ids = torch.tensor([p.prompt_ids + resp])
                logits = hf_model(input_ids=ids).logits[0].double()
                lsm = torch.log_softmax(logits, -1)
                P = len(p.prompt_ids)
                vals.append(float(sum(lsm[P - 1 + j, t] for j, t in enumerate(resp))))
            out.append(tuple(vals))
    return out


def write_sft_data(path: Path, pairs) -> Path:
    """SFT JSONL of the chosen responses of `pairs` (what `train --mode sft` reads)."""
    path.write_text("".join(json.dumps({"prompt_ids": p.prompt_ids, "response_ids": p.chosen_ids}) + "\n"
                            for p in pairs))
    return path


def sft_step_nll(hf_model, pairs, global_batch: int, seed: int) -> tuple[float, int]:
    """Reference for step 1 of `train --mode sft`: mean NLL (float64) of the chosen responses of the first global
    batch in the engine's data order, and its token count."""
    from megatron_inpo.engine.train import step_items

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in step_items(0, len(pairs), global_batch, seed=seed, shuffle=True):
            p = pairs[i]
            ids = torch.tensor([p.prompt_ids + p.chosen_ids])
            lsm = torch.log_softmax(hf_model(input_ids=ids).logits[0].double(), -1)
            P = len(p.prompt_ids)
            nll -= float(sum(lsm[P - 1 + j, t] for j, t in enumerate(p.chosen_ids)))
            n += len(p.chosen_ids)
    return nll / n, n


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every descendant (torchrun puts its workers in sessions of their own)."""
    import signal

    import psutil

    try:
        victims = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for v in reversed(victims):
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass


def torchrun(nproc: int, args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run torchrun; on timeout kill the launcher AND its workers (no orphans left holding ports and cores)."""
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(next(PORTS)),
           *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        raise AssertionError(f"torchrun {args[:3]} timed out after {timeout}s\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def read_results(path: Path) -> dict:
    return json.loads(path.read_text())
