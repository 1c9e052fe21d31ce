"""`python -m ingestd`: the same as the `ingestd` command."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
