"""Hand-written encoder-decoders of the kinds people build, for the bottleneck corpus.

Each is small (CPU-fast) but has the structure that matters: where the
encoder ends, what the decoder does first, and what hangs off the side.
"""

import torch
from torch import nn
from torch.nn import functional as F


def conv_block(c_in, c_out, dims=2):
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(c_in, c_out, 3, padding=1), norm(c_out), nn.ReLU(inplace=True),
                         conv(c_out, c_out, 3, padding=1), norm(c_out), nn.ReLU(inplace=True))


class PlainUNet(nn.Module):
    """A classic U-Net (max-pool down, transposed-conv up), 1-D, 2-D or 3-D, any depth."""

    def __init__(self, depth=3, width=4, dims=2, in_channels=1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        up = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.downs = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.downs.append(nn.Sequential(conv(c, w, 3, padding=1), nn.ReLU()))
            c = w
        self.pool = pool(2)
        self.middle = nn.Sequential(conv(c, widths[-1], 3, padding=1), nn.ReLU(),
                                    conv(widths[-1], widths[-1], 3, padding=1), nn.ReLU())
        self.ups = nn.ModuleList(up(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.decs = nn.ModuleList(nn.Sequential(conv(2 * widths[i], widths[i], 3, padding=1), nn.ReLU())
                                  for i in reversed(range(depth)))
        self.head = conv(widths[0], 2, 1)

    def encode(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        return self.middle(x), skips

    def decode(self, x, skips):
        for up, dec, skip in zip(self.ups, self.decs, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)

    def forward(self, x):
        return self.decode(*self.encode(x))


class DeepSupervisionUNet(PlainUNet):
    """A U-Net with an auxiliary head on the bottleneck: a side branch at the lowest resolution."""

    def __init__(self):
        super().__init__(depth=2)
        self.aux = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x, skips = self.encode(x)
        return self.decode(x, skips), F.interpolate(self.aux(x), scale_factor=4.0)


class GridGatingSignal(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv(x)


class AttentionGate(nn.Module):
    """Oktay et al. 2018: the skip x is weighted by coefficients computed from x and a coarser gating g."""

    def __init__(self, c_x, c_g, inter):
        super().__init__()
        self.theta = nn.Conv2d(c_x, inter, 2, stride=2)
        self.phi = nn.Conv2d(c_g, inter, 1)
        self.psi = nn.Conv2d(inter, 1, 1)
        self.W = nn.Sequential(nn.Conv2d(c_x, c_x, 1), nn.BatchNorm2d(c_x))

    def forward(self, x, g):
        theta = self.theta(x)
        phi = F.interpolate(self.phi(g), size=theta.shape[2:], mode="bilinear", align_corners=False)
        coefficients = torch.sigmoid(self.psi(F.relu(theta + phi)))
        coefficients = F.interpolate(coefficients, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.W(coefficients.expand_as(x) * x)


class OktayAttentionUNet(nn.Module):
    """Attention U-Net in the form of Oktay et al.: a 1x1 gating conv on the centre feeds the
    attention gates (and runs after the centre), the decoder's main path never passes it."""

    def __init__(self, w=4):
        super().__init__()
        self.enc1, self.enc2, self.enc3 = conv_block(1, w), conv_block(w, 2 * w), conv_block(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.center = conv_block(4 * w, 8 * w)
        self.gating = GridGatingSignal(8 * w, 8 * w)
        self.att3, self.att2 = AttentionGate(4 * w, 8 * w, 4 * w), AttentionGate(2 * w, 4 * w, 2 * w)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec3, self.dec2, self.dec1 = conv_block(8 * w, 4 * w), conv_block(4 * w, 2 * w), conv_block(2 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        center = self.center(self.pool(e3))
        gating = self.gating(center)
        d3 = self.dec3(torch.cat([self.att3(e3, gating), self.up3(center)], 1))
        d2 = self.dec2(torch.cat([self.att2(e2, d3), self.up2(d3)], 1))
        d1 = self.dec1(torch.cat([e1, self.up1(d2)], 1))
        return self.head(d1)


class ShuffleUp(nn.Module):
    """A sub-pixel upsampling block: widen at the coarse resolution, then fold channels into space."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.act(self.conv(x)))


class SubPixelUNet(nn.Module):
    """A U-Net whose decoder widens before upsampling (sub-pixel convolution, fastai-style):
    the widened map at the lowest resolution belongs to the decoder."""

    def __init__(self, w=4, flat=False):
        super().__init__()
        self.flat = flat
        self.enc1, self.enc2 = conv_block(1, w), conv_block(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = conv_block(2 * w, 4 * w)
        if flat:  # the widening convolution and the shuffle as the model's own layers
            self.widen = nn.Conv2d(4 * w, 4 * 2 * w, 3, padding=1)
            self.shuffle = nn.PixelShuffle(2)
        else:
            self.up2 = ShuffleUp(4 * w, 2 * w)
        self.dec2 = conv_block(4 * w, 2 * w)
        self.up1 = ShuffleUp(2 * w, w)
        self.dec1 = conv_block(2 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        up = self.shuffle(F.relu(self.widen(b))) if self.flat else self.up2(b)
        d2 = self.dec2(torch.cat([up, e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class DenseLayer(nn.Sequential):
    def __init__(self, c_in, growth):
        super().__init__(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, growth, 3, padding=1))


class DenseBlock(nn.Module):
    """FC-DenseNet's dense block; ``new_only`` returns just the new maps (the bottleneck and the
    upsampling path do, to keep the width in check)."""

    def __init__(self, c_in, growth, layers, new_only=False):
        super().__init__()
        self.new_only = new_only
        self.layers = nn.ModuleList(DenseLayer(c_in + i * growth, growth) for i in range(layers))

    def forward(self, x):
        new = []
        for layer in self.layers:
            out = layer(x)
            x = torch.cat([x, out], 1)
            new.append(out)
        return torch.cat(new, 1) if self.new_only else x


class TransitionDown(nn.Sequential):
    def __init__(self, c):
        super().__init__(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 1), nn.MaxPool2d(2))


class Tiramisu(nn.Module):
    """FC-DenseNet (Jegou et al. 2017) in small: the bottleneck is a dense block ending in a concatenation."""

    def __init__(self, growth=4, first=8, layers=(2, 2), bottleneck_layers=3):
        super().__init__()
        self.first = nn.Conv2d(1, first, 3, padding=1)
        self.down_blocks, self.transitions, skips = nn.ModuleList(), nn.ModuleList(), []
        c = first
        for n in layers:
            self.down_blocks.append(DenseBlock(c, growth, n))
            c += n * growth
            skips.append(c)
            self.transitions.append(TransitionDown(c))
        self.bottleneck = DenseBlock(c, growth, bottleneck_layers, new_only=True)
        c = bottleneck_layers * growth
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for skip, n in zip(reversed(skips), reversed(layers)):
            self.ups.append(nn.ConvTranspose2d(c, c, 2, stride=2))
            self.up_blocks.append(DenseBlock(c + skip, growth, n, new_only=True))
            c = n * growth
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.first(x)
        skips = []
        for block, transition in zip(self.down_blocks, self.transitions):
            x = block(x)
            skips.append(x)
            x = transition(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], 1))
        return self.head(x)


class MedNeXtBlock(nn.Module):
    """MedNeXt (Roy et al. 2023): depthwise conv, GroupNorm, 1x1 expansion (4x), GELU, 1x1 back, residual."""

    def __init__(self, c, expansion=4, stride=1, c_out=None):
        super().__init__()
        c_out = c_out or c
        self.dw = nn.Conv3d(c, c, 3, stride=stride, padding=1, groups=c)
        self.norm = nn.GroupNorm(c, c)
        self.expand = nn.Conv3d(c, expansion * c, 1)
        self.act = nn.GELU()
        self.project = nn.Conv3d(expansion * c, c_out, 1)
        self.shortcut = nn.Conv3d(c, c_out, 1, stride=stride) if stride > 1 or c_out != c else None

    def forward(self, x):
        y = self.project(self.act(self.expand(self.norm(self.dw(x)))))
        return y + (self.shortcut(x) if self.shortcut is not None else x)


class MedNeXtUp(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.up = nn.ConvTranspose3d(c_in, c_out, 2, stride=2)
        self.block = MedNeXtBlock(c_out)

    def forward(self, x):
        return self.block(self.up(x))


class MedNeXtLike(nn.Module):
    """A 3-D MedNeXt-style U-Net: every block widens 4x inside, and the bottleneck is two blocks."""

    def __init__(self, w=4):
        super().__init__()
        self.stem = nn.Conv3d(1, w, 1)
        self.enc1 = MedNeXtBlock(w)
        self.down1 = MedNeXtBlock(w, stride=2, c_out=2 * w)
        self.enc2 = MedNeXtBlock(2 * w)
        self.down2 = MedNeXtBlock(2 * w, stride=2, c_out=4 * w)
        self.bottleneck = nn.Sequential(MedNeXtBlock(4 * w), MedNeXtBlock(4 * w))
        self.up2 = MedNeXtUp(4 * w, 2 * w)
        self.up1 = MedNeXtUp(2 * w, w)
        self.head = nn.Conv3d(w, 2, 1)

    def forward(self, x):
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(self.down1(e1))
        b = self.bottleneck(self.down2(e2))
        d2 = self.up2(b) + e2
        d1 = self.up1(d2) + e1
        return self.head(d1)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride > 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class FlatProjectionNet(nn.Module):
    """A LinkNet-like decoder written flat: a 1x1 projection narrows the bottleneck at the lowest
    resolution before upsampling. Its own layer, at the model's top level, like the encoder's stages:
    structure alone cannot say whose it is."""

    def __init__(self, w=8):
        super().__init__()
        self.stem = nn.Conv2d(1, w, 3, padding=1)
        self.stage1 = ResBlock(w, 2 * w, stride=2)
        self.stage2 = ResBlock(2 * w, 4 * w, stride=2)
        self.reduce = nn.Conv2d(4 * w, w, 1)
        self.up2 = nn.ConvTranspose2d(w, 2 * w, 2, stride=2)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        s0 = self.stem(x)
        s1 = self.stage1(s0)
        s2 = self.stage2(s1)
        d1 = self.up2(F.relu(self.reduce(s2))) + s1
        return self.head(self.up1(d1) + s0)


class TwoEncoders(nn.Module):
    """Two encoders upsampled and merged only at full resolution: no single bottleneck."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.up_a, self.up_b = nn.ConvTranspose2d(8, 2, 2, stride=2), nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x):
        return self.up_a(self.a(x)) + self.up_b(self.b(x))


class TwoEncodersMerged(nn.Module):
    """Two encoders concatenated at the lowest resolution: the merged map is what the decoder gets."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.head(self.up(torch.cat([self.a(x), self.b(x)], 1)))


class TokenMixer(nn.Module):
    """A TransUNet-like bottleneck: the CNN's deepest map becomes tokens, a transformer mixes them,
    and they are folded back into a map for the decoder."""

    def __init__(self, c, heads=2):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(c, heads, dim_feedforward=2 * c, batch_first=True, dropout=0.0)

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = self.layer(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(n, c, h, w)


class TransUNetLike(nn.Module):
    def __init__(self, w=8):
        super().__init__()
        self.enc1, self.enc2 = conv_block(1, w), conv_block(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.embed = nn.Conv2d(2 * w, 4 * w, 1)
        self.transformer = TokenMixer(4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), conv_block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), conv_block(2 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.transformer(self.embed(self.pool(e2)))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))


class NoDownsampling(nn.Module):
    """HighResNet-like: dilated residual blocks at full resolution, no encoder, no bottleneck."""

    def __init__(self, w=8):
        super().__init__()
        self.stem = nn.Conv2d(1, w, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(w, w, 3, padding=d, dilation=d) for d in (1, 2, 4))
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + F.relu(block(x))
        return self.head(x)


class MobileNetUNet(nn.Module):
    """A U-Net on torchvision's mobilenet_v2().features, the skips taken where the stride changes."""

    def __init__(self):
        super().__init__()
        from torchvision.models import mobilenet_v2
        self.encoder = mobilenet_v2(weights=None).features
        self.skip_at = {1: 16, 3: 24, 6: 32, 13: 96}  # layer index -> its width
        widths = [1280, 96, 32, 24, 16]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i], widths[i + 1], 2, stride=2) for i in range(4))
        self.decs = nn.ModuleList(conv_block(2 * widths[i + 1], widths[i + 1]) for i in range(4))
        self.head = nn.ConvTranspose2d(16, 2, 2, stride=2)

    def forward(self, x):
        skips = []
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            if i in self.skip_at:
                skips.append(x)
        for up, dec, skip in zip(self.ups, self.decs, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


class FeatureUNet(nn.Module):
    """A U-Net decoder by hand on any encoder that returns a list of feature maps (timm features_only)."""

    def __init__(self, encoder, channels):
        super().__init__()
        self.encoder = encoder
        self.decoder = UNetDecoder(channels)

    def forward(self, x):
        return self.decoder(self.encoder(x), x.shape[2:])


class UNetDecoder(nn.Module):
    def __init__(self, channels):
        super().__init__()
        channels = list(channels)
        self.blocks = nn.ModuleList(conv_block(channels[i + 1] + channels[i], channels[i])
                                    for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv2d(channels[0], 2, 1)

    def forward(self, features, size):
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[2:]), skip], 1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class FPNDecoder(nn.Module):
    """Feature pyramid: a 1x1 lateral on every level (the deepest one too), top-down sums."""

    def __init__(self, channels, width=16):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, features, size):
        p = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            p = F.interpolate(p, size=feature.shape[2:]) + lateral(feature)
        return F.interpolate(self.head(self.smooth(p)), size=size, mode="bilinear", align_corners=False)


class FeatureFPN(FeatureUNet):
    def __init__(self, encoder, channels):
        nn.Module.__init__(self)
        self.encoder = encoder
        self.decoder = FPNDecoder(channels)


class ViTDecoder(nn.Module):
    """DPT-like: every ViT feature map (all at the patch grid) is upsampled to its own scale and fused."""

    def __init__(self, channels, width=16):
        super().__init__()
        self.reassemble = nn.ModuleList(nn.ConvTranspose2d(c, width, 2 ** (i + 1), stride=2 ** (i + 1))
                                        for i, c in enumerate(reversed(channels)))
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, features, size):
        maps = [r(f) for r, f in zip(self.reassemble, reversed(features))]
        fused = sum(F.interpolate(m, size=maps[-1].shape[2:]) for m in maps)
        return F.interpolate(self.head(fused), size=size, mode="bilinear", align_corners=False)


class FeatureViT(FeatureUNet):
    def __init__(self, encoder, channels):
        nn.Module.__init__(self)
        self.encoder = encoder
        self.decoder = ViTDecoder(channels)


# ---- channels last and tokens (issue 28)

class ChannelsLastFeatureUNet(FeatureUNet):
    """A U-Net decoder on an encoder whose features are channels last (N, H, W, C): timm Swin, MambaOut."""

    def forward(self, x):
        return self.decoder([f.permute(0, 3, 1, 2) for f in self.encoder(x)], x.shape[2:])


class TorchvisionSwinUNet(nn.Module):
    """A U-Net decoder on torchvision's Swin ``features`` (a Sequential whose stages hand over (N, H, W, C))."""

    def __init__(self, embed=8):
        super().__init__()
        from torchvision.models.swin_transformer import SwinTransformer
        self.encoder = SwinTransformer([4, 4], embed, [1, 1, 1, 1], [1, 1, 1, 1], [2, 2]).features
        self.decoder = UNetDecoder([embed, 2 * embed, 4 * embed, 8 * embed])

    def forward(self, x):
        features = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i % 2 == 1:  # 1, 3, 5, 7: after each stage's blocks
                features.append(x.permute(0, 3, 1, 2))
        return self.decoder(features, (4 * features[0].shape[2], 4 * features[0].shape[3]))


class TokenBlock(nn.Module):
    """A transformer block on (N, L, C) tokens: attention over the whole grid and an MLP, each residual."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attention = nn.MultiheadAttention(c, 1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Swin's down step on tokens: the 2x2 neighbours of the grid concatenated, then a linear 4C -> 2C."""

    def __init__(self, c):
        super().__init__()
        self.reduce = nn.Linear(4 * c, 2 * c)

    def forward(self, x, grid):
        n, _, c = x.shape
        h, w = grid
        x = x.view(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h * w // 4, 4 * c)
        return self.reduce(x)


class PatchExpanding(nn.Module):
    """Swin-UNet's up step on tokens: a linear C -> 2C, its channels spread over a 2x2 finer grid (C/2 each)."""

    def __init__(self, c):
        super().__init__()
        self.expand = nn.Linear(c, 2 * c)

    def forward(self, x, grid):
        n, _, c = x.shape
        h, w = grid
        x = self.expand(x).view(n, h, w, 2, 2, c // 2).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, 4 * h * w, c // 2)


class SwinUNetLike(nn.Module):
    """A pure-transformer U-Net on (N, L, C) tokens (Cao et al., Swin-Unet): patch embedding, blocks and
    patch merging down, a bottleneck stage, patch expanding up with skip concatenations, and a x4 expand."""

    def __init__(self, c=8):
        super().__init__()
        self.embed = nn.Conv2d(1, c, 4, stride=4)
        self.enc1, self.merge1 = TokenBlock(c), PatchMerging(c)
        self.enc2, self.merge2 = TokenBlock(2 * c), PatchMerging(2 * c)
        self.bottleneck = TokenBlock(4 * c)
        self.expand2, self.fuse2, self.dec2 = PatchExpanding(4 * c), nn.Linear(4 * c, 2 * c), TokenBlock(2 * c)
        self.expand1, self.fuse1, self.dec1 = PatchExpanding(2 * c), nn.Linear(2 * c, c), TokenBlock(c)
        self.head = nn.ConvTranspose2d(c, 2, 4, stride=4)

    def forward(self, x):
        t = self.embed(x)
        n, c, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        s1 = self.enc1(t)
        s2 = self.enc2(self.merge1(s1, (h, w)))
        b = self.bottleneck(self.merge2(s2, (h // 2, w // 2)))
        d2 = self.dec2(self.fuse2(torch.cat([self.expand2(b, (h // 4, w // 4)), s2], -1)))
        d1 = self.dec1(self.fuse1(torch.cat([self.expand1(d2, (h // 2, w // 2)), s1], -1)))
        return self.head(d1.transpose(1, 2).reshape(n, c, h, w))


class HybridTokenBottleneck(nn.Module):
    """A CNN encoder and decoder with a transformer stage on (N, L, C) tokens at the bottom (TransUNet's
    layout) whose tokens are handed over as tokens: the bottleneck is the token stage's output."""

    def __init__(self, w=8):
        super().__init__()
        self.enc1, self.enc2 = conv_block(1, w), conv_block(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.embed = nn.Linear(2 * w, 4 * w)
        self.transformer = nn.Sequential(TokenBlock(4 * w), TokenBlock(4 * w))
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), conv_block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), conv_block(2 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        p = self.pool(e2)
        n, c, h, w = p.shape
        tokens = self.transformer(self.embed(p.flatten(2).transpose(1, 2)))
        b = tokens.transpose(1, 2).reshape(n, -1, h, w)
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))


class DictInput(nn.Module):
    """A U-Net called with keyword arguments (MONAI-style dict batches): forward(image=..., mask=None)."""

    def __init__(self):
        super().__init__()
        self.unet = PlainUNet()

    def forward(self, image, mask=None):
        return self.unet(image if mask is None else image * mask)
