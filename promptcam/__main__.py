"""``python -m promptcam``: the ``promptcam`` command (promptcam.cli)."""

import sys

from promptcam.cli import main

if __name__ == "__main__":
    sys.exit(main())
