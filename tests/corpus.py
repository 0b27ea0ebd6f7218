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
import recent

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


def _torchvision_aux(name):
    from torchvision.models import segmentation
    return lambda: getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=2, aux_loss=True)


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


def _hf(model, config, **kwargs):
    """A transformers model built from a tiny config of its own (random init: no weights are downloaded)."""
    def build():
        if not os.environ.get("CI"):
            pytest.importorskip("transformers", reason='needs the hf extra: pip install -e ".[hf]"')
        import transformers
        options = dict(kwargs)
        nested = {key: getattr(transformers, name)(**values) for key, (name, values) in options.pop("nested", {}).items()}
        return getattr(transformers, model)(getattr(transformers, config)(**nested, **options))
    return build


def _swin(**kwargs):
    return {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4, "image_size": 64,
            "out_features": ["stage1", "stage2", "stage3", "stage4"], **kwargs}


HF_VIT = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
          "intermediate_size": 64}


def _resenc(dims=2, deep_supervision=False):
    """nnU-Net's ResEnc preset shape (residual encoder, 1-3-4-6-6 blocks), tiny widths."""
    def build():
        if not os.environ.get("CI"):
            pytest.importorskip("dynamic_network_architectures", reason='needs the nnunet extra: pip install -e ".[nnunet]"')
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
        conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dims == 2 else (nn.Conv3d, nn.InstanceNorm3d)
        n = 5 if dims == 2 else 4
        return ResidualEncoderUNet(1, n, (4, 8, 16, 32, 32)[:n], conv, 3, (1, 2, 2, 2, 2)[:n], (1, 3, 4, 6, 6)[:n], 2,
                                   (1,) * (n - 1), True, norm, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                                   {"inplace": True}, deep_supervision=deep_supervision)
    return build


def _primus():
    if not os.environ.get("CI"):
        pytest.importorskip("dynamic_network_architectures", reason='needs the nnunet extra: pip install -e ".[nnunet]"')
    from dynamic_network_architectures.architectures.primus import Primus
    return Primus(1, 48, (8, 8, 8), 2, eva_depth=2, eva_numheads=2, input_shape=(32, 32, 32))


def _cellpose(major: int):
    """Skip where Cellpose ``major`` is not the one installed (3 and 4 cannot share an environment: .ci/run runs
    each where it is); fail where FREM_CELLPOSE names this version (the environment CI set up for it) or CI
    has no Cellpose at all."""
    try:
        from cellpose import version
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail('CI must have Cellpose: pip install -e ".[cellpose]"')
        pytest.skip(f'needs Cellpose {major}: ' + ('pip install -e ".[cellpose]"' if major == 4
                                                   else 'pip install "cellpose>=3,<4"'))
    installed = int(str(getattr(version, "version", version)).split(".")[0])
    if installed != major:
        reason = f"needs Cellpose {major} (here {installed})"
        if os.environ.get("FREM_CELLPOSE") == str(major):
            pytest.fail(f"this environment must have {reason}")
        pytest.skip(reason)


def _cellpose_sam():
    """Cellpose 4's Cellpose-SAM, its SAM ViT-L encoder built tiny (the same class, random init)."""
    _cellpose(4)
    from cellpose import vit
    from segment_anything.modeling import ImageEncoderViT

    class TinySam:
        def __init__(self, _checkpoint):
            self.image_encoder = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                                 out_chans=16, window_size=0, global_attn_indexes=())
    registry = dict(vit.sam_model_registry)
    vit.sam_model_registry["vit_l"] = TinySam
    try:
        return vit.CPSAM(ps=8, nout=3, bsize=64)
    finally:
        vit.sam_model_registry.clear()
        vit.sam_model_registry.update(registry)


