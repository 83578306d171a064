"""FCN-8s on a ResNet backbone: ResNet-101 (the course assignment "FCN-8s (ResNet101)", the
production model) or ResNet-18 (the same head on a backbone a quarter the size, for CPU runs
and quick experiments).

Centres
-------
Output pixel ``j`` of a conv/pool is centred on input coordinate ``u = s*j + (k - 1)/2 - p``
(derived in ``fcn_vgg.py``). Every layer of torchvision's ResNets (v1.5; the basic blocks of
ResNet-18 as the bottlenecks of ResNet-101) has ``k = 2p + 1``, so ``u = s*j`` throughout:

    conv1 (k7, s2, p3):        u = 2j + 3 - 3 = 2j
    maxpool (k3, s2, p1):      u = 2j + 1 - 1 = 2j
    3x3 convs (p1):            u = j, or 2j for the stride-2 one opening layer2/3/4
    1x1 convs (p0):            u = j, or 2j for the stride-2 ``downsample``

and both branches of a residual block are centred on the same pixel, so their sum is too.
Composed, feature ``j`` of layer2/3/4 sits on input pixel ``8j``/``16j``/``32j`` (the padding
to a multiple of 32 is at the bottom/right and moves nothing). ``upsample_aligned`` with
``aligned_bilinear_upsampling(f)`` (k ``2f - 1``, p ``f - 1``) puts input ``j`` on output
``f*j``, so every path composes to the identity, with no crop offsets:

    layer4 j  -> upscore2:        1/16 cell 2j, where layer3 feature 2j sits (16*2j = 32j)
    1/16 j    -> upscore_layer3:  1/8 cell 2j, where layer2 feature 2j sits (8*2j = 16j)
    1/8 j     -> upscore8:        output pixel 8j, the input pixel it is centred on.

The even kernels of the ``F.interpolate(align_corners=False)`` convention (k ``2f``, p
``f/2``) put input ``j`` on ``f*j + (f - 1)/2`` instead: the layer2/3/4 paths would land 3.5,
7.5 and 15.5 px below/right of their features, and the skips would be summed half a cell apart.
(``tests/unit/test_models_geometry.py`` measures the centres and the fused positions.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .upsampling import aligned_bilinear_upsampling, upsample_aligned
from .vgg import _preview, check_images, check_n_class

__all__ = ["RESNET_DEPTHS", "FCN8sResNet", "FCN8sResNet101", "ResNet101Backbone", "ResNetBackbone"]

RESNET_DEPTHS = (18, 101)  # those build_model offers (fcn8s_resnet18, fcn8s_resnet101)


class ResNetBackbone(nn.Module):
    """torchvision's ``resnet{depth}`` without ``avgpool``/``fc``; returns layer2, layer3, layer4.

    Parameter names are torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``, ...), so a
    torchvision state_dict of the same depth minus ``fc.*`` loads strictly.
    """

    def __init__(self, depth: int = 101) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNetBackbone: depth {depth}; valid: {list(RESNET_DEPTHS)}")
        # Imported here: torchvision adds seconds to ``import fcn_models`` and only this needs it.
        from torchvision import models

        r = getattr(models, f"resnet{depth}")(weights=None)
        # layer2/3/4 (channels of layer4 = the classifier's input) each double the one before:
        # 128/256/512 with basic blocks (18), 512/1024/2048 with bottlenecks (101).
        c4 = r.fc.in_features
        self.depth, self.channels = depth, (c4 // 4, c4 // 2, c4)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # 1/4, 64 ch
        c2 = self.layer2(self.layer1(x))  # 1/8, channels[0]
        c3 = self.layer3(c2)  # 1/16, channels[1]
        c4 = self.layer4(c3)  # 1/32, channels[2]
        return c2, c3, c4

    def load_torchvision_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a torchvision state_dict of this depth (``fc.*`` ignored); ValueError if it is not one."""
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        # BatchNorm fills in a missing num_batches_tracked (older checkpoints lack it).
        missing = sorted(
            k for k in own if k not in state and not k.endswith(".num_batches_tracked")
        )
        unexpected = sorted(k for k in state if k not in own)
        wrong = sorted(
            f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        )
        if missing or unexpected or wrong:
            raise ValueError(
                f"backbone_weights is not a torchvision resnet{self.depth} state_dict: "
                f"missing keys: {_preview(missing)}; unexpected keys: {_preview(unexpected)}; "
                f"wrong shapes: {_preview(wrong)}"
            )
        self.load_state_dict(state, strict=True)


class ResNet101Backbone(ResNetBackbone):
    """:class:`ResNetBackbone` of depth 101 (torchvision's ``resnet101``)."""

    def __init__(self) -> None:
        super().__init__(101)


