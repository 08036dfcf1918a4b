"""``python -m gradguard``: the same as the ``gradguard`` command."""

import sys

from gradguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
