"""VGG-16 as an ImageNet classifier and its convolutionalized (fully convolutional) form.

Course notes, "Convolutionalization": a classifier takes a fixed-size input and produces a
non-spatial output because its fully connected layers expect exactly ``512 x 7 x 7`` features.
A fully connected layer over a ``C x k x k`` input *is* a ``k x k`` convolution without padding
(a "full sized kernel"), so reshaping fc6/fc7/fc8 into 7x7/1x1/1x1 convolutions gives a net
that accepts any input large enough and slides the classifier over it, producing a spatial
score map (FCN paper, section 3.1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .upsampling import conv_output_size, pool_output_size

__all__ = [
    "POOL3_INDEX",
    "POOL4_INDEX",
    "POOL5_INDEX",
    "VGG16",
    "VGG16Conv",
    "check_images",
    "check_n_class",
    "convolutionalize",
    "vgg16_feature_sizes",
    "vgg16_features",
]

# torchvision's "D" configuration: numbers are conv widths, "M" a 2x2/stride-2 max pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip

# Indices of the pools in ``vgg16_features()`` (same as torchvision's ``vgg16().features``).
POOL3_INDEX = 16  # 1/8 resolution, 256 channels
POOL4_INDEX = 23  # 1/16, 512 channels
POOL5_INDEX = 30  # 1/32, 512 channels
_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

_FC6_IN = 512 * 7 * 7  # torchvision flattens (C, H, W) = (512, 7, 7) -> 25088
_CLASSIFIER_INPUT = 224  # the only size for which VGG16's fc6 sees exactly 7x7 features


def check_n_class(n_class: int, model: str) -> None:
    """Raise ValueError unless ``n_class`` is an int >= 2 (one class is not segmentation)."""
    if isinstance(n_class, bool) or not isinstance(n_class, int) or n_class < 2:
        raise ValueError(f"{model}: n_class must be an int >= 2, got {n_class!r}")


def check_images(x: Tensor, model: str) -> None:
    """Raise ValueError unless ``x`` is an ``(N, 3, H, W)`` batch with ``H, W >= 1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{model}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{model}: expected a 4-D (N, 3, H, W) image batch, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != 3:
        raise ValueError(
            f"{model}: expected 3 (RGB) channels in dim 1, got {x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{model}: expected H, W >= 1, got shape {tuple(x.shape)}")


def vgg16_features(conv1_padding: int = 1, ceil_mode: bool = False) -> nn.Sequential:
    """VGG-16's 13 conv + 5 pool layers, with torchvision's module indices.

    ``conv1_padding=1, ceil_mode=False`` is exactly ``torchvision.models.vgg16().features``.
    The FCNs use ``conv1_padding=100, ceil_mode=True`` (Caffe pools round up) so any input
    size works; see ``VGG16Conv``.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
        else:
            assert isinstance(v, int)
            padding = conv1_padding if not layers else 1
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=padding), nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


def vgg16_feature_sizes(
    i: int, conv1_padding: int = 100, ceil_mode: bool = True
) -> tuple[int, int, int, int]:
    """Lengths along one axis of (pool3, pool4, pool5, fc6/fc7) for an input of length ``i``.

    Pure arithmetic (the notes' ``o = floor((i + 2p - k)/s) + 1`` per layer): conv1_1 (k3)
    gives ``i + 2p - 2``, the other 3x3/p1 convs keep the length, each pool halves it (rounding
    up in ceil mode) and fc6 (k7, p0) removes 6. A result < 1 means the input is too small.
    """
    h = conv_output_size(i, 3, 1, conv1_padding)
    pools = []
    for _ in range(5):
        h = pool_output_size(h, 2, 2, ceil_mode=ceil_mode)
        pools.append(h)
    fc = conv_output_size(pools[-1], 7)
    return pools[2], pools[3], pools[4], fc


def _init_vgg(module: nn.Module) -> None:
    """torchvision's VGG initialisation (also used for the convolutionalized fc layers)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGG16(nn.Module):
    """VGG-16 ImageNet classifier, module-for-module ``torchvision.models.vgg16``.

    ``VGG16(n_class=1000).load_state_dict(torchvision.models.vgg16(...).state_dict())`` works.
    Per the notes it is a "fixed-size input, non-spatial output" network: only ``224 x 224``
    inputs are accepted (torchvision's adaptive average pool would silently resize other
    sizes; here that is an error, so the contrast with ``VGG16Conv`` is explicit).
    """

    def __init__(self, n_class: int = 21) -> None:
        super().__init__()
        check_n_class(n_class, "VGG16")
        self.n_class = n_class
        self.features = vgg16_features(conv1_padding=1, ceil_mode=False)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))  # identity at 224x224, kept for the layout
        self.classifier = nn.Sequential(
            nn.Linear(_FC6_IN, 4096),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, n_class),  # fc8
        )
        _init_vgg(self)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "VGG16")
        if tuple(x.shape[-2:]) != (_CLASSIFIER_INPUT, _CLASSIFIER_INPUT):
            raise ValueError(
                f"VGG16: the classifier takes a fixed-size {_CLASSIFIER_INPUT}x{_CLASSIFIER_INPUT}"
                f" input (its fc layers need 512x7x7 features), got {x.shape[-2]}x{x.shape[-1]};"
                " use VGG16Conv or an FCN for other sizes"
            )
        x = self.features(x)  # (N, 512, 7, 7)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)  # (N, 25088), (C, H, W) order
        return self.classifier(x)  # (N, n_class)


