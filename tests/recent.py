"""Encoder-decoders frem was tried on as a new user would, written small for the corpus: the kinds that found
its last gaps (issue 35). Each keeps the structure around its bottleneck, not its widths.

A TransUNet whose CNN stem is a timm ``features_only`` net (its name rule must not claim the bottleneck: a
ViT goes on at that resolution); Cellpose's CPnet (its style vector is a pool whose kernel is the whole map);
TernausNet (its centre block nests modules that all take the bottleneck in); HarDNet-MSEG (receptive-field
blocks narrow the encoder's deepest map before a partial decoder); a MiT-like token stage whose last block
widens its tokens in an MLP; object queries beside the image's tokens.
"""

import torch
from torch import nn
from torch.nn import functional as F

from literature import cbr


class TimmTransUNet(nn.Module):
    """TransUNet: a timm ResNet (features_only) to 1/16, its last map cut into 1x1 patches, a ViT, folded back and
    narrowed by a conv for a decoder that takes the CNN's earlier features as skips."""

    def __init__(self, width=32, depth=2):
        super().__init__()
        import timm
        self.cnn = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1, out_indices=(1, 2, 3))
        c1, c2, c3 = self.cnn.feature_info.channels()
        self.embed = nn.Conv2d(c3, width, 1)  # 1x1 patches of the CNN's 1/16 map
        self.vit = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0,
                                                                    batch_first=True), depth)
        self.fold = cbr(width, c3)  # the decoder's "conv more", back to a map
        self.up3, self.dec3 = nn.Upsample(scale_factor=2), cbr(c3 + c2, c2)
        self.up2, self.dec2 = nn.Upsample(scale_factor=2), cbr(c2 + c1, c1)
        self.head = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(c1, 2, 1))

    def forward(self, x):
        f1, f2, f3 = self.cnn(x)
        tokens = self.embed(f3)
        n, c, h, w = tokens.shape
        mixed = self.vit(tokens.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
        d = self.dec3(torch.cat([self.up3(self.fold(mixed)), f2], 1))
        return self.head(self.dec2(torch.cat([self.up2(d), f1], 1)))


class CPnetLike(nn.Module):
    """Cellpose's CPnet: residual down blocks, a style vector (an average pool whose kernel is the deepest map's
    whole grid, flattened and normalised) added into every up block, skips summed."""

    def __init__(self, widths=(8, 16, 32)):
        super().__init__()
        self.downs = nn.ModuleList(cbr(c_in, c_out) for c_in, c_out in zip((1,) + widths[:-1], widths))
        self.style = nn.ModuleList(nn.Linear(widths[-1], c) for c in widths[::-1][1:])
        self.ups = nn.ModuleList(cbr(c_in, c_out) for c_in, c_out in zip(widths[::-1], widths[::-1][1:]))
        self.head = nn.Conv2d(widths[0], 3, 1)

    def forward(self, x):
        skips = []
        for i, down in enumerate(self.downs):
            x = down(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        style = F.avg_pool2d(x, kernel_size=x.shape[2:]).flatten(1)
        style = style / (style ** 2).sum(1, keepdim=True).sqrt()
        for up, project, skip in zip(self.ups, self.style, skips[::-1][1:]):
            x = up(F.interpolate(x, scale_factor=2)) + skip + project(style)[:, :, None, None]
        return self.head(x)


class TernausCenter(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.block = nn.Sequential(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()),
                                   nn.ConvTranspose2d(c_out, c_out // 2, 2, stride=2), nn.ReLU())

    def forward(self, x):
        return self.block(x)


class TernausNet(nn.Module):
    """TernausNet: a VGG-like encoder; its deepest map is pooled in the forward (no module hands the pooled map
    over) and taken in by the centre block, whose nested modules all see it first."""

    def __init__(self, w=8):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = cbr(1, w), cbr(w, 2 * w), cbr(2 * w, 4 * w)
        self.center = TernausCenter(4 * w, 8 * w)
        self.dec3 = cbr(4 * w + 4 * w, 2 * w)
        self.dec2 = cbr(2 * w + 2 * w, w)
        self.dec1 = cbr(w + w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        c1 = self.conv1(x)
        c2 = self.conv2(F.max_pool2d(c1, 2))
        c3 = self.conv3(F.max_pool2d(c2, 2))
        center = self.center(F.max_pool2d(c3, 2))
        d3 = self.dec3(torch.cat([center, c3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2), c2], 1))
        return self.head(self.dec1(torch.cat([F.interpolate(d2, scale_factor=2), c1], 1)))


class ReceptiveField(nn.Module):
    """PraNet's / HarDNet-MSEG's RFB: four branches of growing dilation over one map, concatenated, fused to a
    narrow width, plus a shortcut: context over the encoder's map, narrowed for a partial decoder."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.branches = nn.ModuleList([cbr(c_in, c_out, k=1)] + [nn.Sequential(cbr(c_in, c_out, k=1),
                                                                               cbr(c_out, c_out, dilation=d))
                                                                 for d in (3, 5, 7)])
        self.fuse = cbr(4 * c_out, c_out)
        self.shortcut = cbr(c_in, c_out, k=1)

    def forward(self, x):
        return F.relu(self.fuse(torch.cat([b(x) for b in self.branches], 1)) + self.shortcut(x))


class HarDNetMSEG(nn.Module):
    """HarDNet-MSEG: an encoder to 1/32, RFBs narrowing its three deepest maps, a partial decoder aggregating
    them from the deepest up (no skip from the shallow levels)."""

    def __init__(self, w=8, narrow=8):
        super().__init__()
        self.stem = cbr(1, w, stride=2)
        self.stages = nn.ModuleList(cbr(c_in, c_out, stride=2) for c_in, c_out in ((w, 2 * w), (2 * w, 4 * w),
                                                                                    (4 * w, 8 * w), (8 * w, 16 * w)))
        self.rfb = nn.ModuleList(ReceptiveField(c, narrow) for c in (4 * w, 8 * w, 16 * w))
        self.agg = nn.ModuleList(cbr(narrow * k, narrow) for k in (2, 2))
        self.head = nn.Conv2d(narrow, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        features = []
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        x3, x4, x5 = (rfb(f) for rfb, f in zip(self.rfb, features[1:]))
        d = self.agg[0](torch.cat([F.interpolate(x5, scale_factor=2), x4], 1))
        d = self.agg[1](torch.cat([F.interpolate(d, scale_factor=2), x3], 1))
        return F.interpolate(self.head(d), scale_factor=8)


class MixBlock(nn.Module):
    """A MiT (SegFormer) block on tokens: attention, then an MLP that widens the tokens 4x around a depth-wise
    conv on their grid, each with a residual."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attention = nn.MultiheadAttention(c, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.dwconv = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c)

    def forward(self, x, grid):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        wide = self.fc1(self.norm2(x))  # (N, L, 4C): 4C may be the size of a finer grid
        n, length, c = wide.shape
        wide = self.dwconv(wide.transpose(1, 2).reshape(n, c, *grid)).flatten(2).transpose(1, 2)
        return x + self.fc2(F.gelu(wide))


class TokenStageNet(nn.Module):
    """A conv encoder to 1/4, a token stage (patch embedding to 1/8, two MiT blocks), its tokens folded back into
    a map for an upsampling decoder with a skip from the conv encoder."""

    def __init__(self, w=8, c=16):
        super().__init__()
        self.stem = nn.Sequential(cbr(1, w, stride=2), cbr(w, w, stride=2))
        self.embed = nn.Conv2d(w, c, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(MixBlock(c) for _ in range(2))
        self.norm = nn.LayerNorm(c)
        self.up = nn.ConvTranspose2d(c, w, 2, stride=2)
        self.dec = cbr(2 * w, w)
        self.head = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(w, 2, 1))

    def forward(self, x):
        skip = self.stem(x)
        m = self.embed(skip)
        n, c, h, w = m.shape
        tokens = m.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, (h, w))
        deep = self.norm(tokens).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.dec(torch.cat([self.up(deep), skip], 1)))


class PoolReadTwice(nn.Module):
    """The deepest map made by a pool in the forward (no module hands it over) of an encoder map that is also the
    decoder's skip: FREM cannot act on the pooled map, and its source is no stand-in (scaling it would scale
    the skip too)."""

    def __init__(self, w=8):
        super().__init__()
        self.enc1, self.enc2 = cbr(1, w), cbr(w, 2 * w)
        self.dec = cbr(4 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        deep = F.interpolate(F.max_pool2d(e2, 2), scale_factor=2)  # pooled and brought back up by code
        return self.head(F.interpolate(self.dec(torch.cat([deep, e2], 1)), scale_factor=2))
