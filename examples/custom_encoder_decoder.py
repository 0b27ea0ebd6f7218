"""FREM on a hand-written encoder-decoder: ``frem.candidates`` shows where it goes and why.

No names are known here, so one forward pass surveys every feature map and
the structure decides: of the maps at the lowest resolution on the path every
input takes to the output, the last one a module hands over, where the
decoder takes over (the rule in frem/bottleneck.py).

    python examples/custom_encoder_decoder.py
"""

import torch
from torch import nn

import frem


def conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class TinyUNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = conv_block(1, 16)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), conv_block(16, 32))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), conv_block(32, 64))
        self.up1 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.fuse1 = conv_block(64, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.fuse2 = conv_block(32, 16)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        s1 = self.stem(x)
        s2 = self.down1(s1)
        deep = self.down2(s2)
        y = self.fuse1(torch.cat([self.up1(deep), s2], 1))
        y = self.fuse2(torch.cat([self.up2(y), s1], 1))
        return self.head(y)


model = TinyUNet()
example = torch.randn(1, 1, 64, 64)
print(frem.candidates(model, example, limit=6))  # the pick: the encoder's last map at the lowest resolution
handle = frem.attach(model, "bottleneck", B=8, X=250, example_input=example)
print(handle)
compiled = torch.compile(model, fullgraph=True)  # the hook and the op trace without a graph break
model.train()
print("compiled train output", tuple(compiled(torch.randn(2, 1, 64, 64)).shape))
