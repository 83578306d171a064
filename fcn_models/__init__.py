"""Fully convolutional networks for lane-marking segmentation (pure PyTorch, no I/O).

Weights come in as state_dict mappings; loading files or downloading is the caller's job
(``pipelines.weights``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .fcn_resnet import FCN8sResNet, FCN8sResNet101, ResNet101Backbone, ResNetBackbone
from .fcn_vgg import FCN8s, FCN16s, FCN32s
from .upsampling import (
    aligned_bilinear_upsampling,
    bilinear_kernel,
    bilinear_upsampling,
    conv_output_size,
    conv_transpose_output_size,
    pool_output_size,
    upsample_aligned,
)
from .vgg import VGG16, VGG16Conv, check_n_class, convolutionalize, vgg16_feature_sizes

__all__ = [
    "FCN8s",
    "FCN8sResNet",
    "FCN8sResNet101",
    "FCN16s",
    "FCN32s",
    "MODEL_NAMES",
    "ResNet101Backbone",
    "ResNetBackbone",
    "VGG16",
    "VGG16Conv",
    "aligned_bilinear_upsampling",
    "bilinear_kernel",
    "bilinear_upsampling",
    "build_model",
    "conv_output_size",
    "conv_transpose_output_size",
    "convolutionalize",
    "pool_output_size",
    "upsample_aligned",
    "vgg16_feature_sizes",
]

MODEL_NAMES: tuple[str, ...] = (
    "fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce", "fcn8s_resnet101", "fcn8s_resnet18",
)  # fmt: skip

_OPTS = frozenset({"backbone_weights"})


def build_model(name: str, n_class: int, **opts: Any) -> nn.Module:
    """A segmentation model by name (one of ``MODEL_NAMES``).

    ``backbone_weights`` (optional): for the VGG FCNs a ``VGG16`` / torchvision vgg16
    state_dict (or a ``VGG16`` module), copied into conv1..fc7 via ``copy_params_from_vgg16``;
    for ``fcn8s_resnet101`` / ``fcn8s_resnet18`` a torchvision resnet101 / resnet18 state_dict. Raises ValueError for an
    unknown name or ``n_class < 2`` and TypeError for unknown options.
    """
    unknown = sorted(set(opts) - _OPTS)
    if unknown:
        raise TypeError(
            f"build_model: unknown option(s) {', '.join(unknown)}; accepted: {sorted(_OPTS)}"
        )
    if name not in MODEL_NAMES:
        raise ValueError(f"build_model: unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    check_n_class(n_class, f"build_model({name!r})")
    weights = opts.get("backbone_weights")

    if name in ("fcn8s_resnet101", "fcn8s_resnet18"):
        if isinstance(weights, nn.Module):
            weights = weights.state_dict()
        if name == "fcn8s_resnet101":
            return FCN8sResNet101(n_class, backbone_weights=weights)
        return FCN8sResNet(n_class, backbone_weights=weights, depth=18)
    model: FCN32s | FCN16s | FCN8s
    if name == "fcn32s":
        model = FCN32s(n_class)
    elif name == "fcn16s":
        model = FCN16s(n_class)
    else:
        model = FCN8s(n_class, at_once=name == "fcn8s_atonce")
    if weights is not None:
        model.copy_params_from_vgg16(weights)
    return model
