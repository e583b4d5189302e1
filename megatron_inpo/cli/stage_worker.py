"""`megatron-inpo stage-worker --dir DIR` (hidden): the persistent stage worker of a run (driver/worker.py). The
driver starts it with the launch command of its Megatron stages; every rank runs the requests written to DIR."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-inpo stage-worker", description=__doc__)
    p.add_argument("--dir", required=True, help="the request directory (<run_dir>/worker)")
    args = p.parse_args(argv)
    from megatron_inpo.driver.worker import serve

    return serve(args.dir)


if __name__ == "__main__":
    sys.exit(main())
