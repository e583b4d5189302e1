"""`megatron-inpo convert hf-to-mcore|mcore-to-hf`: see the README section "Converting checkpoints".

The converter takes no config dataclass, so it keeps its own flags (--hf-dir, --mcore-dir, --tp, ...), which the
driver and the launch scripts pass; torch and Megatron-Core are imported only once a conversion starts.
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
    from megatron_inpo.cli.loader import hold_output

    output = args.mcore_dir if args.direction == "hf-to-mcore" else args.hf_dir
    with hold_output(output, "the output directory"):  # one convert per output: both would replace it
        return _convert_held(args)


def _convert_held(args: argparse.Namespace) -> int:
    from megatron_inpo.cli.loader import one_line
    from megatron_inpo.config import ConfigError
    from megatron_inpo.convert import ConvertError

    try:
        if args.direction == "hf-to-mcore":
            from megatron_inpo.convert.hf_to_mcore import convert_hf_to_mcore

            summary = convert_hf_to_mcore(args.hf_dir, args.mcore_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                          layer_spec=args.layer_spec, make_vocab_size_divisible_by=args.vocab_divisor,
                                          overwrite=args.overwrite, progress=not args.no_progress)
            mcore_dir, hf_dir, output = args.mcore_dir, args.hf_dir, args.mcore_dir
        else:
            from megatron_inpo.convert.mcore_to_hf import convert_mcore_to_hf

            summary = convert_mcore_to_hf(args.mcore_dir, args.hf_dir, dtype=args.dtype,
                                          max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                          progress=not args.no_progress)
            mcore_dir, hf_dir, output = args.mcore_dir, args.hf_dir, args.hf_dir
        if args.verify:  # a failed verify removes the output it checked
            from megatron_inpo.convert.verify import verify_output

            if args.no_progress:  # transformers' "Loading weights" bar too
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()

            summary.update(verify_output(mcore_dir, hf_dir, output))
    except (ConvertError, ConfigError, FileExistsError) as e:  # bad input: exit 2, as every command
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    finally:
        import os

        import torch.distributed as dist

        from megatron_inpo.driver.worker import WORKER_ENV

        # the persistent stage worker keeps its world for the next stage (driver/worker.py)
        if dist.is_available() and dist.is_initialized() and not os.environ.get(WORKER_ENV):
            dist.destroy_process_group()
    # verify's figures are small: 3 significant digits, not 3 decimals
    print(json.dumps({k: (float(f"{v:.3g}") if k.startswith("verify_") else round(v, 3)) if isinstance(v, float)
                      else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
