"""Fixtures of the engine tests: a tiny Llama, the converter, preference pairs, a transformers reference, torchrun."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
# pytest-xdist workers (the device check runs the GPU tests with -n) each get their own block of ports
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
PORTS = iter(range(29500 + 1000 * _WORKER, 29600 + 1000 * _WORKER))

# Tolerances of the engine's parity checks (tests/helpers/engine_worker.py), per precision. Each bf16 run is compared
# with the single-process bf16 reference (the same bf16 weights, plain autograd over the whole batch), except the
# log-probs, compared with transformers in fp32 / float64. bf16 has 8 mantissa bits: each rounding is off by up to
# 2^-9 relative (2^-8 = 3.9e-3 between neighbours); a TP / PP / DP split sums partial results (attention and MLP
# outputs, micro-batch gradients) in another order and rounds them at other points, which moves a result by a few
# bf16 ulps. "measured" is the largest error over all layouts on CPU (torch 2.13, megatron-core 0.16.1, 2026-12-01);
# each tolerance leaves a margin of 2.5-8x over it and stays far below what a real error gives (a wrong weight
# mapping or a missed gradient reduction is off by 10-100%, a token's log-prob by whole nats).
PARITY_TOL = {
    "fp32": {"loss": 1e-5, "metric h_mean": 1e-4, "metric h_std": 1e-4, "metric accuracy": 1e-4,
             "metric margin": 1e-4, "grad": 2e-5, "logps": 2e-4, "optimizer": 1e-6, "logits": 1e-5},
    "bf16": {
        # relative; INPO loss ~1.1e4 (measured 2.5e-5) and SFT mean NLL ~4.6 (4.6e-5): the log-softmax runs in
        # fp32 on bf16 logits, so the per-token log-prob error (~1e-3 abs) enters, averaged over the batch
        "loss": 2e-4,
        # absolute, |h| and margin ~4 (measured 1.5e-3: sums of ~1e-3 log-prob errors); accuracy counts signs of
        # margins far from 0 at this seed (measured 0)
        "metric h_mean": 1e-2, "metric h_std": 1e-2, "metric margin": 1e-2, "metric accuracy": 1e-4,
        # relative to the largest entry of each gradient (measured 2.0e-2): the reference rounds every op of the
        # backward to bf16 (2^-9 each, compounding over 4 layers), the schedule accumulates micro-batches in fp32
        "grad": 5e-2,
        # absolute, sums of up to 9 response tokens, |logp| up to 41 (measured 3.7e-3): bf16-rounded weights and
        # activations vs transformers in fp32
        "logps": 2e-2,
        # distributed vs plain optimizer at DP=2 (measured 0): a two-rank sum is the same in either order and both
        # run the same AdamW on the same fp32 masters, so the bf16 weights agree bit for bit
        "optimizer": 0.0,
        # absolute, |logit| <= 0.41, where a bf16 ulp is 2^-9 = 2.0e-3 (measured 2.9e-3, 1.5 ulps): 5 ulps
        "logits": 1e-2,
    },
}

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
    """SFT JSONL of the chosen responses of `pairs` (what `train --loss sft` reads)."""
    path.write_text("".join(json.dumps({"prompt_ids": p.prompt_ids, "response_ids": p.chosen_ids}) + "\n"
                            for p in pairs))
    return path


def sft_step_nll(hf_model, pairs, global_batch: int, seed: int) -> tuple[float, int]:
    """Reference for step 1 of `train --loss sft`: mean NLL (float64) of the chosen responses of the first global
    batch in the engine's data order, and its token count."""
    from megatron_inpo.engine.batches import step_items

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


def kill_training_at(args: list[str], out_dir: Path, step: int, timeout_s: float = 240) -> None:
    """Start `megatron-inpo train ARGS` under torchrun (2 ranks), SIGKILL the launcher and its workers once the
    step checkpoint `step` of `out_dir` is complete (no clean-up code runs anywhere) and wait until every worker
    is gone; fails if the training ended first (the kill test would be vacuous)."""
    import psutil

    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(next(PORTS)), *args]
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while not (out_dir / "checkpoints" / f"step_{step:08d}").exists():
            assert p.poll() is None and time.time() < deadline, "training ended before it could be killed"
            time.sleep(0.05)
    finally:
        workers = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        kill_tree(p.pid)
        p.wait()
        for pid in workers:
            while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.05)
    assert not (out_dir / "train_result.json").exists(), "run finished before the kill: test is vacuous"


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


def torchrun(nproc: int, args: list[str], timeout: int = 300, env: dict | None = None,
             cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run torchrun (in `cwd`); on timeout kill the launcher AND its workers (no orphans left holding ports and
    cores)."""
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(next(PORTS)),
           *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        raise AssertionError(f"torchrun {args[:3]} timed out after {timeout}s\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def read_results(path: Path) -> dict:
    return json.loads(path.read_text())


def checkpoint_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint in the TP=1 / PP=1 layout (layers stacked), read straight from the
    dist-checkpoint files without a process group; optimizer state and RNG are left out."""
    from megatron_inpo.convert.mcore_to_hf import CheckpointReader

    layers = json.loads((Path(ckpt_dir) / "megatron_inpo.json").read_text())["hf_config"]["num_hidden_layers"]
    reader = CheckpointReader(Path(ckpt_dir), layers)
    return {k: reader.read(k, tuple(md.size)) for k, md in reader.meta.items()
            if not k.startswith(("optimizer.", "rng"))}


def lr0_stage_args(data: Path, init_ckpt: Path, out: Path, *extra: str) -> list[str]:
    """`megatron-inpo train` arguments for one bf16 step of size exactly 0 from `init_ckpt`: the first step of a
    warm-up from 0 has lr 0 (Megatron's OptimizerParamScheduler, init_lr 0), weight decay is 0, so AdamW adds
    exactly 0 to every master weight; the step is saved (step_00000001) and the run stops."""
    return ["train", "--data", str(data), "--init-checkpoint", str(init_ckpt), "--output-dir", str(out),
            "--megatron.model.precision", "bf16", "--train.global-batch-size", "4", "--train.micro-batch-size", "1", "--train.train-iters", "2",
            "--train.warmup-ratio", "0.5", "--train.lr", "1e-3", "--train.weight-decay", "0", "--train.save-interval", "1",
            "--train.stop-after-steps", "1", "--progress", "false", *extra]


def lr0_step_weight_changes(init_ckpt: Path, out: Path) -> dict[str, float]:
    """Per tensor, max |saved - loaded| after the lr-0 step of `lr0_stage_args` (loaded: the init checkpoint's
    weights rounded to bf16, as loading them into the bf16 model does). Asserts the run was a real step."""
    step1 = json.loads((Path(out) / "tensorboard" / "metrics.jsonl").read_text().splitlines()[0])
    assert step1["step"] == 1 and step1["lr"] == 0.0 and step1["grad_norm"] > 0  # a real step, of size 0
    loaded = {k: v.to(torch.bfloat16) for k, v in checkpoint_weights(init_ckpt).items()}
    saved = checkpoint_weights(Path(out) / "checkpoints" / "step_00000001")
    assert saved.keys() == loaded.keys()
    assert all(v.dtype == torch.bfloat16 for v in saved.values()), "not a bf16 run: the check would be vacuous"
    return {k: (saved[k].float() - loaded[k].float()).abs().max().item() for k in loaded}
