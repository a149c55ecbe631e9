"""``python -m xlx_fast.cli`` is ``xlx-fast``."""
import sys

from . import main

sys.exit(main())
