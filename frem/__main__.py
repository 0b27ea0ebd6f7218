"""``python -m frem`` (and ``torchrun ... -m frem train``)."""

import sys

from frem.cli import main

sys.exit(main())
