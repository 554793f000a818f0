import sys

from .cli import main

# `torchrun ... -m gtp_kernels -- collect --d 8192 ...`: the `--` keeps torchrun's own parser from
# reading our options (it takes `--d` for an abbreviation of its `--duplicate-...` options);
# Python versions whose argparse passes the `--` on leave it here.
if sys.argv[1:2] == ["--"]:
    del sys.argv[1]
sys.exit(main())
