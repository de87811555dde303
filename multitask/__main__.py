import sys

from multitask.cli import main

sys.exit(main())
