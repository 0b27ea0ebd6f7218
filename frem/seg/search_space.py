"""What ``frem tune`` searches: one place for the code and for ``--help``."""

from frem.search import X_RANGE  # FREM's space is the library's (frem.search): one fact, one place

TUNABLE = ("frem", "frem-fixed", "supervision", "dropout")
LAMBDA_RANGE = (0.0, 1.0)
SEARCH_SPACE = ("frem, frem-fixed: B integer in [1, C] (C = bottleneck channels: 512 for "
                "tu-seresnet34 and resnet18), X log-uniform in [1, 10000]; supervision: lambda "
                "uniform in [0, 1]; dropout: B integer in [1, C] (rate B/C)")
