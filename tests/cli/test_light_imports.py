"""`--print-config` and `--help` answer without importing torch (issue: pay the start-up once): the config tree,
the recipes and the loader are torch-free; torch, Megatron-Core and TE load only when a stage needs them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_inpo.driver.recipes import RECIPES

HEAVY = ("torch", "megatron", "transformer_engine", "transformers", "numpy")


def _modules_after(argv: list[str]) -> set[str]:
    code = ("import sys, contextlib, io\n"
            "from megatron_inpo.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = main({argv!r})\n"
            "assert rc == 0, rc\n"
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_print_config_imports_no_torch(recipe):
    loaded = _modules_after(["run", "--recipe", recipe, "--print-config"])
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("command", ["run", "train", "logprobs", "rollout", "evaluate"])
def test_print_config_of_every_command_imports_no_torch(command):
    argv = {"run": [], "train": ["--data", "d", "--init-checkpoint", "c", "--output-dir", "o"],
            "logprobs": ["--data", "d", "--output", "o", "--ref-checkpoint", "c"],
            "rollout": ["--prompts", "p", "--out", "o", "rollout.model_path=m", "judge.model_path=j"],
            "evaluate": ["--policy", "p", "--baseline", "b", "--prompts", "q"]}[command]
    loaded = _modules_after([command, *argv, "--print-config"])
    assert "torch" not in loaded and "megatron" not in loaded
