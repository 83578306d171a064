"""FCN-8s on a ResNet-101 backbone (the course assignment "FCN-8s (ResNet101)")."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from .upsampling import bilinear_upsampling
from .vgg import _preview, check_images, check_n_class

__all__ = ["FCN8sResNet101", "ResNet101Backbone"]


class ResNet101Backbone(nn.Module):
    """torchvision's ``resnet101`` without ``avgpool``/``fc``; returns layer2, layer3, layer4.

    Parameter names are torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``, ...), so a
    torchvision resnet101 state_dict minus ``fc.*`` loads strictly.
    """

    def __init__(self) -> None:
        super().__init__()
        # Imported here: torchvision adds seconds to ``import fcn_models`` and only this needs it.
        from torchvision.models import resnet101

        r = resnet101(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # 1/4, 64 ch
        c2 = self.layer2(self.layer1(x))  # 1/8, 512 ch
        c3 = self.layer3(c2)  # 1/16, 1024 ch
        c4 = self.layer4(c3)  # 1/32, 2048 ch
        return c2, c3, c4

    def load_torchvision_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a torchvision resnet101 state_dict (``fc.*`` ignored); ValueError if it is not one."""
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
                "backbone_weights is not a torchvision resnet101 state_dict: "
                f"missing keys: {_preview(missing)}; unexpected keys: {_preview(unexpected)}; "
                f"wrong shapes: {_preview(wrong)}"
            )
        self.load_state_dict(state, strict=True)


class FCN8sResNet101(nn.Module):
    """FCN-8s with ResNet-101: 1x1 score heads on layer2/3/4 (strides 8/16/32), fused coarse to fine.

    ``score_layer4`` -> x2 (``upscore2``) + ``score_layer3`` -> x2 (``upscore_layer3``)
    + ``score_layer2`` -> x8 (``upscore8``). The transposed convs (k4 s2 p1, k4 s2 p1, k16 s8
    p4; bilinear-initialised, learnable) give exactly ``2i`` and ``8i`` pixels, and for ``H, W``
    multiples of 32 the backbone gives exactly ``H/8, H/16, H/32``, so no crop offsets are
    needed. Other sizes are padded with zeros at the bottom/right up to the next multiple of 32
    and the output is cropped back to ``H x W``; zero is the mean colour of a normalised image,
    the most neutral filler. ``padding = factor/2`` is the ``F.interpolate(align_corners=False)``
    convention (as torchvision's segmentation heads); it treats a stride-``s`` feature as
    centred on its ``s x s`` cell, while ResNet's convs centre it on the cell's first pixel,
    a fixed sub-stride shift the learnable upsamplers can absorb.

    Each score head reads its features through a ``BatchNorm2d`` (``norm_layer2/3/4``), as
    torchvision's ``FCNHead`` does. ResNet features are post-ReLU, with positive means over
    512-2048 channels; a 1x1 head read straight from them gets a gradient that points the
    same way for every channel, so one SGD step at the recipe's lr 0.01 moves each logit by
    ``lr * sum_c mean_c**2`` (hundreds here) and training diverges. Normalized inputs remove
    that common component (``tests/test_models.py`` checks the first step stays small).

    Score heads start at zero (as in the VGG FCNs), so an untrained model outputs zeros.
    ``backbone_weights``: a torchvision resnet101 state_dict (e.g. ImageNet weights the
    caller loaded); ``fc.*`` is ignored, anything else must match (ValueError otherwise).
    """

    OUTPUT_STRIDE = 32

    def __init__(
        self, n_class: int = 21, backbone_weights: Mapping[str, Tensor] | None = None
    ) -> None:
        super().__init__()
        check_n_class(n_class, "FCN8sResNet101")
        self.n_class = n_class
        self.backbone = ResNet101Backbone()
        if backbone_weights is not None:
            self.backbone.load_torchvision_state_dict(backbone_weights)
        self.norm_layer2 = nn.BatchNorm2d(512)
        self.norm_layer3 = nn.BatchNorm2d(1024)
        self.norm_layer4 = nn.BatchNorm2d(2048)
        self.score_layer2 = nn.Conv2d(512, n_class, kernel_size=1)
        self.score_layer3 = nn.Conv2d(1024, n_class, kernel_size=1)
        self.score_layer4 = nn.Conv2d(2048, n_class, kernel_size=1)
        for m in (self.score_layer2, self.score_layer3, self.score_layer4):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.upscore2 = bilinear_upsampling(n_class, 2, padding=1)  # 1/32 -> 1/16: 2i
        self.upscore_layer3 = bilinear_upsampling(n_class, 2, padding=1)  # 1/16 -> 1/8: 2i
        self.upscore8 = bilinear_upsampling(n_class, 8, padding=4)  # 1/8 -> 1: 8i

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "FCN8sResNet101")
        h, w = x.shape[-2:]
        s = self.OUTPUT_STRIDE
        pad_h, pad_w = -h % s, -w % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # (left, right, top, bottom)
        c2, c3, c4 = self.backbone(x)  # Hp/8, Hp/16, Hp/32
        score4 = self.score_layer4(self.norm_layer4(c4))  # Hp/32
        fused = self.upscore2(score4) + self.score_layer3(self.norm_layer3(c3))  # Hp/16
        fused = self.upscore_layer3(fused) + self.score_layer2(self.norm_layer2(c2))  # Hp/8
        out = self.upscore8(fused)  # Hp
        return out[:, :, :h, :w]
