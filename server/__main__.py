"""`python -m server`: the same as `streamedit serve`."""

import sys

from server.cli import serve

sys.exit(serve())