def _cellpose_cpnet():
    """Cellpose 3's CPnet (its U-Net): only where Cellpose 3 is installed (.ci/run's side venv)."""
    _cellpose(3)
    from cellpose import resnet_torch
    return resnet_torch.CPnet(nbase=[2, 8, 16, 24, 32], nout=3, sz=3)


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
    # ---- issue 35: the library models people train now, built from their configs; and the kinds of network
    # where FREM ran without its effect reaching the loss, or frem refused clear structure
    # transformers: semantic heads over MiT, ConvNeXt, Swin and ViT; instance and universal heads over Swin and
    # ResNet backbones. SegFormer returns its last hidden state twice (as last_hidden_state, and in the
    # hidden_states its head reads): the stage's own output is the site, the returned entry is refused.
    "hf-segformer": Case(_hf("SegformerForSemanticSegmentation", "SegformerConfig", num_labels=3,
                             hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                             decoder_hidden_size=32), lambda: x2d(64, 3), ("segformer.stages.3 output",),
                         "returned twice"),
    "hf-upernet-convnext": Case(_hf("UperNetForSemanticSegmentation", "UperNetConfig", num_labels=3,
                                    hidden_size=16, use_auxiliary_head=True, auxiliary_in_channels=24,
                                    auxiliary_channels=16, nested={"backbone_config": ("ConvNextConfig", {
                                        "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1],
                                        "out_features": ["stage1", "stage2", "stage3", "stage4"]})}),
                                lambda: x2d(64, 3), ("backbone output['feature_maps'][-1]",), "library"),
    "hf-upernet-swin": Case(_hf("UperNetForSemanticSegmentation", "UperNetConfig", num_labels=3, hidden_size=16,
                                use_auxiliary_head=False, nested={"backbone_config": ("SwinConfig", _swin())}),
                            lambda: x2d(64, 3), ("backbone output['feature_maps'][-1]",), "transformer"),
    "hf-dpt-vit": Case(_hf("DPTForSemanticSegmentation", "DPTConfig", num_labels=3, **HF_VIT,
                           backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 24, 32],
                           fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], use_auxiliary_head=False),
                       lambda: x2d(64, 3), ("dpt.encoder.layer.3 output" + LAST,), "transformer"),
    "hf-beit": Case(_hf("BeitForSemanticSegmentation", "BeitConfig", num_labels=3, **HF_VIT, out_indices=[1, 2, 3, 4],
                        use_auxiliary_head=False, pool_scales=[1, 2]), lambda: x2d(64, 3),
                    ("fpn input[0][-1]",), "transformer"),
    # measured: the deepest map max-pooled by the neck's last op, or that op's input (scaling commutes with it)
    "hf-data2vec-vision": Case(_hf("Data2VecVisionForSemanticSegmentation", "Data2VecVisionConfig", num_labels=3,
                                   **HF_VIT, out_indices=[1, 2, 3, 4], use_auxiliary_head=False, pool_scales=[1, 2]),
                               lambda: x2d(64, 3), ("fpn4 input[0]",), "transformer",
                               measured=("fpn4 output", "fpn4 input[0]")),
    "hf-maskformer-swin": Case(_hf("MaskFormerForInstanceSegmentation", "MaskFormerConfig", num_labels=3,
                                   fpn_feature_size=32, mask_feature_size=32, nested={
                                       "backbone_config": ("SwinConfig", _swin()),
                                       "decoder_config": ("DetrConfig", {
                                           "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                                           "decoder_attention_heads": 2, "encoder_attention_heads": 2,
                                           "decoder_ffn_dim": 32, "encoder_ffn_dim": 32, "num_queries": 16})}),
                               lambda: x2d(64, 3), ("model.pixel_level_module.encoder output['feature_maps'][-1]",),
                               "returned twice"),
    "hf-mask2former-swin": Case(_hf("Mask2FormerForUniversalSegmentation", "Mask2FormerConfig", num_labels=3,
                                    hidden_dim=32, num_queries=16, encoder_layers=1, decoder_layers=2,
                                    mask_feature_size=32, feature_size=32, dim_feedforward=64,
                                    encoder_feedforward_dim=64, num_attention_heads=2,
                                    nested={"backbone_config": ("SwinConfig", _swin())}),
                                lambda: x2d(64, 3), ("model.pixel_level_module.encoder output['feature_maps'][-1]",),
                                "object queries"),
    "hf-mask2former-resnet": Case(_hf("Mask2FormerForUniversalSegmentation", "Mask2FormerConfig", num_labels=3,
                                      hidden_dim=32, num_queries=16, encoder_layers=1, decoder_layers=2,
                                      mask_feature_size=32, feature_size=32, dim_feedforward=64,
                                      encoder_feedforward_dim=64, num_attention_heads=2, nested={
                                          "backbone_config": ("ResNetConfig", {
                                              "embedding_size": 8, "hidden_sizes": [8, 16, 24, 32],
                                              "depths": [1, 1, 1, 1], "layer_type": "basic",
                                              "out_features": ["stage1", "stage2", "stage3", "stage4"]})}),
                                  lambda: x2d(64, 3), ("model.pixel_level_module.encoder output['feature_maps'][-1]",),
                                  "object queries"),
    # a DeepLabV3 head (ASPP) on a MobileViT: no decoder, no bottleneck in the paper's sense
    "hf-mobilevit-deeplab": Case(_hf("MobileViTForSemanticSegmentation", "MobileViTConfig", num_labels=3,
                                     image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                     aspp_out_channels=16), lambda: x2d(64, 3), (), "head at the lowest resolution"),
    # torchvision's segmentation models with their auxiliary heads (on the backbone's layer3, in training)
    "torchvision-deeplabv3-aux": Case(_torchvision_aux("deeplabv3_resnet50"), lambda: x2d(64, 3),
                                      ("backbone output['out']",), "head at the lowest resolution"),
    "torchvision-fcn-aux": Case(_torchvision_aux("fcn_resnet50"), lambda: x2d(64, 3), ("backbone output['out']",),
                                "head at the lowest resolution"),
    "torchvision-deeplabv3-mobilenet": Case(_torchvision_aux("deeplabv3_mobilenet_v3_large"), lambda: x2d(64, 3),
                                            ("backbone output['out']",), "head at the lowest resolution"),
    # nnU-Net's residual encoder presets and its Primus transformer (no skips: refused by name, with the reason)
    "nnunet-resenc-2d": Case(_resenc(2), lambda: x2d(64), ("encoder.stages.4 output",), "library"),
    "nnunet-resenc-3d-deep-supervision": Case(_resenc(3, True), lambda: x3d(32), ("encoder.stages.3 output",),
                                              "side branch"),
    "nnunet-primus-3d": Case(_primus, lambda: x3d(32), (), "no skip connections"),
    # Cellpose: CPnet's style vector is a pool whose kernel is the whole map (global context, not the
    # bottleneck); Cellpose-SAM has no decoder and no skips (refused by name)
    "cellpose-cpnet": Case(_cellpose_cpnet, lambda: x2d(64, 2), ("downsample output[-1]",), "global pool by kernel"),
    "cellpose-sam": Case(_cellpose_sam, lambda: x2d(64, 3), (), "no skip connections"),
    "cpnet-like": Case(recent.CPnetLike, x2d, ("downs.2 output",), "global pool by kernel"),
    # MONAI networks the corpus lacked: the diffusion U-Net (known by name: its middle block), AHNet, SwinUNETR v2,
    # 3-D attention U-Net, SegResNetDS and BasicUNet in 3-D
    "monai-diffusion-unet": Case(_monai("DiffusionModelUNet", spatial_dims=2, in_channels=1, out_channels=1,
                                        num_res_blocks=1, channels=(8, 16, 16), attention_levels=(False, False, True),
                                        norm_num_groups=8, num_head_channels=8),
                                 lambda: (x2d(32), torch.randint(0, 1000, (2,))), ("middle_block output",),
                                 "library"),
    "monai-ahnet-2d": Case(_monai("AHNet", spatial_dims=2, in_channels=1, out_channels=2, layers=(1, 1, 1, 1)),
                           lambda: x2d(128), ("layer4 output",), "library"),
    "monai-swinunetr-v2": Case(_monai("SwinUNETR", in_channels=1, out_channels=2, feature_size=12, spatial_dims=2,
                                      depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), use_v2=True), lambda: x2d(64),
                               ("encoder10 output",), "transformer"),
    "monai-attention-unet-3d": Case(_monai("AttentionUnet", 3, 1, 2, channels=(4, 8, 16), strides=(2, 2)), x3d,
                                    (MONAI_UNET_3D,), "attention gates"),
    "monai-segresnetds-3d": Case(_monai("SegResNetDS", spatial_dims=3, init_filters=4, in_channels=1, out_channels=2,
                                        blocks_down=(1, 1, 1)), x3d, ("encoder output[-1]",), "library"),
    "monai-basicunet-3d": Case(_monai("BasicUNet", 3, 1, 2, features=(4, 4, 8, 16, 32, 4)), lambda: x3d(32),
                               ("down_4 output",), "library"),
    # hand-written kinds of the literature (tests/recent.py)
    "timm-transunet": Case(recent.TimmTransUNet, lambda: x2d(64), ("fold output", "fold input[0]"),
                           "library encoder inside"),
    "ternausnet": Case(recent.TernausNet, x2d, ("center input[0]",), "nested consumers"),
    "hardnet-mseg": Case(recent.HarDNetMSEG, lambda: x2d(64), ("stages.3 output",), "context block"),
    # a MiT-like token stage whose blocks widen their tokens 4x in an MLP (a 4C that is a finer grid's size): the
    # widened tokens are the block's inside, at the tokens' grid, not a finer map
    "token-stage": Case(recent.TokenStageNet, lambda: x2d(64), ("up input[0]", "norm output" + LAST),
                        "tokens"),
    "monai-unetr-3d": Case(_monai("UNETR", 1, 2, img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96,
                                  num_heads=4, spatial_dims=3), lambda: x3d(32), ("decoder5 input[0]",), "transformer"),
    # the deepest map pooled by code from a map that is also the skip: no site, and no stand-in (SegNet's is one)
    "pool-read-twice": Case(recent.PoolReadTwice, x2d, (), "pool indices"),
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
    # DeepLabV3's ASPP is a context block over the backbone's map, so the backbone's map is the pick, and no
    # decoder follows it: a head at the lowest resolution
    "torchvision-deeplabv3": "nothing with weights works at a higher resolution", "torchvision-fcn": NARROWER,
    "smp-deeplabv3-resnet": "nothing with weights works at a higher resolution",
    "flat-projection": NARROWER,
    "smp-pspnet-resnet": "nothing with weights works at a higher resolution",
    "two-encoders": "lie on parallel paths",
    "monai-highresnet": "never lowers the resolution", "no-downsampling": "never lowers the resolution",
    "unext": NARROWER, "monai-dints-2d": "lie on parallel paths", "hrnet-like": "lie on parallel paths",
    "pool-read-twice": "no module boundary on the main path",
    # issue 35's: names settle what structure leaves open (a ViT's hidden states feed a neck of their own, a
    # backbone's maps feed a pixel decoder beside object queries); without a decoder, nothing to pick
    "hf-dpt-vit": AS_WIDE, "hf-beit": AS_WIDE, "monai-unetr-3d": AS_WIDE,
    "hf-mask2former-swin": "lie on parallel paths", "hf-mask2former-resnet": "lie on parallel paths",
    "hf-mobilevit-deeplab": "nothing with weights works at a higher resolution", "monai-diffusion-unet": AS_WIDE,
    "torchvision-deeplabv3-aux": "nothing with weights works at a higher resolution",
    "torchvision-fcn-aux": "nothing with weights works at a higher resolution",
    "torchvision-deeplabv3-mobilenet": "nothing with weights works at a higher resolution",
}


# Refused by name, with the reason (no decoder or no skip connections: the paper's premise does not apply).
NAMED_REFUSALS = {"nnunet-primus-3d": "no skip connections", "cellpose-sam": "no skip connections"}


def layout(text: str) -> int:
    """The channel dim a corpus site text says: -1 where it ends in ``LAST``, else 1."""
    return -1 if text.endswith(LAST) else 1


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
    exact = next((m for m in found.maps.values() for s in m.sites if s.describe() in (text, full)), None)
    if exact is not None or not any(isinstance(key, int) and key < 0 for key in entry):
        return exact
    # a negative index into an input's list, counted from its end over the entries the survey saw
    sites = [(m, s) for m in found.maps.values() for s in m.sites
             if s.layer == layer and s.at == at and s.entry and len(s.entry) == len(entry)]
    for m, s in sites:
        if all(key == got or (isinstance(key, int) and key < 0 and got == 1 + key + max(
                o.entry[i] for _, o in sites if o.entry[:i] == s.entry[:i] and isinstance(o.entry[i], int)))
               for i, (key, got) in enumerate(zip(entry, s.entry))):
            return m
    return None
