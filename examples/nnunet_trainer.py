"""FREM inside nnU-Net v2: a trainer that attaches FREM to its network and re-draws it each epoch.

Copy this file into ``nnunetv2/training/nnUNetTrainer/variants/`` (nnU-Net
finds trainers there by class name), then train as usual:

    nnUNetv2_train DATASET_ID 3d_fullres FOLD -tr nnUNetTrainerFREM

FREM is attached when the network is built, before nnU-Net compiles it or
wraps it in DDP, at ``encoder.stages[-1]`` (frem knows nnU-Net's
architectures by name). B is a fraction of that stage's channels (the paper's
mouse-liver setting, 162 of 512, and X=632). Run as a script, this file shows
the attachment on the networks ``dynamic_network_architectures`` builds for
nnU-Net, with or without nnU-Net installed.
"""

import torch
from torch import nn

import frem

FREM_B = 162 / 512
FREM_X = 632.0


def with_frem(network: nn.Module, seed: int = 0) -> nn.Module:
    """Attach FREM at the network's bottleneck and return the network."""
    frem.attach(network, "bottleneck", B=FREM_B, X=FREM_X, seed=seed)
    return network


try:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError:  # nnU-Net not installed: the trainer class is not defined
    nnUNetTrainer = None

if nnUNetTrainer is not None:

    class nnUNetTrainerFREM(nnUNetTrainer):
        @staticmethod
        def build_network_architecture(*args, **kwargs) -> nn.Module:
            return with_frem(nnUNetTrainer.build_network_architecture(*args, **kwargs))

        def on_train_epoch_start(self):
            frem.resample(self.network, self.current_epoch)  # sees through compile and DDP
            super().on_train_epoch_start()


if __name__ == "__main__":
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    for dims, conv, norm in ((2, nn.Conv2d, nn.InstanceNorm2d), (3, nn.Conv3d, nn.InstanceNorm3d)):
        network = PlainConvUNet(1, 4, (8, 16, 32, 64), conv, 3, (1, 2, 2, 2), (2, 2, 2, 2), 3, (2, 2, 2), True,
                                norm, {"affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                                deep_supervision=True)
        handle = frem.attached(with_frem(network))[0]
        frem.resample(network, 1)
        outputs = network.train()(torch.randn(2, 1, *(32,) * dims))
        print(f"{dims}-D:", handle, "| deep supervision outputs", [tuple(o.shape) for o in outputs])
