"""`python -m multitask` and `torchrun ... -m multitask`; guarded, so processes that re-import the main module
(multiprocessing's spawn) do not run the command again."""

import sys

from multitask.cli import main

if __name__ == "__main__":
    sys.exit(main())
