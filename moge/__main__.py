"""`python -m moge ...` runs the `moge` command line."""

import sys

from moge.cli import main

sys.exit(main())
