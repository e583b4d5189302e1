"""tools/device_check.sh fits one device call (600 s at most): its steps' timeouts add up to under 540 s and each is
printed; on a machine where Transformer Engine is installed but does not import (as on the lent image), one line
says so, the FP8 bench is skipped and the bf16 steps run with TE hidden behind a clean ImportError (megatron-core
guards its TE imports with `except ImportError` only, so a TE that raises OSError would fail every import of
megatron.core). Run here with a stand-in interpreter: the real one for the script's own Python snippets, a
recorder for the benchmark and pytest steps."""
import os
import re
import stat
import subprocess
import sys

from tests.helpers.rollout import REPO

SCRIPT = REPO / "tools" / "device_check.sh"


def test_step_timeouts_fit_one_device_call():
    src = SCRIPT.read_text()
    limits = dict(re.findall(r"\b(T_[A-Z0-9_]+)=(\d+)", src))
    assert sum(int(v) for v in limits.values()) < 540
    # every `timeout` in the script uses one of those limits (none hard-coded, none outside the sum)
    used = re.findall(r'timeout "\$(\w+)"', src)
    assert used and set(used) <= set(limits) | {"limit"} and not re.findall(r"\btimeout \d", src)
    assert src.count('step "') == 4 and 'timeout "$limit" "$@"' in src


def test_without_transformer_engine_it_says_so_once_and_runs_the_bf16_steps(tmp_path):
    broken = tmp_path / "site" / "transformer_engine"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise OSError("libcudnn_graph.so.9: cannot open shared object file: No such file or directory")\n')
    calls = tmp_path / "calls.txt"
    py = tmp_path / "python"
    py.write_text(f"""#!/bin/sh
echo "$PYTHONPATH | $*" >> {calls}
case "$1" in
  -) exec {sys.executable} - ;;
  -c) case "$2" in *cuda.is_available*) exit 0 ;; *) exit 1 ;; esac ;;
  -m) echo "1 passed" ;;
  *) echo '{{"impl": "engine"}}' ;;
esac
""")
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(py), "OUT": str(out_dir), "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = (out_dir / "steps.log").read_text().splitlines()
    te = [line for line in steps if "Transformer Engine" in line and "timeout" not in line]
    assert len(te) == 1 and "does not import (OSError: libcudnn_graph.so.9" in te[0], steps
    assert not [line for line in steps if "FAILED" in line], steps
    assert "under 540 s" in steps[0]
    for name in ("environment", "bench bf16", "pytest bf16 load", "pytest -m gpu"):
        assert any(line.split(" ", 2)[2].startswith(name) and re.search(r"\(timeout \d+ s\)", line)
                   for line in steps), name
    assert not any("fp8" in line for line in steps[1:])  # no FP8 bench
    ran = [line for line in calls.read_text().splitlines() if " | -m pytest" in line or "bench_train.py" in line]
    assert len(ran) == 3 and not any("--fp8" in line for line in ran)
    # the bf16 steps see TE as a clean ImportError, ahead of the broken install
    assert all(line.startswith("/tmp/device_check_no_te:") for line in ran)
    assert "not importable: OSError" in (out_dir / "env.json").read_text()
