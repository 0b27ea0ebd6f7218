"""``python -m frem``: the ``frem`` command (``torchrun ... -m frem train`` too).

Run as a program only; ``import frem`` never executes this file, so the
library stays free of the application's dependencies.
"""

import sys

from frem.seg.cli import main

sys.exit(main())
