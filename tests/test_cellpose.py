"""FREM in Cellpose's own training loop (train.train_seg, which has no callback): Cellpose 3's CPnet re-drawn at
every net.train(); Cellpose 4's Cellpose-SAM refused by name, with the reason.

Cellpose 3 and 4 cannot share an environment (both are the package "cellpose"; 3 pins numpy < 2.1). CI runs
this file twice: in its main environment with Cellpose 4 (the cellpose extra), and in a small side venv with
Cellpose 3 (`.ci/run`, FREM_CELLPOSE=3: its test must run there); each test skips, with what it needs, where
the other version is installed.
"""

import os

import numpy as np
import pytest
import torch

import frem
import frem.integrations.cellpose
from frem.bottleneck import BottleneckNotFound, choose, survey

if os.environ.get("CI"):
    import cellpose  # noqa: F401  (CI installs the cellpose extra: run, never skip)
else:
    pytest.importorskip("cellpose", reason='needs Cellpose: pip install -e ".[cellpose]" (Cellpose 4), '
                                           'or pip install "cellpose>=3,<4" (Cellpose 3)')
from cellpose import version as cellpose_version  # noqa: E402

MAJOR = int(str(getattr(cellpose_version, "version", cellpose_version)).split(".")[0])


def needs(major):
    if MAJOR != major:
        reason = (f"needs Cellpose {major} (here {MAJOR}): "
                  + ('pip install "cellpose>=3,<4"' if major == 3 else 'pip install -e ".[cellpose]"'))
        if os.environ.get("FREM_CELLPOSE") == str(major):  # .ci/run's side venv for this version
            pytest.fail(f"CI must run the Cellpose {major} tests: {reason}")
        pytest.skip(reason)


def blobs(n=4, size=64, seed=0):
    """Images with a few bright squares each, and their instance labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        image, label = rng.random((size, size)).astype("float32"), np.zeros((size, size), "uint16")
        for k in range(1, 7):
            r, c = rng.integers(8, size - 8, 2)
            label[r - 4:r + 4, c - 4:c + 4] = k
            image[r - 4:r + 4, c - 4:c + 4] += 1
        images.append(image)
        labels.append(label)
    return images, labels


def test_cellpose3_train_seg_redraws_each_epoch_with_frem_acting(tmp_path):
    needs(3)
    from cellpose import resnet_torch, train
    torch.manual_seed(0)
    net = resnet_torch.CPnet(nbase=[2, 8, 16, 24, 32], nout=3, sz=3)
    x = torch.randn(2, 2, 64, 64)
    handle = frem.integrations.cellpose.attach(net, B=4, X=50.0, example_input=x)
    # known by name: the deepest level of downsample, which both the style vector and the decoder read
    assert (handle.layer, handle.num_channels, handle.redraw) == ("downsample", 32, "train")
    assert choose(survey(net, x)).site.describe() == "downsample output[3]"  # measured alone: the same
    drawn, resample = [], handle.resample

    def spy(epoch):
        result = resample(epoch)
        drawn.append((epoch, handle.channels.tolist()))
        return result
    handle.resample = spy
    images, labels = blobs()
    (tmp_path / "models").mkdir()
    train.train_seg(net, train_data=images, train_labels=labels, channels=[0, 0], n_epochs=3, batch_size=2,
                    bsize=64, min_train_masks=1, save_path=tmp_path, rescale=False)
    assert drawn == [(e, frem.select_channels(32, 4, 0, e).tolist()) for e in range(3)]
    row = frem.status(net)[0]
    assert (row.epoch, row.calls, row.reaches) == (2, 2, "yes")


def test_cellpose4_sam_is_refused_by_name_with_the_reason(monkeypatch):
    needs(4)
    from cellpose import vit
    from segment_anything.modeling import ImageEncoderViT

    class TinySam:  # Cellpose-SAM's encoder is SAM's ViT-L: the same class, built tiny (random init)
        def __init__(self, _checkpoint):
            self.image_encoder = ImageEncoderViT(img_size=1024, patch_size=16, in_chans=3, embed_dim=32, depth=2,
                                                 num_heads=2, out_chans=16, window_size=0, global_attn_indexes=())
    monkeypatch.setitem(vit.sam_model_registry, "vit_l", TinySam)
    net = vit.CPSAM(ps=8, nout=3, bsize=64)
    x = torch.randn(2, 3, 64, 64)
    assert net.eval()(x)[0].shape == (2, 3, 64, 64)
    with pytest.raises(BottleneckNotFound,
                       match=r"^CPSAM has no bottleneck for FREM: Cellpose-SAM .* no decoder and no skip connections, "
                             r"so the paper's premise .* does not apply"):
        frem.integrations.cellpose.attach(net, B=4, X=50.0, example_input=x)
    assert not frem.attached(net)
    # a layer named by the user is the user's choice
    assert frem.attach(net, "encoder.neck", B=4, X=50.0, example_input=x).num_channels == 16
