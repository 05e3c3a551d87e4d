import sys

from micropod.runtime.cli import main

sys.exit(main())
