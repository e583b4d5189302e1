import sys

from megatron_inpo.cli import main

sys.exit(main())
