"""FREM inside nnU-Net v2: a trainer that attaches FREM to its network and re-draws it each epoch.

Install it either way, then train as usual:

* copy this file into ``nnunetv2/training/nnUNetTrainer/variants/`` of your
  nnU-Net installation (nnU-Net finds trainers there by class name), or
* copy it into a folder of its own and point nnU-Net there (nnU-Net >= 2.8;
  nnU-Net imports every file in that folder, and frem's other examples train
  when imported): ``export nnUNet_extTrainer=/path/to/that/folder``

    nnUNetv2_train DATASET_ID 3d_fullres FOLD -tr nnUNetTrainerFREM

FREM comes from ``frem.integrations.nnunet.FREMMixin``, which adds it to any trainer
class: ``class MyTrainer(FREMMixin, nnUNetTrainerDA5)`` keeps that variant's
loss, schedule and augmentation and adds FREM (put such classes in this file,
or in one of your own beside it). FREM is attached when the network is built,
before nnU-Net compiles it or wraps it in DDP, at ``encoder.stages[-1]``
(frem knows nnU-Net's architectures by name), re-drawn at every epoch start,
and ``frem.status`` goes into nnU-Net's log at every epoch end. B is a
fraction of that stage's channels (the paper's mouse-liver setting, 162 of
512, and X=632); change them as class attributes (``frem_B``, ``frem_X``).

Precision: nnU-Net trains on CUDA under float16 autocast with a GradScaler.
FREM itself fits float16 there (it caps its product at float16's maximum and
warns once an epoch if it had to), but in fp32 measurements nnU-Net's decoder
reached 75,000 right after the enhanced features (docs/frameworks.md, "Mixed
precision"), past float16's 65,504: an overflow that would stall the run.
So on a GPU with bfloat16 (Ampere and later) the mixin makes nnU-Net's own
autocast use bfloat16 (float32's range); set ``bfloat16 = False`` on the class
to keep float16, where FREM then names an overflow at the next epoch.

The mixin's ``build_network_architecture`` keeps nnU-Net's own signature
(``functools.wraps``): nnU-Net >= 2.7 inspects it to choose how to call it,
for training and for ``nnUNetv2_predict``. Tested against the nnunetv2 that
``pip install nnunetv2`` installs and the previous minor release
(tests/test_nnunet.py). Checkpoints hold no FREM state: they load into
nnU-Net's plain trainer too.

Run as a script, this file shows the attachment on the networks
``dynamic_network_architectures`` builds for nnU-Net.
"""

try:  # nnU-Net imports every file in its trainer folders: a missing frem must not break that
    import frem
    from frem.integrations.nnunet import FREMMixin
except ImportError:  # pragma: no cover - exercised only where frem is not installed
    frem = FREMMixin = None

try:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError:  # nnU-Net not installed: the trainer class is not defined
    nnUNetTrainer = None

if nnUNetTrainer is not None and FREMMixin is not None:

    class nnUNetTrainerFREM(FREMMixin, nnUNetTrainer):
        """nnU-Net's default trainer with FREM; any other trainer class takes the mixin the same way."""


if __name__ == "__main__":
    import sys

    import torch
    from torch import nn

    from frem.extras import install_command
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:
        sys.exit(f"examples/nnunet_trainer.py needs nnU-Net: {install_command('nnunet')}")

    for dims, conv, norm in ((2, nn.Conv2d, nn.InstanceNorm2d), (3, nn.Conv3d, nn.InstanceNorm3d)):
        network = PlainConvUNet(1, 4, (8, 16, 32, 64), conv, 3, (1, 2, 2, 2), (2, 2, 2, 2), 3, (2, 2, 2), True,
                                norm, {"affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                                deep_supervision=True)
        handle = frem.attach(network, FREMMixin.frem_layer, B=FREMMixin.frem_B, X=FREMMixin.frem_X)
        frem.resample(network, 1)
        outputs = network.train()(torch.randn(2, 1, *(32,) * dims))
        print(f"{dims}-D:", handle, "| deep supervision outputs", [tuple(o.shape) for o in outputs])
