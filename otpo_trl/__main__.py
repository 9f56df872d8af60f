"""`python -m otpo_trl`: the `otpo-trl` command."""

import sys

from .cli.main import main


if __name__ == "__main__":
    sys.exit(main())
