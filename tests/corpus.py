"""The networks frem's bottleneck rule was decided from, and the right site of each.

``right`` lists the sites where FREM belongs (any of them, as ``Site.describe()``
text; negative entries count from the end); empty means there is no single
bottleneck and frem must refuse. ``measured`` overrides it for the measured
rule alone where a name rule settles what structure leaves open. Every case
must end right, or in a ``BottleneckNotFound`` that lists a right site: never
silently wrong. Widths and inputs are tiny so the corpus runs on a CPU.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import handwritten as hw
import literature as lit

warnings.filterwarnings("ignore", category=UserWarning, module="monai")
warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass(frozen=True)
class Case:
    build: object
    make_input: object
    right: tuple
    category: str
    measured: tuple | None = None  # right answers of the measured rule alone, where they differ

    def measured_right(self) -> tuple:
        return self.right if self.measured is None else self.measured


def x1d(size=32):
    return torch.randn(2, 1, size)


def x2d(size=32, channels=1):
    return torch.randn(2, channels, size, size)


def x3d(size=16):
    return torch.randn(2, 1, size, size, size)


def _monai(name, *args, **kwargs):
    import monai.networks.nets as nets
    return lambda: getattr(nets, name)(*args, **kwargs)


def _nnunet(dims=2, residual=False):
    # nnU-Net's architectures come with the nnunet extra, which is not in `test` (it pins timm): without
    # it these cases skip, except under CI, which installs it and must run them.
    if not os.environ.get("CI"):
        pytest.importorskip("dynamic_network_architectures", reason='needs the nnunet extra: pip install -e ".[nnunet]"')
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    stages = 4 if dims == 2 else 3
    cls = ResidualEncoderUNet if residual else PlainConvUNet
    return cls(1, stages, (4, 8, 16, 32)[:stages], conv, 3, (1, 2, 2, 2)[:stages], (1,) * stages, 2,
               (1,) * (stages - 1), False, norm, None, None, None, nn.ReLU)


def _torchvision(name):
    from torchvision.models import segmentation
    return lambda: getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=2)


def _smp(arch, encoder, **kwargs):
    def build():
        import segmentation_models_pytorch as smp
        return getattr(smp, arch)(encoder, encoder_weights=None, in_channels=1, classes=2, **kwargs)
    return build


def _timm(name, decoder=hw.FeatureUNet, **kwargs):
    def build():
        import timm
        encoder = timm.create_model(name, features_only=True, pretrained=False, in_chans=1, **kwargs)
        return decoder(encoder, encoder.feature_info.channels())
    return build


def _quicknat():
    def build():
        import monai
        if tuple(int(part) for part in monai.__version__.split(".")[:2]) < (1, 6):
            # MONAI 1.5's own Quicknat.forward fails (SequentialWithIdx.forward() missing 'indices'); the
            # torch floor's venv resolves monai 1.5.2
            pytest.skip(f"MONAI's Quicknat runs from MONAI 1.6 (here {monai.__version__})")
        return _monai("Quicknat", num_classes=2, num_channels=1, num_filters=8)()
    return build


def _dints(dims=2):
    def build():
        import monai.networks.nets as nets
        space = nets.TopologyInstance(channel_mul=0.25, num_blocks=3, num_depths=3, spatial_dims=dims)
        return nets.DiNTS(space, in_channels=1, num_classes=2, spatial_dims=dims)
    return build


def _timm_swinv2():
    return _timm("swinv2_tiny_window8_256", decoder=hw.ChannelsLastFeatureUNet, img_size=64, window_size=2,
                 embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def _timm_swin(**kwargs):
    return _timm("swin_tiny_patch4_window7_224", decoder=hw.ChannelsLastFeatureUNet, img_size=64, window_size=2,
                 embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), **kwargs)


LAST = " (channels in dim -1)"  # a site whose channels are last: (N, H, W, C) maps, (N, L, C) tokens


MONAI_UNET_2D = "model.1.submodule.1.submodule.1.submodule output"
MONAI_UNET_3D = "model.1.submodule.1.submodule output"
SMP = ("encoder output[-1]",)

CASES = {
    # ---- MONAI
    "monai-unet-2d": Case(_monai("UNet", 2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)), x2d,
                          (MONAI_UNET_2D,), "library",
                          # measured: the bottom, or the concatenation the decoder takes it in
                          measured=(MONAI_UNET_2D, "model.1.submodule.1.submodule.1 output")),
    "monai-unet-3d": Case(_monai("UNet", 3, 1, 2, channels=(4, 8, 16), strides=(2, 2)), x3d, (MONAI_UNET_3D,),
                          "library", measured=(MONAI_UNET_3D, "model.1.submodule.1 output")),
    "monai-unet-residual": Case(_monai("UNet", 2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=2),
                                x2d, (MONAI_UNET_2D,), "library",
                                measured=(MONAI_UNET_2D, "model.1.submodule.1.submodule.1 output")),
    "monai-attention-unet": Case(_monai("AttentionUnet", 2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)), x2d,
                                 (MONAI_UNET_2D,), "attention gates"),
    "monai-unetr": Case(_monai("UNETR", 1, 2, img_size=(32, 32), feature_size=4, hidden_size=48, mlp_dim=96,
                               num_heads=4, spatial_dims=2), x2d, ("decoder5 input[0]",), "transformer"),
    "monai-swinunetr": Case(_monai("SwinUNETR", in_channels=1, out_channels=2, feature_size=12, spatial_dims=2,
                                   depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), lambda: x2d(64),
                            ("encoder10 output",), "transformer"),
    "monai-basicunet": Case(_monai("BasicUNet", 2, 1, 2, features=(4, 4, 8, 16, 32, 4)), x2d, ("down_4 output",),
                            "library"),
    "monai-basicunet-plusplus": Case(_monai("BasicUNetPlusPlus", 2, 1, 2, features=(4, 4, 8, 16, 32, 4)), x2d,
                                     ("conv_4_0 output",), "library"),
    "monai-dynunet": Case(_monai("DynUNet", 2, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                 upsample_kernel_size=[2, 2, 2], filters=[4, 8, 16, 32]), x2d,
                          ("bottleneck output",), "library"),
    "monai-segresnet-2d": Case(_monai("SegResNet", 2, 8, 1, 2), x2d, ("down_layers.3 output",), "library"),
    "monai-segresnet-3d": Case(_monai("SegResNet", 3, 8, 1, 2, blocks_down=(1, 1, 1), blocks_up=(1, 1)), x3d,
                               ("down_layers.2 output",), "library"),
    "monai-flexibleunet-efficientnet": Case(_monai("FlexibleUNet", 1, 2, "efficientnet-b0",
                                                   decoder_channels=(32, 16, 8, 8, 4)), lambda: x2d(64),
                                            ("encoder output[-1]",), "channel-expanding blocks"),
    "monai-flexibleunet-resnet": Case(_monai("FlexibleUNet", 1, 2, "resnet10", decoder_channels=(32, 16, 8, 8, 4)),
                                      lambda: x2d(64), ("encoder output[-1]",), "library"),
    "monai-vnet-3d": Case(_monai("VNet", 3, 1, 2), lambda: x3d(32), ("down_tr256 output",), "library"),
    "monai-highresnet": Case(_monai("HighResNet", 2, 1, 2), x2d, (), "no downsampling"),
    # ---- nnU-Net (dynamic_network_architectures)
    "nnunet-plain-2d": Case(lambda: _nnunet(2), x2d, ("encoder.stages.3 output",), "library"),
    "nnunet-plain-3d": Case(lambda: _nnunet(3), x3d, ("encoder.stages.2 output",), "library"),
    "nnunet-residual-2d": Case(lambda: _nnunet(2, residual=True), x2d, ("encoder.stages.3 output",), "library"),
    # ---- torchvision
    "torchvision-deeplabv3": Case(_torchvision("deeplabv3_resnet50"), lambda: x2d(64, 3), ("backbone output['out']",),
                                  "head at the lowest resolution"),
    "torchvision-fcn": Case(_torchvision("fcn_resnet50"), lambda: x2d(64, 3), ("backbone output['out']",),
                            "head at the lowest resolution"),
    "torchvision-lraspp": Case(_torchvision("lraspp_mobilenet_v3_large"), lambda: x2d(64, 3),
                               ("backbone output['high']",), "channel-expanding blocks"),
    "torchvision-mobilenet-v2-unet": Case(hw.MobileNetUNet, lambda: x2d(64, 3), ("encoder.18 output",),
                                          "channel-expanding blocks"),
    # ---- smp: nine architectures over four encoder families
    "smp-unet-resnet": Case(_smp("Unet", "resnet18"), lambda: x2d(64), SMP, "library"),
    "smp-unetplusplus-efficientnet": Case(_smp("UnetPlusPlus", "efficientnet-b0"), lambda: x2d(64), SMP,
                                          "channel-expanding blocks"),
    "smp-manet-mobilenet": Case(_smp("MAnet", "mobilenet_v2"), lambda: x2d(64), SMP, "channel-expanding blocks"),
    "smp-linknet-resnet": Case(_smp("Linknet", "resnet18"), lambda: x2d(64), SMP, "library"),
    "smp-fpn-convnext": Case(_smp("FPN", "tu-convnext_atto"), lambda: x2d(64), SMP, "channel-expanding blocks"),
    "smp-pspnet-resnet": Case(_smp("PSPNet", "resnet18"), lambda: x2d(64), SMP, "head at the lowest resolution"),
    "smp-deeplabv3-resnet": Case(_smp("DeepLabV3", "resnet18"), lambda: x2d(64), SMP,
                                 "head at the lowest resolution"),
    "smp-deeplabv3plus-efficientnet": Case(_smp("DeepLabV3Plus", "tu-efficientnet_b0"), lambda: x2d(64), SMP,
                                           "channel-expanding blocks"),
    "smp-pan-resnet": Case(_smp("PAN", "resnet18"), lambda: x2d(128), SMP, "library"),
    "smp-upernet-convnext": Case(_smp("UPerNet", "tu-convnext_atto"), lambda: x2d(64), SMP,
                                 "channel-expanding blocks"),
    "smp-segformer-mit": Case(_smp("Segformer", "mit_b0"), lambda: x2d(64), SMP, "transformer"),
    # ---- timm features_only backbones under hand-written decoders
    "timm-resnet-unet": Case(_timm("resnet18"), lambda: x2d(64), SMP, "library"),
    "timm-efficientnet-fpn": Case(_timm("efficientnet_b0", decoder=hw.FeatureFPN), lambda: x2d(64), SMP,
                                  "channel-expanding blocks"),
    "timm-mobilenetv3-unet": Case(_timm("mobilenetv3_small_100"), lambda: x2d(64), SMP, "channel-expanding blocks"),
    "timm-convnext-unet": Case(_timm("convnext_atto"), lambda: x2d(64), SMP, "channel-expanding blocks"),
    "timm-regnet-unet": Case(_timm("regnetx_002"), lambda: x2d(64), SMP, "library"),
    "timm-densenet-unet": Case(_timm("densenet121"), lambda: x2d(64), SMP, "concatenation"),
    "timm-vit-dpt": Case(_timm("vit_tiny_patch16_224", decoder=hw.FeatureViT, img_size=64, out_indices=(-3, -2, -1)),
                         lambda: x2d(64), SMP, "transformer",
                         measured=("encoder output[-1]",)),
    # ---- hand-written
    "unet-1d": Case(lambda: hw.PlainUNet(dims=1), x1d, ("middle output",), "hand-written"),
    "unet-2d": Case(hw.PlainUNet, x2d, ("middle output",), "hand-written"),
    "unet-3d": Case(lambda: hw.PlainUNet(depth=2, dims=3), x3d, ("middle output",), "hand-written"),
    "unet-small-input": Case(lambda: hw.PlainUNet(depth=4), lambda: x2d(16), ("middle output",),
                             "small example input"),
    "unet-deep-supervision": Case(hw.DeepSupervisionUNet, lambda: x2d(16), ("middle output",), "side branch"),
    "oktay-attention-unet": Case(hw.OktayAttentionUNet, x2d, ("center output",), "side branch"),
    "subpixel-unet": Case(hw.SubPixelUNet, x2d, ("bottleneck output",), "sub-pixel decoder"),
    "subpixel-unet-flat": Case(lambda: hw.SubPixelUNet(flat=True), x2d, ("bottleneck output",), "sub-pixel decoder"),
    "tiramisu": Case(hw.Tiramisu, x2d, ("bottleneck output",), "concatenation"),
    "mednext-3d": Case(hw.MedNeXtLike, x3d, ("bottleneck output",), "channel-expanding blocks"),
    "flat-projection": Case(hw.FlatProjectionNet, x2d, ("stage2 output",), "narrowing projection"),
    "two-encoders": Case(hw.TwoEncoders, x2d, (), "parallel branches"),
    "two-encoders-merged": Case(hw.TwoEncodersMerged, x2d, ("up input[0]",), "hand-written"),
    "transunet-like": Case(hw.TransUNetLike, x2d, ("transformer output",), "transformer"),
    "no-downsampling": Case(hw.NoDownsampling, x2d, (), "no downsampling"),
    # ---- channels last and tokens: the layouts frem reads beside (N, C, *spatial)
    "timm-swin-unet": Case(_timm_swin(), lambda: x2d(64), ("encoder output[-1]" + LAST,), "channels last"),
    "timm-mambaout-unet": Case(_timm("mambaout_femto", decoder=hw.ChannelsLastFeatureUNet), lambda: x2d(64),
                               ("encoder output[-1]" + LAST,), "channels last",
                               # measured: the last stage's map, or its NCHW view the decoder takes (its 2x2
                               # grid a conv made, so the view reads as a map too; Swin's merges make theirs)
                               measured=("encoder output[-1]" + LAST, "decoder input[0][3]")),
    "timm-maxvit-unet": Case(_timm("maxvit_tiny_tf_224", img_size=64, embed_dim=(32, 32, 64, 64), depths=(1, 1, 1, 1),
                                   stem_width=16), lambda: x2d(64), SMP, "transformer"),
    "torchvision-swin-unet": Case(hw.TorchvisionSwinUNet, lambda: x2d(64, 3), ("encoder.7 output" + LAST,),
                                  "channels last"),
    "smp-dpt-vit": Case(_smp("DPT", "tu-vit_tiny_patch16_224", dynamic_img_size=True), lambda: x2d(64),
                        ("encoder output[0][-1]",), "transformer"),
    "swin-unet-like": Case(hw.SwinUNetLike, x2d, ("bottleneck output" + LAST,), "tokens"),
    "hybrid-token-bottleneck": Case(hw.HybridTokenBottleneck, x2d, ("transformer output" + LAST, "up2 input[0]"),
                                    "tokens"),
    # ---- issue 28, kinds 2-5 and their neighbours: decoders that start at the bottleneck's grid,
    # context from ordinary pools, search spaces and shared stems, dense blocks, two decoders
    "resunetpp-2d": Case(lit.ResUNetPlusPlus, x2d, ("bridge output",), "decoder starts at the bottleneck"),
    "resunetpp-3d": Case(lambda: lit.ResUNetPlusPlus(dims=3), x3d, ("bridge output",),
                         "decoder starts at the bottleneck"),
    # the context extractor (DAC, then RMP's pyramid of fixed-kernel pools) hands the decoder its map
    "ce-net": Case(lit.CENet, lambda: x2d(96), ("rmp output",), "pyramid of ordinary pools"),
    # the deepest map is pooled by code no module hands over; the pool's input stands for it
    "segnet": Case(lit.SegNet, x2d, ("encoders.2 output",), "pool indices"),
    "unet3plus": Case(lit.UNet3Plus, x2d, ("encoders.4 output",), "full-scale skips"),
    # the decoder's first conv works at the token stage's grid and narrows it before an upsampling no
    # module makes: encoder or decoder, structure cannot say (as flat-projection); the refusal names both
    "unext": Case(lit.UNeXt, x2d, ("norm output" + LAST, "bottleneck output" + LAST), "tokens"),
    "multiresunet": Case(lit.MultiResUNet, x2d, ("bottom output",), "concatenation"),
    # two U-Nets in sequence, each its own bottleneck: the first is a detour through the lowest
    # resolution on the way to the second, whose bottleneck frem takes (as for stacked hourglasses)
    "double-unet": Case(lit.DoubleUNet, x2d, ("second.middle output", "first.middle output"), "hand-written"),
    # a CNN and a transformer branch fused at the lowest resolution: the fused map, or its conv
    "transfuse-like": Case(lit.ParallelBranches, x2d, ("fuse input[0]", "fuse output"), "parallel branches"),
    # DiNTS: the input enters every resolution through a stem of its own and the cells move up and down
    # between them; no map at the lowest resolution is on every path. Its deepest output, where the
    # decoding stems start, is the right site, and the refusal names it first.
    "monai-dints-2d": Case(_dints(2), lambda: x2d(64), ("dints_space output[2]",), "search-space cells"),
    "monai-quicknat": Case(_quicknat(), lambda: x2d(64),
                           ("model.1.submodule.1.submodule.1.submodule.1.submodule.layers2 output",), "dense block"),
    "monai-segresnetds-2d": Case(_monai("SegResNetDS", spatial_dims=2, init_filters=4, in_channels=1, out_channels=2,
                                        blocks_down=(1, 1, 1)), x2d, ("encoder output[-1]",), "library"),
    "monai-segresnetds2-2d": Case(_monai("SegResNetDS2", spatial_dims=2, init_filters=4, in_channels=1,
                                         out_channels=2, blocks_down=(1, 1, 1)), x2d, ("encoder output[-1]",),
                                  "two decoders"),
    "monai-segresnetds2-3d": Case(_monai("SegResNetDS2", spatial_dims=3, init_filters=4, in_channels=1,
                                         out_channels=2, blocks_down=(1, 1, 1)), x3d, ("encoder output[-1]",),
                                  "two decoders"),
    "monai-segresnetvae": Case(_monai("SegResNetVAE", input_image_size=(32, 32), spatial_dims=2, init_filters=8,
                                      in_channels=1, out_channels=2), x2d, ("down_layers.3 output",), "library"),
    "monai-mednext-2d": Case(_monai("MedNeXt", spatial_dims=2, init_filters=4, in_channels=1, out_channels=2,
                                    blocks_down=(1, 1, 1, 1), blocks_bottleneck=1, blocks_up=(1, 1, 1, 1)),
                             x2d, ("bottleneck output",), "channel-expanding blocks"),
    # smp's remaining encoder families (the SE encoders the segmentation app defaults to among them)
    "smp-unet-se-resnet": Case(_smp("Unet", "se_resnet50"), lambda: x2d(64), SMP, "library"),
    "smp-unet-vgg": Case(_smp("Unet", "vgg11"), lambda: x2d(64), SMP, "library"),
    "smp-unet-densenet": Case(_smp("Unet", "densenet121"), lambda: x2d(64), SMP, "concatenation"),
    "smp-unet-dpn": Case(_smp("Unet", "dpn68"), lambda: x2d(64), SMP, "concatenation"),
    "smp-unet-mobileone": Case(_smp("Unet", "mobileone_s0"), lambda: x2d(64), SMP, "library"),
    "smp-unet-skresnet": Case(_smp("Unet", "timm-skresnet18"), lambda: x2d(64), SMP, "library"),
    "smp-unet-xception": Case(_smp("Unet", "xception"), lambda: x2d(64), SMP, "library"),
    # timm families beside the corpus's: another NHWC one, hybrids with attention at the bottom
    "timm-swinv2-unet": Case(_timm_swinv2(), lambda: x2d(64), ("encoder output[-1]" + LAST,), "channels last"),
    "timm-efficientvit-unet": Case(_timm("efficientvit_b0"), lambda: x2d(64), SMP, "transformer"),
    # found trying networks outside the corpus: tokens after a class token (read as 65 channels on 8x8
    # before), a bottleneck two modules take in (FREM went on the gating conv's input), parallel streams
    "class-token-bottleneck": Case(lit.ClassTokenBottleneck, x2d, ("vit output" + LAST,), "tokens"),
    "attention-unet-3d": Case(lit.AttentionUNet3D, x3d, ("up2 input[0]",), "attention gates"),
    "hrnet-like": Case(lit.HRNetLike, x2d, (), "parallel branches"),
    "restormer-like": Case(lit.RestormerLike, x2d, ("latent output",), "sub-pixel decoder"),
    "timm-mobilenetv4-unet": Case(_timm("mobilenetv4_conv_small"), lambda: x2d(64), SMP, "channel-expanding blocks"),
    "timm-repvit-unet": Case(_timm("repvit_m1"), lambda: x2d(64), SMP, "channel-expanding blocks"),
    "timm-hgnetv2-unet": Case(_timm("hgnetv2_b0"), lambda: x2d(64), SMP, "concatenation"),
    "timm-coatnet-unet": Case(_timm("coatnet_nano_rw_224", img_size=64), lambda: x2d(64), SMP, "transformer"),
}

# Where the measured rule alone refuses, each with a phrase of its reason: a structure it cannot read
# (a head at the lowest resolution, a narrowing projection, parallel paths, an encoder that may go on).
# On every other network of the corpus it picks, and picks right: refusing more is a bug too.
NARROWER = "is narrower than an earlier one"
AS_WIDE = "as wide or wider, are made from it"
MEASURED_REFUSALS = {
    # UNETR: its ViT's hidden states are token maps at the patch grid, each feeding a decoder path of its own
    "monai-unetr": "lie on parallel paths", "smp-pan-resnet": AS_WIDE, "timm-vit-dpt": AS_WIDE,
    "smp-dpt-vit": AS_WIDE,
    "torchvision-deeplabv3": NARROWER, "torchvision-fcn": NARROWER, "smp-deeplabv3-resnet": NARROWER,
    "flat-projection": NARROWER,
    "smp-pspnet-resnet": "nothing with weights works at a higher resolution",
    "two-encoders": "lie on parallel paths",
    "monai-highresnet": "never lowers the resolution", "no-downsampling": "never lowers the resolution",
    "unext": NARROWER, "monai-dints-2d": "lie on parallel paths", "hrnet-like": "lie on parallel paths",
}


def resolve(found, text: str):
    """The surveyed map a ``Site.describe()`` text names (negative entries counted from the end)."""
    from frem.sites import get_entry
    full, text = text, re.sub(r" \(channels in dim -?\d+\)$", "", text)
    layer, rest = text.split(" ", 1)
    layer = "" if layer == "<model>" else layer
    at = rest.split("[")[0]
    entry = tuple(ast.literal_eval(key) for key in re.findall(r"\[([^\]]+)\]", rest))
    if at == "output" and layer in found.module_outputs:
        return found.maps.get(get_entry(found.module_outputs[layer], entry).grad_fn)
    return next((m for m in found.maps.values() for s in m.sites if s.describe() in (text, full)), None)
