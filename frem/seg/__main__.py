"""``python -m frem.seg`` (and ``torchrun ... -m frem.seg train``)."""

import sys

from frem.seg.cli import main

sys.exit(main())
