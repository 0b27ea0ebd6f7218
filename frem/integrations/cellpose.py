"""FREM in Cellpose's ``train_seg``, a loop with no callback: re-drawn at every ``net.train()``.

    from cellpose import models, train
    import frem.integrations.cellpose

    model = models.CellposeModel(gpu=False, pretrained_model=False)       # Cellpose 3: model.net is CPnet
    frem.integrations.cellpose.attach(model.net, B=8, X=250)
    train.train_seg(model.net, train_data=images, train_labels=masks, n_epochs=100)

``train_seg`` takes the network and trains it with no epoch hook, but calls
``net.train()`` at the start of every epoch (and ``net.eval()`` around its
test passes): ``attach`` puts FREM on CPnet's bottleneck (the deepest level
of its ``downsample``, which its style vector and its decoder read) with
``redraw="train"``, so each epoch trains with a new draw. Cellpose 4 trains
Cellpose-SAM, a ViT with no decoder and no skip connections, where the
paper's premise does not apply: frem refuses ``"bottleneck"`` there and says
so. Needs nothing of Cellpose to import.
"""

from __future__ import annotations

import frem


def attach(net, B: int | float = 162, X: float = 632.0, *, layer="bottleneck", mode: str = "random",
           seed: int = 0, example_input=None) -> "frem.FREM":
    """``frem.attach`` for a Cellpose network trained by ``train_seg``: re-drawn at every ``net.train()``."""
    return frem.attach(net, layer, B, X, mode=mode, seed=seed, example_input=example_input, redraw="train")
