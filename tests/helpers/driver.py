"""Fixtures of the driver / task / evaluate tests: a very small synthetic run and a CLI launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
# pytest-xdist workers (or sessions testing side by side, PYTEST_XDIST_WORKER=gwN) each get their own block
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
PORTS = iter(range(29700 + 1000 * _WORKER, 29800 + 1000 * _WORKER))


def tiny_overrides(run_dir: str | Path, trainer: str = "torch", iterations: int = 2) -> list[str]:
    """tiny_cpu shrunk to seconds: 32 prompts per iteration in 2 rollout batches, 8-pair steps, 32 eval prompts."""
    return [f"--run_dir={run_dir}", f"--trainer={trainer}", f"--iterations={iterations}",
            "--task.prompts_per_iteration=32", "--task.eval_prompts=32", "--task.sft_examples=256",
            "--sft.epochs=1", "--sft.global_batch_size=32", "--sft.micro_batch_size=32", "--rollout_batch_size=16",
            "--train.global_batch_size=8", "--train.micro_batch_size=8", "--train.epochs=1", "--train.save_interval=1",
            f"--launch.master_port={next(PORTS)}"]


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_VERBOSITY": "error"})
    e.pop("MEGATRON_INPO_FAULT", None)
    if env:
        e.update(env)
    if e.get("MEGATRON_INPO_FAULT"):  # faults of a run: the listener (tests/helpers/faults.py), markers in its run_dir
        from tests.helpers.faults import env_for

        run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--run_dir="))
        e.update(env_for(e["MEGATRON_INPO_FAULT"], run_dir))
    return subprocess.run([PY, "-m", "megatron_inpo", *args], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=str(REPO))


def stage_processes_left() -> list[int]:
    """Processes of this test session (its token, tests/conftest.py SESSION_ENV, inherited by the runs it starts)
    that carry a stage token: stage subprocesses, the stage worker, their helpers. Sessions side by side, with or
    without xdist, do not see each other's."""
    from megatron_inpo.driver.launcher import STAGE_TOKEN_ENV, environments
    from tests.conftest import SESSION_ENV

    session, stage = f"{SESSION_ENV}={os.environ[SESSION_ENV]}".encode(), STAGE_TOKEN_ENV.encode() + b"="
    return [pid for pid, env in environments() if session in env and any(v.startswith(stage) for v in env)]


def tensors(hf_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out



def task_server():
    """A stateful fake SGLang server (tests/helpers/rollout.py) serving the synthetic task's vocabulary, so the
    driver's rollout stage can run on it and the in-process torch stages train on what it samples."""
    from megatron_inpo.task.vocab import EOS, SPECIAL, WORDS
    from tests.helpers.rollout import FakeSGLang

    specials = {WORDS.index(w) for w in SPECIAL}
    return FakeSGLang(vocab=len(WORDS), eos_id=WORDS.index(EOS), eos_prob=0.2,
                      decode=lambda ids: " ".join(WORDS[i] for i in ids if i not in specials))


def sglang_overrides(url: str) -> list[str]:
    """Rollout on SGLang at `url` with the servers' memory released around the training stages."""
    return ["--server_memory_saver=true", "--rollout.backend=sglang", f"--rollout.server_urls=[{url}]",
            "--rollout.max_retries=0"]
