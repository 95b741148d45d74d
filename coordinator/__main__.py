"""``python -m plait.coordinator``."""

import sys

from plait.coordinator.main import main

sys.exit(main())
