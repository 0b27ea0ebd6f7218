"""Bottlenecks of the libraries that name theirs: read off the model, no forward pass.

Each rule checks the library's own class (by name and, where a look-alike is
likely, by the module it comes from) and returns the ``Site`` or ``None``.
"""

from __future__ import annotations

from torch import nn

from frem.sites import Site


def _library(model: nn.Module, package: str) -> bool:
    return type(model).__module__.split(".")[0] == package


def _smp(model):
    encoder = getattr(model, "encoder", None)
    out = getattr(encoder, "out_channels", None)
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], int):
        # smp's ViT encoder (DPT) returns (features, prefix tokens): the deepest map is features[-1],
        # output[-1] would be the list of class/register tokens.
        entry = (0, -1) if type(encoder).__name__ == "TimmViTEncoder" else (-1,)
        return Site("encoder", entry=entry, channels=int(out[-1]))
    return None


# timm's feature formats (timm.layers.Format) and where each keeps the channels.
TIMM_FORMATS = {"NCHW": 1, "NCL": 1, "NHWC": -1, "NLC": -1}


def _timm_features(model):
    # Every features_only net (FeatureListNet, FeatureDictNet, FeatureHookNet,
    # FeatureGetterNet, EfficientNetFeatures, ...) carries a FeatureInfo; a
    # plain timm model's feature_info is a list.
    # Swin, MambaOut and other NHWC families say so in output_fmt: their maps are (N, H, W, C).
    info = getattr(model, "feature_info", None)
    if _library(model, "timm") and callable(getattr(info, "channels", None)):
        fmt = getattr(model, "output_fmt", "NCHW")
        fmt = str(getattr(fmt, "value", fmt))
        if fmt not in TIMM_FORMATS:
            raise ValueError(f"timm's {type(model).__name__} returns features as {fmt!r}, a layout frem does not "
                             "know: pass dim=<the channel dim> to frem.attach (1 for NCHW, -1 for channels last)")
        returns_dict = type(model).__name__ == "FeatureDictNet" or getattr(model, "return_dict", False)
        # A dict's deepest entry is picked at the first training call.
        return Site("", entry=None if returns_dict else (-1,), channels=int(info.channels()[-1]),
                    dim=TIMM_FORMATS[fmt])
    return None


def _monai_unet(model):
    # UNet and AttentionUnet nest each level in the one above: the bottom is the
    # submodule of the innermost SkipConnection / AttentionLayer.
    if type(model).__name__ not in ("UNet", "AttentionUnet") or not _library(model, "monai"):
        return None
    path, node = "model", getattr(model, "model", None)
    while isinstance(node, nn.Sequential):  # the bottom itself may be a Sequential (MONAI's Convolution)
        nested = next(((i, child) for i, child in enumerate(node)
                       if type(child).__name__ in ("SkipConnection", "AttentionLayer")), None)
        if nested is None:
            break
        path, node = f"{path}.{nested[0]}.submodule", nested[1].submodule
    if path == "model" or not isinstance(node, nn.Module):
        return None
    channels = getattr(model, "channels", None)
    return Site(path, channels=int(channels[-1]) if isinstance(channels, (list, tuple)) and channels else None)


def _monai_dynunet(model):
    if type(model).__name__ == "DynUNet" and isinstance(getattr(model, "bottleneck", None), nn.Module):
        return Site("bottleneck", channels=int(model.filters[-1]))
    return None


def _monai_unetr(model):
    # The ViT's last hidden state becomes a feature map only inside proj_feat,
    # which no module outputs: decoder5's first input is that map.
    if type(model).__name__ == "UNETR" and hasattr(model, "proj_feat") and hasattr(model, "decoder5"):
        return Site("decoder5", at="input", entry=(0,), channels=int(model.hidden_size))
    return None


def _nnunet(model):
    encoder = getattr(model, "encoder", None)
    stages = getattr(encoder, "stages", None)
    channels = getattr(encoder, "output_channels", None)
    if isinstance(stages, nn.Sequential) and isinstance(channels, (list, tuple)) and hasattr(model, "decoder"):
        return Site(f"encoder.stages.{len(stages) - 1}", channels=int(channels[-1]))
    return None


def _torchvision_segmentation(model):
    backbone = getattr(model, "backbone", None)
    names = getattr(backbone, "return_layers", None)
    if type(backbone).__name__ == "IntermediateLayerGetter" and isinstance(names, dict):
        key = "high" if "high" in names.values() else "out"  # lraspp names its deepest map "high"
        if key in names.values():
            return Site("backbone", entry=(key,))
    return None


def _transformers_dpt(model):
    # DPT's neck reassembles the ViT's hidden states at backbone_out_indices (the deepest at 1/32, by a strided
    # conv inside the neck): the bottleneck is the last of those layers' output, tokens (N, 1 + L, C).
    config = getattr(model, "config", None)
    layers = getattr(getattr(getattr(model, "dpt", None), "encoder", None), "layer", None)
    indices = getattr(config, "backbone_out_indices", None)
    if (_library(model, "transformers") and type(model).__name__.startswith("DPTFor") and indices
            and isinstance(layers, nn.ModuleList) and max(indices) < len(layers)):
        return Site(f"dpt.encoder.layer.{max(indices)}", channels=int(config.hidden_size), dim=-1)
    return None


