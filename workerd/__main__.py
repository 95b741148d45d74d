"""``python -m plait.workerd``: the worker daemon's entry point."""

from __future__ import annotations

import sys

from plait.workerd.main import main

if __name__ == "__main__":
    sys.exit(main())
