"""`python -m jobrunner ...`: the same as the `jobrunner` console script."""
import sys

from .cli import main

sys.exit(main())
