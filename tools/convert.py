#!/usr/bin/env python
"""Thin wrapper: `python tools/convert.py hf-to-mcore|mcore-to-hf ...` == `megatron-inpo convert ...`."""
import sys

from megatron_inpo.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
