"""FREM on the default model: an smp U-Net with an SE encoder (512 bottleneck channels).

    python examples/smp_unet.py
"""

import segmentation_models_pytorch as smp
import torch

import frem

torch.manual_seed(0)
model = smp.Unet("tu-seresnet34", encoder_weights=None, in_channels=1, classes=4)
handle = frem.attach(model, layer="bottleneck", B=8, X=250)  # the paper's Drosophila setting
print(handle)

images = torch.randn(4, 1, 128, 128)
masks = torch.randint(0, 4, (4, 128, 128))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
for epoch in range(3):
    frem.resample(model, epoch)  # new channels every epoch: a pure function of (seed, epoch)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images), masks)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"epoch {epoch}: loss {loss.item():.3f}, enhanced channels {handle.channels.tolist()}")

model.eval()  # FREM is the identity now: the hook returns before touching the features
with torch.no_grad():
    prediction = model(images).argmax(1)
frem.detach(model)  # the bare U-Net again; its state_dict never changed
print("prediction", tuple(prediction.shape), "state_dict keys", len(model.state_dict()))
