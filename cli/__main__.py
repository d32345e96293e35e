"""`python -m cli ...`: the `minitron` console script without the installed entry point (child processes, tests)."""

import sys

from cli.main import main

sys.exit(main())