def _transformers_beit(model):
    # BEiT and data2vec-vision semantic segmentation: the ViT's hidden states at out_indices become maps (CLS
    # token dropped) for an FPN neck, whose last op max-pools the deepest to 1/32. FREM goes on that map as the
    # neck takes it in (scaling commutes with the pool).
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not (_library(model, "transformers") and type(model).__name__ in ("BeitForSemanticSegmentation",
                                                                          "Data2VecVisionForSemanticSegmentation")
            and isinstance(hidden, int)):
        return None
    if isinstance(getattr(model, "fpn", None), nn.Module):  # one neck taking the four maps (transformers 5)
        return Site("fpn", at="input", entry=(0, -1), channels=hidden)
    if isinstance(getattr(model, "fpn4", None), nn.Module):  # four ops, one a map
        return Site("fpn4", at="input", entry=(0,), channels=hidden)
    return None


def _monai_diffusion_unet(model):
    # MONAI's diffusion U-Net: the down blocks push every block's output to the skip stack, and the middle block
    # (residual blocks around attention) hands the up blocks their first input.
    if type(model).__name__ == "DiffusionModelUNet" and _library(model, "monai") and \
            isinstance(getattr(model, "middle_block", None), nn.Module):
        channels = getattr(model, "block_out_channels", None)
        return Site("middle_block", channels=int(channels[-1]) if isinstance(channels, (list, tuple)) else None)
    return None


def _transformers_backbone(model):
    # transformers' backbones (ResNetBackbone, ConvNextBackbone, SwinBackbone, ... what UperNet, MaskFormer,
    # Mask2Former and OneFormer build on) return BackboneOutput(feature_maps=(...)), NCHW, deepest last.
    channels = getattr(model, "channels", None)
    if (_library(model, "transformers") and type(model).__name__.endswith("Backbone")
            and isinstance(channels, (list, tuple)) and channels and hasattr(model, "out_features")):
        return Site("", entry=("feature_maps", -1), channels=int(channels[-1]))
    return None


def _cellpose_cpnet(model):
    # Cellpose 3's U-Net: downsample returns its four levels, the last the deepest (make_style pools it into the
    # style vector, upsample decodes from it with the others as skips).
    nbase = getattr(model, "nbase", None)
    if (_library(model, "cellpose") and type(model).__name__ in ("CPnet", "CPnetBioImageIO")
            and isinstance(getattr(model, "downsample", None), nn.Module) and isinstance(nbase, (list, tuple))):
        return Site("downsample", entry=(-1,), channels=int(nbase[-1]))
    return None


RULES = (_smp, _timm_features, _monai_unet, _monai_dynunet, _monai_unetr, _monai_diffusion_unet, _nnunet,
         _torchvision_segmentation, _transformers_dpt, _transformers_beit, _transformers_backbone, _cellpose_cpnet)

# Library models with no bottleneck in the paper's sense, and why: frem refuses "bottleneck" there by name.
NO_DECODER = {
    ("cellpose", "CPSAM"): "Cellpose-SAM (what Cellpose 4 trains) is a ViT encoder read out by a transposed "
                           "convolution: it has no decoder and no skip connections, so the paper's premise (the "
                           "decoder leans on the skips and leaves the bottleneck's channels unused, and FREM makes "
                           "it use them) does not apply. Train Cellpose 3's CPnet, a U-Net, with FREM",
    ("cellpose", "CPDINO"): "Cellpose's DINO model is a ViT encoder read out by a transposed convolution: it has no "
                            "decoder and no skip connections, so the paper's premise does not apply",
}
# nnU-Net's Primus family (Primus, PrimusS/B/M/L/X, PrimusV2..., PrimusV3...): a ViT encoder and a patch decoder.
PRIMUS = ("an EVA ViT encoder read out by a patch decoder (transposed convolutions): it has no skip connections, so "
          "the paper's premise (the decoder leans on the skips and leaves the bottleneck's channels unused) does "
          "not apply")


def known_refusal(model: nn.Module) -> str | None:
    """Why a library model has no bottleneck for FREM, where frem knows it by name; else None."""
    for module in model.modules():
        library, name = type(module).__module__.split(".")[0], type(module).__name__
        reason = NO_DECODER.get((library, name))
        if reason is None and library == "dynamic_network_architectures" and name.startswith("Primus"):
            reason = f"nnU-Net's {name} is {PRIMUS}"
        if reason is not None:
            return reason
    return None


# Rules for a library encoder alone (its features, for a decoder someone else wrote): where one matches inside
# a model, it names the bottleneck only if that encoder is the whole encoder, which frem checks by measuring.
ENCODER_RULES = (_timm_features, _transformers_backbone)


def known_bottleneck(model: nn.Module, *, inner_encoder: bool = False):
    """The bottleneck of a library that names it, at the model or in the outermost module that is one.
    ``inner_encoder=True``: (site, whether it is a library encoder inside the model), or None."""
    for prefix, module in model.named_modules():
        for rule in RULES:
            site = rule(module)
            if site is not None:
                layer = ".".join(p for p in (prefix, site.layer) if p)
                found = Site(layer, site.at, site.entry, site.channels, site.dim)
                return (found, bool(prefix) and rule in ENCODER_RULES) if inner_encoder else found
    return None
