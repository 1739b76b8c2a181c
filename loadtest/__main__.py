"""`python -m loadtest`: the same as `streamedit loadtest`."""

import sys

from loadtest.cli import main

sys.exit(main())