class FCN8sResNet(nn.Module):
    """FCN-8s with a ResNet: 1x1 score heads on layer2/3/4 (strides 8/16/32), fused coarse to fine.

    ``forward`` = ``encode`` (pad, backbone, normalised taps) -> 1x1 ``score_layer*`` heads ->
    ``fuse``: ``score_layer4`` -> x2 (``upscore2``) + ``score_layer3`` -> x2
    (``upscore_layer3``) + ``score_layer2`` -> x8 (``upscore8``), then crop. The upsamplers
    are bias-free ``nn.ConvTranspose2d`` (k3 s2 p1, k3 s2 p1, k15 s8 p7; bilinear-initialised,
    learnable) applied by ``upsample_aligned``, which gives exactly ``2i`` and ``8i`` pixels
    and puts every feature on the pixel it is centred on (module docstring). For ``H, W``
    multiples of 32 the backbone gives exactly ``H/8, H/16, H/32``. Other sizes are padded with
    zeros at the bottom/right up to the next multiple of 32 and the output is cropped back to
    ``H x W``; zero is the mean colour of a normalised image, the most neutral filler.

    Each score head reads its features through a ``BatchNorm2d`` (``norm_layer2/3/4``), as
    torchvision's ``FCNHead`` does. ResNet features are post-ReLU, with positive means over
    512-2048 channels; a 1x1 head read straight from them gets a gradient that points the
    same way for every channel, so one SGD step at the recipe's lr 0.01 moves each logit by
    ``lr * sum_c mean_c**2`` (hundreds for ResNet-101) and training diverges. Normalized inputs remove
    that common component (``tests/unit/test_models.py`` checks the first step stays small).

    Score heads start at zero (as in the VGG FCNs), so an untrained model outputs zeros.
    ``depth``: 101 (the production model) or 18. ``backbone_weights``: a torchvision
    ``resnet{depth}`` state_dict (e.g. ImageNet weights the caller loaded); ``fc.*`` is
    ignored, anything else must match (ValueError otherwise).
    """

    OUTPUT_STRIDE = 32

    def __init__(
        self, n_class: int = 21, backbone_weights: Mapping[str, Tensor] | None = None,
        depth: int = 101,
    ) -> None:  # fmt: skip
        super().__init__()
        check_n_class(n_class, type(self).__name__)
        self.n_class = n_class
        self.backbone = ResNetBackbone(depth)
        if backbone_weights is not None:
            self.backbone.load_torchvision_state_dict(backbone_weights)
        ch2, ch3, ch4 = self.backbone.channels
        self.norm_layer2 = nn.BatchNorm2d(ch2)
        self.norm_layer3 = nn.BatchNorm2d(ch3)
        self.norm_layer4 = nn.BatchNorm2d(ch4)
        self.score_layer2 = nn.Conv2d(ch2, n_class, kernel_size=1)
        self.score_layer3 = nn.Conv2d(ch3, n_class, kernel_size=1)
        self.score_layer4 = nn.Conv2d(ch4, n_class, kernel_size=1)
        for m in (self.score_layer2, self.score_layer3, self.score_layer4):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.upscore2 = aligned_bilinear_upsampling(n_class, 2)  # 1/32 -> 1/16
        self.upscore_layer3 = aligned_bilinear_upsampling(n_class, 2)  # 1/16 -> 1/8
        self.upscore8 = aligned_bilinear_upsampling(n_class, 8)  # 1/8 -> 1

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised ``(layer2, layer3, layer4)`` (``backbone.channels``) at ``Hp/8, Hp/16, Hp/32``.

        ``Hp, Wp``: ``H, W`` zero-padded at the bottom/right to multiples of 32.
        """
        check_images(x, type(self).__name__)
        h, w = x.shape[-2:]
        s = self.OUTPUT_STRIDE
        pad_h, pad_w = -h % s, -w % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # (left, right, top, bottom)
        c2, c3, c4 = self.backbone(x)
        return self.norm_layer2(c2), self.norm_layer3(c3), self.norm_layer4(c4)

    def forward(self, x: Tensor) -> Tensor:
        c2, c3, c4 = self.encode(x)
        scores = [self.score_layer4(c4), self.score_layer3(c3), self.score_layer2(c2)]
        return self.fuse(scores, x.shape[-2:])

    def fuse(self, scores: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``[score_layer4, score_layer3, score_layer2]`` -> ``(N, n_class, *size)``.

        Upsample, add, crop to ``size`` (at most the padded size); linear in ``scores``.
        """
        score4, score3, score2 = scores
        fused = upsample_aligned(self.upscore2, score4) + score3  # Hp/16
        fused = upsample_aligned(self.upscore_layer3, fused) + score2  # Hp/8
        out = upsample_aligned(self.upscore8, fused)  # Hp
        h, w = size
        return out[:, :, :h, :w]


class FCN8sResNet101(FCN8sResNet):
    """:class:`FCN8sResNet` on ResNet-101: the production model (``fcn8s_resnet101``)."""

    def __init__(
        self, n_class: int = 21, backbone_weights: Mapping[str, Tensor] | None = None
    ) -> None:
        super().__init__(n_class, backbone_weights, depth=101)
