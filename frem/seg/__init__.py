"""The cell-segmentation application built on the frem library.

The paper's experiments as commands (``frem train / tune / reproduce /
evaluate / predict``): data sets, the six model variants, the trainer, the
TPE search, tables and figures. Needs ``pip install "frem[seg]"``; the
library in ``frem`` itself never imports this package.
"""
