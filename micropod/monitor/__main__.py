"""``python -m micropod.monitor --root ROOT VM_ID [--attach-fd N]``, as micropod.service.containers.start spawns it."""

from __future__ import annotations

import sys

from micropod.monitor.main import main

if __name__ == "__main__":
    sys.exit(main())
