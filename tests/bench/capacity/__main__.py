"""``python -m tests.bench.capacity``: the capacity runner (``tests.bench.capacity.runner``)."""

import sys

from tests.bench.capacity.runner import main

sys.exit(main())