class VGG16Conv(nn.Module):
    """Convolutionalized VGG-16: fc6/fc7/fc8 as 7x7/1x1/1x1 convolutions; output is a score map.

    Output is ``(N, n_class, H', W')`` with ``H' = vgg16_feature_sizes(H, conv1_padding)[3]``.
    Layers: ``features`` (torchvision indices; conv1_1 padding ``conv1_padding``; pools in
    ceil mode), ``fc6`` Conv2d(512, 4096, 7) + ReLU + Dropout2d, ``fc7`` Conv2d(4096, 4096, 1) +
    ReLU + Dropout2d, ``classifier`` Conv2d(4096, n_class, 1) (fc8; FCN's ``score_fr``).

    Padding 100 (the notes, the FCN reference): fc6 needs a 7x7 pool5, i.e. an input of at
    least 193 px after conv1_1; padding conv1_1 by 100 makes even a 1x1 image big enough, so
    the net accepts every size. The price is that border pixels now see zeros where the
    classifier saw real neighbours, so the output is *not* numerically the classifier's.
    Equivalence is exact with the classifier's own geometry: ``VGG16Conv(conv1_padding=1)``
    with weights from ``convolutionalize(vgg)`` on a 224x224 input gives a 1x1 map equal to
    ``vgg(x)`` (pool5 is 7x7, fc6 slides exactly once). On larger inputs the same weights
    slide the classifier over the image in 32-px steps (the sliding window for free; windows
    differ from classifying crops only where a crop's border would see zero padding).
    """

    def __init__(self, n_class: int = 21, conv1_padding: int = 100) -> None:
        super().__init__()
        check_n_class(n_class, "VGG16Conv")
        if conv1_padding < 0:
            raise ValueError(f"VGG16Conv: conv1_padding must be >= 0, got {conv1_padding}")
        self.n_class = n_class
        self.conv1_padding = conv1_padding
        self.features = vgg16_features(conv1_padding=conv1_padding, ceil_mode=True)
        self.fc6 = nn.Conv2d(512, 4096, kernel_size=7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d()
        self.fc7 = nn.Conv2d(4096, 4096, kernel_size=1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d()
        self.classifier = nn.Conv2d(4096, n_class, kernel_size=1)
        _init_vgg(self.features)
        # Same distribution as the Linear layers they replace (torchvision: N(0, 0.01)).
        for m in (self.fc6, self.fc7, self.classifier):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_vgg16(
        cls, source: VGG16 | Mapping[str, Tensor], conv1_padding: int = 100
    ) -> VGG16Conv:
        """A ``VGG16Conv`` carrying (copies of) the weights of a ``VGG16`` / vgg16 state_dict.

        The parameters end up on ``source``'s device and dtype.
        """
        state = convolutionalize(source)
        # Built on meta and then given the weights: skips a random init that would be
        # overwritten (~134M values).
        with torch.device("meta"):
            model = cls(n_class=state["classifier.weight"].shape[0], conv1_padding=conv1_padding)
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        return model

    def min_input_size(self) -> int:
        """Smallest H (or W) for which fc6 still has a 7x7 pool5 to look at."""
        i = 1
        while vgg16_feature_sizes(i, self.conv1_padding)[3] < 1:
            i += 1
        return i

    def forward_features(self, x: Tensor) -> Tensor:
        """fc7 activations ``(N, 4096, H', W')``: the part an FCN shares with the classifier."""
        check_images(x, "VGG16Conv")
        if vgg16_feature_sizes(x.shape[2], self.conv1_padding)[3] < 1 or (
            vgg16_feature_sizes(x.shape[3], self.conv1_padding)[3] < 1
        ):
            raise ValueError(
                f"VGG16Conv(conv1_padding={self.conv1_padding}): input {x.shape[2]}x{x.shape[3]}"
                f" is too small; H and W must be >= {self.min_input_size()} so that pool5 is at"
                " least 7x7 for the 7x7 fc6"
            )
        h = self.features(x)  # (N, 512, ceil((H + 2p - 2)/32), ...)
        h = self.drop6(self.relu6(self.fc6(h)))  # 7x7 valid conv: -6 per axis
        return self.drop7(self.relu7(self.fc7(h)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))  # (N, n_class, H', W')


def _expected_vgg16_shapes(n_class: int | None) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of torchvision's vgg16 (fc8 rows = n_class; None: any)."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_ch = 3
    widths = [v for v in _VGG16_CFG if v != "M"]
    for idx, out_ch in zip(_CONV_INDICES, widths, strict=True):
        assert isinstance(out_ch, int)
        shapes[f"features.{idx}.weight"] = (out_ch, in_ch, 3, 3)
        shapes[f"features.{idx}.bias"] = (out_ch,)
        in_ch = out_ch
    shapes["classifier.0.weight"] = (4096, _FC6_IN)
    shapes["classifier.0.bias"] = (4096,)
    shapes["classifier.3.weight"] = (4096, 4096)
    shapes["classifier.3.bias"] = (4096,)
    n = -1 if n_class is None else n_class
    shapes["classifier.6.weight"] = (n, 4096)
    shapes["classifier.6.bias"] = (n,)
    return shapes


def convolutionalize(source: VGG16 | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Turn VGG-16 classifier weights into a ``VGG16Conv`` state_dict.

    ``source``: a ``VGG16`` module or a state_dict with its (= torchvision vgg16's) keys.
    Conv weights are passed through; the fully connected weights are reshaped, not changed:
    fc6 ``(4096, 25088) -> (4096, 512, 7, 7)`` (torchvision flattens pool5 in (C, H, W) order,
    which is also a conv weight's (in, kh, kw) order), fc7 ``-> (4096, 4096, 1, 1)``, fc8
    ``(n, 4096) -> (n, 4096, 1, 1)``. The returned tensors are views sharing storage with
    ``source`` (``load_state_dict`` copies them). Raises ValueError on missing/unexpected keys
    or wrong shapes.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    expected = _expected_vgg16_shapes(None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "convolutionalize: not a VGG16 / torchvision vgg16 state_dict; "
            f"missing keys: {_preview(missing)}; unexpected keys: {_preview(unexpected)}"
        )
    n_class = state["classifier.6.weight"].shape[0]
    expected = _expected_vgg16_shapes(n_class)
    wrong = [
        f"{k}: {tuple(state[k].shape)} != {shape}"
        for k, shape in expected.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise ValueError(f"convolutionalize: wrong shapes: {_preview(wrong)}")

    out = {k: v.detach() for k, v in state.items() if k.startswith("features.")}
    out["fc6.weight"] = state["classifier.0.weight"].detach().reshape(4096, 512, 7, 7)
    out["fc6.bias"] = state["classifier.0.bias"].detach()
    out["fc7.weight"] = state["classifier.3.weight"].detach().reshape(4096, 4096, 1, 1)
    out["fc7.bias"] = state["classifier.3.bias"].detach()
    out["classifier.weight"] = state["classifier.6.weight"].detach().reshape(n_class, 4096, 1, 1)
    out["classifier.bias"] = state["classifier.6.bias"].detach()
    return out


def _preview(items: list[str], n: int = 8) -> str:
    """At most ``n`` items of a long key list, for error messages."""
    if not items:
        return "none"
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
