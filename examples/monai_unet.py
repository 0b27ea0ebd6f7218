"""FREM on a MONAI 3-D UNet trained with a MONAI loss, re-drawn each epoch.

MONAI's UNet nests its bottom unit inside SkipConnections; frem knows the
class and names that unit (``frem.candidates`` shows it beside the maps it
measured). Synthetic volumes stand in for your data loader.

    pip install -e ".[monai]"
    python examples/monai_unet.py
"""

import sys

import torch

import frem
from frem.extras import install_command

try:
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
except ImportError:
    sys.exit(f"examples/monai_unet.py needs MONAI: {install_command('monai')}")

torch.manual_seed(0)
model = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32, 64), strides=(2, 2, 2))
example = torch.randn(1, 1, 32, 32, 32)
print(frem.candidates(model, example, limit=5))
handle = frem.attach(model, "bottleneck", B=0.25, X=250, example_input=example)
print(handle)

loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
volumes, labels = torch.randn(4, 1, 32, 32, 32), torch.randint(0, 3, (4, 1, 32, 32, 32))
for epoch in range(3):
    frem.resample(model, epoch)  # new channels every epoch, as in the paper
    model.train()
    loss = loss_fn(model(volumes), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}, enhanced channels {handle.channels.tolist()}")

model.eval()
with torch.no_grad():
    prediction = model(volumes[:1]).argmax(1)  # FREM is the identity here
print("prediction", tuple(prediction.shape))
