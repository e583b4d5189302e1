"""`megatron-inpo convert hf-to-mcore|mcore-to-hf`: see the README section "Converting checkpoints".

The converter keeps its own flags (--hf-dir, --mcore-dir, --tp, ...), which the launch scripts pass; they become a
convert.stage.ConvertStageConfig, the typed call the driver's import / export stages make too. torch and
Megatron-Core are imported only once a conversion starts.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    from megatron_inpo.cli.loader import add_no_verify

    p = argparse.ArgumentParser(prog="megatron-inpo convert",
                                description="Convert Llama-family checkpoints between Hugging Face and Megatron-Core.")
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> Megatron-Core dist-checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--mcore-dir", required=True, help="output checkpoint directory (written atomically)")
    a.add_argument("--tp", type=int, default=1, help="target tensor parallel size (sets the vocab padding)")
    a.add_argument("--pp", type=int, default=1, help="target pipeline parallel size (checked against the layers)")
    a.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="parameter dtype in the checkpoint (default: keep the HF dtype)")
    a.add_argument("--layer-spec", default="local", choices=["local", "te"],
                   help="layer spec recorded for the engine (checkpoint keys are the same for both)")
    a.add_argument("--vocab-divisor", type=int, default=128, help="pad the vocab to a multiple of this x TP")
    b = sub.add_parser("mcore-to-hf", help="Megatron-Core dist-checkpoint (any TP/PP) -> HF safetensors directory")
    b.add_argument("--mcore-dir", required=True, help="checkpoint directory (converter output or training step)")
    b.add_argument("--hf-dir", required=True, help="output HF directory (written atomically)")
    b.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "keep"], help="output dtype")
    b.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit, e.g. 5GB, 500MB")
    for x in (a, b):
        x.add_argument("--verify", action="store_true",
                       help="afterwards compare logits of both checkpoints on random ids and, when the tokenizer "
                            "has a chat template, on a few fixed conversations; tolerance 2^-13 x the largest "
                            "|logit| on the same weights (convert/verify.py); a failure removes the output. Loads "
                            "the full model: small models")
        x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        x.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_no_verify(x)
    return p


PROG = "megatron-inpo convert"


def main(argv: list[str] | None = None) -> int:
    from megatron_inpo.cli.loader import apply_no_verify, guard

    args = build_parser().parse_args(argv)
    apply_no_verify(args)
    # a full disk, a read-only output directory, Ctrl-C, a broken checkpoint: loader.guard's one-line message
    return guard(PROG, lambda: _convert(args))


def _convert(args: argparse.Namespace) -> int:
    from megatron_inpo.cli.loader import hold_output, one_line
    from megatron_inpo.config import ConfigError
    from megatron_inpo.convert import ConvertError
    from megatron_inpo.convert.stage import ConvertStageConfig
    from megatron_inpo.engine.entry import run_stage

    common = dict(direction=args.direction, hf_dir=args.hf_dir, mcore_dir=args.mcore_dir, dtype=args.dtype,
                  overwrite=args.overwrite, verify=args.verify, progress=not args.no_progress)
    cfg = ConvertStageConfig(**common, **({"tp": args.tp, "pp": args.pp, "layer_spec": args.layer_spec,
                                           "vocab_divisor": args.vocab_divisor} if args.direction == "hf-to-mcore"
                                          else {"max_shard_size": args.max_shard_size}))
    with hold_output(cfg.output, "the output directory"):  # one convert per output: both would replace it
        try:
            summary = run_stage("convert", cfg)
        except (ConvertError, ConfigError, FileExistsError) as e:  # bad input: exit 2, as every command
            print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
            return 2
    # verify's figures are small: 3 significant digits, not 3 decimals
    print(json.dumps({k: (float(f"{v:.3g}") if k.startswith("verify_") else round(v, 3)) if isinstance(v, float)
                      else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
