"""The package imports and runs its algorithm without Megatron-Core, and the CLI dispatches."""
import subprocess
import sys


def test_import_without_megatron():
    code = (
        "import sys\n"
        "sys.modules['megatron'] = None  # any import of megatron now raises ImportError\n"
        "sys.modules['transformer_engine'] = None\n"
        "import megatron_inpo, megatron_inpo.objectives, megatron_inpo.nash, megatron_inpo.cli\n"
        "import megatron_inpo.data.preferences, megatron_inpo.config, megatron_inpo.files\n"
        "assert megatron_inpo.nash.main(['--seed', '1']) == 0\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr


def test_cli_modules_import_without_torch():
    """The loader and every command module import torch / Megatron-Core only inside the command's body."""
    code = (
        "import sys\n"
        "for m in ('torch', 'megatron', 'transformer_engine', 'transformers', 'sglang'):\n"
        "    sys.modules[m] = None\n"
        "import megatron_inpo.cli, megatron_inpo.cli.loader\n"
        "from megatron_inpo.cli import COMMANDS\n"
        "import importlib\n"
        "for name, (mod, _) in COMMANDS.items():\n"
        "    if mod.startswith('megatron_inpo.cli.'):\n"
        "        importlib.import_module(mod)\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr


def test_cli_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "megatron_inpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "verify-nash" in out.stdout
    out = subprocess.run([sys.executable, "-m", "megatron_inpo", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr
