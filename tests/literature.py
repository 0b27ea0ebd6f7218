"""Encoder-decoders from the segmentation literature of the last years, written small, for the corpus.

Each keeps the structure its paper gives the bottleneck's neighbourhood (what
the encoder does last, what the decoder does first, what hangs beside it),
not its widths: ResUNet++'s attention step at the bridge's own grid, CE-Net's
pyramid of fixed-kernel pools, SegNet's pool indices, UNet 3+'s full-scale
skips, UNeXt's tokenised MLP, MultiResUNet's blocks and res paths, 2-D and
3-D. Where no library ships a network, the corpus has it from here; with three the rule was
tried on as a new user would (a class token, HRNet-like streams, a 3-D attention gate).
"""

import torch
from torch import nn
from torch.nn import functional as F

LAYERS = {2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
          3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d)}


def cbr(c_in, c_out, dims=2, k=3, stride=1, dilation=1):
    conv, norm, _, _ = LAYERS[dims]
    return nn.Sequential(conv(c_in, c_out, k, stride=stride, padding=dilation * (k // 2), dilation=dilation),
                         norm(c_out), nn.ReLU(inplace=True))


class SqueezeExcite(nn.Module):
    def __init__(self, c, dims=2):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, max(c // 4, 1)), nn.ReLU(), nn.Linear(max(c // 4, 1), c), nn.Sigmoid())
        self.dims = dims

    def forward(self, x):
        w = self.fc(x.flatten(2).mean(-1))
        return x * w.view(*w.shape, *(1,) * self.dims)


class ResidualUnit(nn.Module):
    """ResUNet's pre-activation residual unit (BN-ReLU-conv twice, a projected shortcut), optionally strided."""

    def __init__(self, c_in, c_out, stride=1, dims=2):
        super().__init__()
        conv, norm, _, _ = LAYERS[dims]
        self.body = nn.Sequential(norm(c_in), nn.ReLU(), conv(c_in, c_out, 3, stride=stride, padding=1),
                                  norm(c_out), nn.ReLU(), conv(c_out, c_out, 3, padding=1))
        self.shortcut = nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1), norm(c_out))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as ResUNet++ has it: dilated branches summed, then a 1x1."""

    def __init__(self, c_in, c_out, dims=2, rates=(1, 2, 3)):
        super().__init__()
        self.branches = nn.ModuleList(cbr(c_in, c_out, dims, dilation=r) for r in rates)
        self.project = LAYERS[dims][0](c_out, c_out, 1)

    def forward(self, x):
        return self.project(sum(branch(x) for branch in self.branches))


class ResUNetAttention(nn.Module):
    """ResUNet++'s attention step: the finer skip is pooled down to the decoder map's grid, both are
    projected and summed, and the result weighs the decoder map (same shape: no broadcast, not a gate)."""

    def __init__(self, c_skip, c_x, dims=2):
        super().__init__()
        conv, norm, pool, _ = LAYERS[dims]
        self.skip = nn.Sequential(norm(c_skip), nn.ReLU(), conv(c_skip, c_x, 3, padding=1), pool(2))
        self.x = nn.Sequential(norm(c_x), nn.ReLU(), conv(c_x, c_x, 3, padding=1))
        self.attend = nn.Sequential(norm(c_x), nn.ReLU(), conv(c_x, c_x, 1))

    def forward(self, skip, x):
        return self.attend(self.skip(skip) + self.x(x)) * x


class ResUNetPlusPlus(nn.Module):
    """Jha et al. 2019: residual units with squeeze-excitation down, an ASPP bridge, and a decoder whose
    every step starts at the coarser grid (attention with the pooled skip), then upsamples and merges."""

    def __init__(self, w=4, dims=2):
        super().__init__()
        conv, _, _, _ = LAYERS[dims]
        widths = [w, 2 * w, 4 * w, 8 * w]
        self.stem = nn.Sequential(cbr(1, w, dims), conv(w, w, 3, padding=1))
        self.downs = nn.ModuleList(nn.Sequential(SqueezeExcite(widths[i], dims),
                                                 ResidualUnit(widths[i], widths[i + 1], 2, dims))
                                   for i in range(3))
        self.bridge = ASPP(widths[3], 2 * widths[3], dims)
        self.attention = nn.ModuleList(ResUNetAttention(widths[i], 2 * widths[i + 1] if i == 2 else widths[i + 1],
                                                        dims) for i in reversed(range(3)))
        self.ups = nn.ModuleList(ResidualUnit((2 * widths[i + 1] if i == 2 else widths[i + 1]) + widths[i],
                                              widths[i], 1, dims) for i in reversed(range(3)))
        self.out = nn.Sequential(ASPP(w, w, dims), conv(w, 2, 1))

    def forward(self, x):
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        d = self.bridge(skips[-1])
        for attention, up, skip in zip(self.attention, self.ups, reversed(skips[:-1])):
            d = attention(skip, d)
            d = up(torch.cat([F.interpolate(d, scale_factor=2.0), skip], 1))
        return self.out(d)


class DenseAtrous(nn.Module):
    """CE-Net's DAC block: cascaded dilated branches at the bottleneck's grid, summed with it."""

    def __init__(self, c):
        super().__init__()
        self.d1 = nn.Conv2d(c, c, 3, padding=1)
        self.d2 = nn.Conv2d(c, c, 3, padding=3, dilation=3)
        self.d3 = nn.Conv2d(c, c, 3, padding=5, dilation=5)
        self.one = nn.Conv2d(c, c, 1)

    def forward(self, x):
        a = F.relu(self.d1(x))
        b = F.relu(self.one(self.d2(x)))
        c = F.relu(self.one(self.d2(self.d1(x))))
        d = F.relu(self.one(self.d3(self.d2(self.d1(x)))))
        return x + a + b + c + d


class ResidualMultiKernelPooling(nn.Module):
    """CE-Net's RMP block: max-pools with fixed kernels 2, 3, 5, 6 (at 6x6 down to 3x3, 2x2 and 1x1), each
    narrowed to one channel by a 1x1, upsampled back and concatenated beside the map they came from."""

    def __init__(self, c):
        super().__init__()
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=k) for k in (2, 3, 5, 6))
        self.narrow = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        size = x.shape[2:]
        levels = [F.interpolate(self.narrow(pool(x)), size=size, mode="bilinear", align_corners=False)
                  for pool in self.pools]
        return torch.cat([*levels, x], 1)


class CENet(nn.Module):
    """Gu et al. 2019: a ResNet encoder (here four strided residual units, 96 px -> 6x6), the context
    extractor (DAC, then RMP) and a decoder of transposed convolutions with additive skips."""

    def __init__(self, w=4):
        super().__init__()
        from handwritten import ResBlock
        widths = [w, 2 * w, 4 * w, 8 * w, 16 * w]
        self.stem = nn.Conv2d(1, w, 3, padding=1)
        self.encoders = nn.ModuleList(ResBlock(widths[i], widths[i + 1], stride=2) for i in range(4))
        self.dac = DenseAtrous(widths[4])
        self.rmp = ResidualMultiKernelPooling(widths[4])
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.Conv2d((widths[i + 1] + 4) if i == 3 else widths[i + 1], widths[i], 1), nn.ReLU(),
                          nn.ConvTranspose2d(widths[i], widths[i], 2, stride=2), nn.ReLU())
            for i in reversed(range(4)))
        self.head = nn.Conv2d(w, 2, 3, padding=1)

    def forward(self, x):
        skips = [self.stem(x)]
        for encoder in self.encoders:
            skips.append(encoder(skips[-1]))
        d = self.rmp(self.dac(skips[-1]))
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            d = decoder(d) + skip
        return self.head(d)


class SegNet(nn.Module):
    """Badrinarayanan et al.: the encoder's max-pool indices unpool the decoder (no skip features). The
    pooling is functional: no module hands the deepest map over; the indices are integers, not features."""

    def __init__(self, w=4, depth=3):
        super().__init__()
        widths = [w * 2 ** i for i in range(depth)]
        self.encoders = nn.ModuleList(nn.Sequential(cbr(1 if i == 0 else widths[i - 1], widths[i]),
                                                    cbr(widths[i], widths[i])) for i in range(depth))
        self.decoders = nn.ModuleList(nn.Sequential(cbr(widths[i], widths[i]), cbr(widths[i], widths[max(i - 1, 0)]))
                                      for i in reversed(range(depth)))
        self.head = nn.Conv2d(w, 2, 3, padding=1)

    def forward(self, x):
        indices = []
        for encoder in self.encoders:
            x, index = F.max_pool2d(encoder(x), 2, return_indices=True)
            indices.append(index)
        for decoder, index in zip(self.decoders, reversed(indices)):
            x = decoder(F.max_unpool2d(x, index, 2))
        return self.head(x)


class UNet3Plus(nn.Module):
    """Huang et al. 2020: every decoder node takes every encoder level, max-pooled down or upsampled to
    its grid, and the decoder nodes below it: full-scale skips, many maps pooled from one."""

    def __init__(self, w=4, depth=4):
        super().__init__()
        self.depth = depth
        widths = [w * 2 ** i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(cbr(1 if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1))
        # node at level j (0 finest .. depth-1) takes depth + 1 maps, each brought to w channels
        self.bring = nn.ModuleList(nn.ModuleList(cbr(widths[i] if i <= j or i == depth else w * (depth + 1), w)
                                                 for i in range(depth + 1)) for j in range(depth))
        self.fuse = nn.ModuleList(cbr(w * (depth + 1), w * (depth + 1)) for _ in range(depth))
        self.head = nn.Conv2d(w * (depth + 1), 2, 3, padding=1)

    def forward(self, x):
        enc = [self.encoders[0](x)]
        for encoder in self.encoders[1:]:
            enc.append(encoder(F.max_pool2d(enc[-1], 2)))
        dec = {self.depth: enc[self.depth]}
        for j in reversed(range(self.depth)):
            size = enc[j].shape[2:]
            parts = []
            for i in range(self.depth + 1):
                if i < j:
                    source = F.max_pool2d(enc[i], 2 ** (j - i))
                elif i == j:
                    source = enc[i]
                else:
                    source = F.interpolate(dec[i], size=size, mode="bilinear", align_corners=False)
                parts.append(self.bring[j][i](source))
            dec[j] = self.fuse[j](torch.cat(parts, 1))
        return self.head(dec[0])


class ShiftedTokenMLP(nn.Module):
    """UNeXt's tokenised MLP block on (N, L, C) tokens: a linear, a depthwise conv on the grid, a linear."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)

    def forward(self, tokens, grid):
        n, _, _ = tokens.shape
        y = self.fc1(self.norm(tokens))
        y = self.dw(y.transpose(1, 2).reshape(n, -1, *grid)).flatten(2).transpose(1, 2)
        return tokens + self.fc2(F.gelu(y))


class UNeXt(nn.Module):
    """Valanarasu & Patel 2022: convolutional stages, then tokenised-MLP stages whose last works on tokens
    at the lowest grid (the bottleneck), handed back to a convolutional decoder as a map."""

    def __init__(self, w=4):
        super().__init__()
        self.conv1, self.conv2 = cbr(1, w), cbr(w, 2 * w)
        self.embed1, self.mlp1 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), ShiftedTokenMLP(4 * w)
        self.embed2, self.bottleneck = nn.Conv2d(4 * w, 8 * w, 3, stride=2, padding=1), ShiftedTokenMLP(8 * w)
        self.norm = nn.LayerNorm(8 * w)
        self.decoders = nn.ModuleList(cbr(c_in, c_out) for c_in, c_out in
                                      ((8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w), (w, w)))
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        t1 = F.max_pool2d(self.conv1(x), 2)
        t2 = F.max_pool2d(self.conv2(t1), 2)
        m = self.embed1(t2)
        n, c, h, w = m.shape
        t3 = self.mlp1(m.flatten(2).transpose(1, 2), (h, w)).transpose(1, 2).reshape(n, c, h, w)
        m = self.embed2(t3)
        n, c, h, w = m.shape
        b = self.norm(self.bottleneck(m.flatten(2).transpose(1, 2), (h, w)))
        d = b.transpose(1, 2).reshape(n, c, h, w)
        for decoder, skip in zip(self.decoders, (t3, t2, t1, None)):
            d = F.interpolate(decoder(d), scale_factor=2.0, mode="bilinear", align_corners=False)
            d = d + skip if skip is not None else d
        return self.head(d)


class MultiResBlock(nn.Module):
    """MultiResUNet's block: three chained 3x3 convs concatenated (a 5x5 and a 7x7 in effect), plus a 1x1."""

    def __init__(self, c_in, c_out):
        super().__init__()
        a, b = c_out // 4, c_out // 4
        c = c_out - a - b
        self.c3, self.c5, self.c7 = cbr(c_in, a), cbr(a, b), cbr(b, c)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)
        self.norm = nn.BatchNorm2d(c_out)

    def forward(self, x):
        a = self.c3(x)
        b = self.c5(a)
        c = self.c7(b)
        return F.relu(self.norm(torch.cat([a, b, c], 1) + self.shortcut(x)))


class ResPath(nn.Module):
    """MultiResUNet's res path: residual convolutions along a skip, the longer the finer the level."""

    def __init__(self, c, length):
        super().__init__()
        self.steps = nn.ModuleList(cbr(c, c) for _ in range(length))

    def forward(self, x):
        for step in self.steps:
            x = x + step(x)
        return x


class MultiResUNet(nn.Module):
    """Ibtehaz & Rahman 2020: MultiRes blocks down and up, res paths on the skips."""

    def __init__(self, w=8, depth=3):
        super().__init__()
        widths = [w * 2 ** i for i in range(depth + 1)]
        self.downs = nn.ModuleList(MultiResBlock(1 if i == 0 else widths[i - 1], widths[i]) for i in range(depth))
        self.paths = nn.ModuleList(ResPath(widths[i], depth - i) for i in range(depth))
        self.bottom = MultiResBlock(widths[depth - 1], widths[depth])
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(depth)))
        self.decs = nn.ModuleList(MultiResBlock(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        skips = []
        for down, path in zip(self.downs, self.paths):
            x = down(x)
            skips.append(path(x))
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec, skip in zip(self.ups, self.decs, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


class DoubleUNet(nn.Module):
    """Jha et al. 2020: two U-Nets in sequence, the second on the input weighted by the first's mask, each
    with its own bottleneck; the output is both masks. The first is a detour on the way to the second."""

    def __init__(self):
        super().__init__()
        from handwritten import PlainUNet
        self.first, self.second = PlainUNet(depth=2), PlainUNet(depth=2)

    def forward(self, x):
        m1 = self.first(x)
        m2 = self.second(x * torch.sigmoid(m1[:, :1]))
        return torch.cat([m1, m2], 1)


class ParallelBranches(nn.Module):
    """TransFuse-like (Zhang et al. 2021): a CNN branch and a transformer branch on the same input, each
    to its own lowest grid, fused only in the decoder: two deepest maps, no single bottleneck."""

    def __init__(self, w=8):
        super().__init__()
        self.cnn = nn.Sequential(cbr(1, w, stride=2), cbr(w, 2 * w, stride=2))
        self.embed = nn.Conv2d(1, 2 * w, 4, stride=4)
        from handwritten import TokenBlock
        self.transformer = TokenBlock(2 * w)
        self.fuse = cbr(4 * w, w)
        self.head = nn.ConvTranspose2d(w, 2, 4, stride=4)

    def forward(self, x):
        a = self.cnn(x)
        t = self.embed(x)
        n, c, h, w = t.shape
        b = self.transformer(t.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.fuse(torch.cat([a, b], 1)))


class ClassTokenBottleneck(nn.Module):
    """A CNN U-Net whose bottleneck is a ViT stage with a class token (N, 1 + L, C), dropped after: the
    stage's output is the bottleneck, its tokens after the prefix on the grid."""

    def __init__(self, w=8):
        super().__init__()
        self.e1, self.e2 = cbr(1, w), cbr(w, 2 * w)
        self.embed = nn.Conv2d(2 * w, 4 * w, 2, 2)
        self.cls = nn.Parameter(torch.zeros(1, 1, 4 * w))
        self.vit = nn.TransformerEncoder(nn.TransformerEncoderLayer(4 * w, 2, 8 * w, 0.0, batch_first=True), 2)
        self.u2, self.u1 = cbr(6 * w, 2 * w), cbr(3 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        t = self.embed(e2)
        n, c, h, w = t.shape
        tokens = torch.cat([self.cls.expand(n, -1, -1), t.flatten(2).transpose(1, 2)], 1)
        b = self.vit(tokens)[:, 1:].transpose(1, 2).reshape(n, c, h, w)
        d = self.u2(torch.cat([F.interpolate(b, scale_factor=2.0), e2], 1))
        d = self.u1(torch.cat([F.interpolate(d, scale_factor=2.0), e1], 1))
        return self.head(d)


class HRNetLike(nn.Module):
    """Two parallel resolutions exchanging maps repeatedly, fused at the fine one: no single bottleneck."""

    def __init__(self, w=8):
        super().__init__()
        self.stem = cbr(1, w)
        self.down = cbr(w, 2 * w, stride=2)
        self.hi = nn.ModuleList(cbr(w, w) for _ in range(2))
        self.lo = nn.ModuleList(cbr(2 * w, 2 * w) for _ in range(2))
        self.h2l = nn.ModuleList(cbr(w, 2 * w, stride=2) for _ in range(2))
        self.l2h = nn.ModuleList(nn.Conv2d(2 * w, w, 1) for _ in range(2))
        self.head = nn.Conv2d(3 * w, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        l = self.down(h)
        for hi, lo, h2l, l2h in zip(self.hi, self.lo, self.h2l, self.l2h):
            h, l = hi(h), lo(l)
            h, l = h + F.interpolate(l2h(l), scale_factor=2.0), l + h2l(h)
        return self.head(torch.cat([h, F.interpolate(l, scale_factor=2.0)], 1))


class AttentionUNet3D(nn.Module):
    """A 3-D U-Net with an additive attention gate and a residual bottleneck summed in ``forward``: no module
    hands the bottleneck over, two take it in, and one of them (the gating convolution) only makes a gate."""

    def __init__(self, w=4):
        super().__init__()
        def c3(i, o):
            return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.InstanceNorm3d(o), nn.LeakyReLU())
        self.e1, self.e2 = c3(1, w), c3(w, 2 * w)
        self.b1, self.b2 = c3(2 * w, 4 * w), c3(4 * w, 4 * w)
        self.gx, self.gg, self.psi = nn.Conv3d(2 * w, 2 * w, 1), nn.Conv3d(4 * w, 2 * w, 1), nn.Conv3d(2 * w, 1, 1)
        self.up2, self.d2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, 2), c3(4 * w, 2 * w)
        self.up1, self.d1 = nn.ConvTranspose3d(2 * w, w, 2, 2), c3(2 * w, w)
        self.head = nn.Conv3d(w, 2, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool3d(e1, 2))
        b = self.b1(F.max_pool3d(e2, 2))
        b = b + self.b2(b)  # summed here: no module hands the bottleneck over
        g = F.interpolate(self.gg(b), scale_factor=2.0)
        a = torch.sigmoid(self.psi(F.relu(self.gx(e2) + g)))
        d = self.d2(torch.cat([self.up2(b), e2 * a], 1))
        d = self.d1(torch.cat([self.up1(d), e1], 1))
        return self.head(d)


class ChannelAttentionBlock(nn.Module):
    """Restormer's transposed attention: attention across channels, then a gated conv FFN."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, c), nn.GroupNorm(1, c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        self.ffn_in, self.ffn_out = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).flatten(2).chunk(3, 1)
        attn = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2), -1)
        x = x + self.proj((attn @ v).view(n, c, h, w))
        a, b = self.ffn_in(self.norm2(x)).chunk(2, 1)
        return x + self.ffn_out(F.gelu(a) * b)


class RestormerLike(nn.Module):
    """Zamir et al. 2022, as a U-Net: channel-attention blocks, pixel-unshuffle down, pixel-shuffle up; its
    (N, C, C) attention matrices are not tokens, the latent stage is the bottleneck."""

    def __init__(self, c=8):
        super().__init__()
        self.embed = nn.Conv2d(1, c, 3, padding=1)
        self.l1 = ChannelAttentionBlock(c)
        self.down1 = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.PixelUnshuffle(2))
        self.l2 = ChannelAttentionBlock(2 * c)
        self.down2 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.PixelUnshuffle(2))
        self.latent = nn.Sequential(ChannelAttentionBlock(4 * c), ChannelAttentionBlock(4 * c))
        self.up2 = nn.Sequential(nn.Conv2d(4 * c, 8 * c, 3, padding=1), nn.PixelShuffle(2))
        self.dec2 = ChannelAttentionBlock(4 * c)
        self.up1 = nn.Sequential(nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.PixelShuffle(2))
        self.dec1 = ChannelAttentionBlock(2 * c)
        self.head = nn.Conv2d(2 * c, 2, 3, padding=1)

    def forward(self, x):
        s1 = self.l1(self.embed(x))
        s2 = self.l2(self.down1(s1))
        b = self.latent(self.down2(s2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), s1], 1)))
