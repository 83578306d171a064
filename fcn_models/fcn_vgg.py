"""FCN-32s, FCN-16s and FCN-8s on VGG-16 (Long, Shelhamer & Darrell, arXiv:1411.4038).

Layer for layer the reference nets (fcn.berkeleyvision.org ``voc-fcn{32s,16s,8s,8s-atonce}``,
ported to PyTorch by wkentaro/pytorch-fcn): conv1_1 padded by 100, pools rounding up,
fc6/fc7 as 7x7/1x1 convolutions, 1x1 ``score_*`` layers, bias-free transposed convolutions
initialised to bilinear upsampling, and crops that align every map with the input.

Crop offsets
------------
From ``o = floor((i + 2p - k)/s) + 1``: output pixel ``j`` of a conv/pool reads input pixels
``s*j - p ... s*j - p + k - 1``, so its centre is at input coordinate

    u = s*j + (k - 1)/2 - p                                   (conv, pool)

A transposed conv is the same map read backwards: input pixel ``j`` is spread over output
pixels ``s*j - p + t`` (t < k), centred at ``y = s*j + (k - 1)/2 - p``, i.e.
``j = (y - (k - 1)/2 + p)/s``. Composing from the image (coordinate ``u``) up the net:

    conv1_1 (k3, p100):   u = j + 1 - 100 = j - 99
    3x3/p1 convs:         offset (3 - 1)/2 - 1 = 0, they change nothing
    2x2/s2 pools:         u = 2j + 1/2 each, so after n pools u = 2^n j + (2^n - 1)/2 - 99:
                          pool3: 8j - 95.5   pool4: 16j - 91.5   pool5: 32j - 83.5
    fc6 (k7, p0):         pool5 index j + 3, so u = 32(j + 3) - 83.5 = 32j + 12.5
                          (fc7, score_* are 1x1: no shift; ceil-mode pools only add a window
                          at the end, they move none)

FCN-32s  upscore (k64, s32): j = (y - 31.5)/32, u = y - 31.5 + 12.5 = y - 19  -> crop 19.
FCN-16s  upscore2 (k4, s2) on score_fr: j = (y - 1.5)/2, u = 16y - 24 + 12.5 = 16y - 11.5;
         pool4 pixel j' sits at 16j' - 91.5, equal when j' = y + 5     -> crop score_pool4 at 5;
         upscore16 (k32, s16): y16 = (y - 15.5)/16, u = y - 15.5 - 11.5 = y - 27  -> crop 27.
FCN-8s   as FCN-16s up to the 1/16 fusion (u = 16y - 11.5), then upscore_pool4 (k4, s2):
         u = 16(y - 1.5)/2 - 11.5 = 8y - 23.5; pool3 pixel j' sits at 8j' - 95.5, equal when
         j' = y + 9                                                     -> crop score_pool3 at 9;
         upscore8 (k16, s8): u = (y - 7.5) - 23.5 = y - 31                  -> crop 31.

The crops always fit: with ``P5 = ceil((H + 198)/32)`` (pool5 length) the fc7 map has
``F = P5 - 6 >= 1`` rows for every ``H >= 1`` (that is what the 100 padding buys: a 1x1 image
becomes 199 px, enough for a 7x7 pool5), upscore gives ``32F + 32 >= H + 38 > H + 19`` rows,
and likewise for the other crops (``tests/unit/test_models.py`` checks H = 1..1024 arithmetically
and many sizes by running the nets on the meta device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .upsampling import bilinear_upsampling
from .vgg import (
    POOL3_INDEX,
    POOL4_INDEX,
    VGG16,
    VGG16Conv,
    _init_vgg,
    _preview,
    check_images,
    check_n_class,
    convolutionalize,
    vgg16_features,
)

__all__ = ["FCN8s", "FCN16s", "FCN32s"]

# FCN-8s "at-once" (voc-fcn8s-atonce): fixed scales so the skips, whose activations are much
# larger than fc7's, do not swamp the prediction when everything is trained in one stage.
POOL4_SCALE = 0.01
POOL3_SCALE = 0.0001

_BACKBONE = ("features.", "fc6.", "fc7.")


def _crop(x: Tensor, offset: int, size: Sequence[int]) -> Tensor:
    """``x[..., offset:offset + h, offset:offset + w]`` (offsets derived in the module doc)."""
    h, w = size
    return x[:, :, offset : offset + h, offset : offset + w]


def _copy_params(
    dst: nn.Module, src: Mapping[str, Tensor], prefixes: tuple[str, ...], what: str
) -> None:
    """Copy every parameter of ``dst`` whose name starts with one of ``prefixes`` from ``src``."""
    params = {k: p for k, p in dst.named_parameters() if k.startswith(prefixes)}
    missing = sorted(k for k in params if k not in src)
    wrong = sorted(
        f"{k}: {tuple(src[k].shape)} != {tuple(p.shape)}"
        for k, p in params.items()
        if k in src and src[k].shape != p.shape
    )
    if missing or wrong:
        raise ValueError(
            f"{type(dst).__name__}: cannot copy parameters from {what}; "
            f"missing: {_preview(missing)}; wrong shapes: {_preview(wrong)}"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(src[k])


def _vgg16conv_state(source: VGG16 | VGG16Conv | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A ``VGG16Conv``-layout state_dict from a VGG16 / VGG16Conv module or either's state_dict."""
    if isinstance(source, VGG16Conv):
        return source.state_dict()
    if isinstance(source, Mapping) and "fc6.weight" in source:
        return source  # already convolutionalized
    return convolutionalize(source)


class _VGG16FCN(nn.Module):
    """The part all VGG FCNs share: padded VGG-16 conv stack, fc6/fc7 as convs, ``score_fr``.

    ``forward`` = ``encode`` (backbone taps) -> 1x1 ``score_*`` layers -> ``fuse`` (upsample,
    crop, add; linear, so tests can probe it with synthetic score maps).

    Initialisation: backbone as torchvision's VGG (it is meant to be overwritten by
    ``copy_params_from_vgg16``); every ``score_*`` layer zero, as in pytorch-fcn, so a new
    skip or head starts by contributing nothing; upsampling layers bilinear.
    """

    def __init__(self, n_class: int) -> None:
        super().__init__()
        check_n_class(n_class, type(self).__name__)
        self.n_class = n_class
        self.features = vgg16_features(conv1_padding=100, ceil_mode=True)
        self.fc6 = nn.Conv2d(512, 4096, kernel_size=7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d()
        self.fc7 = nn.Conv2d(4096, 4096, kernel_size=1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d()
        self.score_fr = nn.Conv2d(4096, n_class, kernel_size=1)
        _init_vgg(self.features)
        for m in (self.fc6, self.fc7):
            nn.init.normal_(m.weight, 0, 0.01)  # torchvision's init of the Linear layers
            nn.init.zeros_(m.bias)
        _zero_init(self.score_fr)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(pool3, pool4, fc7)``: 256 ch at 1/8, 512 ch at 1/16, 4096 ch at 1/32 (+ padding)."""
        check_images(x, type(self).__name__)
        h = x
        pool3 = pool4 = h
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == POOL3_INDEX:
                pool3 = h
            elif i == POOL4_INDEX:
                pool4 = h
        h = self.drop6(self.relu6(self.fc6(h)))  # (N, 4096, P5 - 6, ...)
        h = self.drop7(self.relu7(self.fc7(h)))
        return pool3, pool4, h

    def copy_params_from_vgg16(self, source: VGG16 | VGG16Conv | Mapping[str, Tensor]) -> None:
        """Load conv1_1..conv5_3, fc6 and fc7 from VGG-16 (fc layers convolutionalized).

        ``source``: a ``VGG16`` / ``VGG16Conv`` or a torchvision vgg16 / ``VGG16Conv``
        state_dict. fc8 (the ImageNet classes) is not copied: ``score_fr`` stays as it is.
        """
        _copy_params(self, _vgg16conv_state(source), _BACKBONE, "VGG16")


def _zero_init(*layers: nn.Conv2d) -> None:
    for m in layers:
        nn.init.zeros_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class FCN32s(_VGG16FCN):
    """FCN-32s: ``score_fr`` upsampled x32 in one bilinear-initialised step.

    ``(N, 3, H, W) -> (N, n_class, H, W)`` for every ``H, W >= 1``.
    """

    OUTPUT_OFFSET = 19  # derived in the module docstring

    def __init__(self, n_class: int = 21) -> None:
        super().__init__(n_class)
        self.upscore = bilinear_upsampling(n_class, 32)  # k64 s32: 32F + 32 rows

    def forward(self, x: Tensor) -> Tensor:
        _, _, fc7 = self.encode(x)
        return self.fuse([self.score_fr(fc7)], x.shape[-2:])

    def fuse(self, scores: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``[score_fr]`` -> ``(N, n_class, *size)``: upsample x32 and crop."""
        (score_fr,) = scores
        h = self.upscore(score_fr)  # (N, n, 32F + 32, ...)
        return _crop(h, self.OUTPUT_OFFSET, size)


class FCN16s(_VGG16FCN):
    """FCN-16s: ``score_fr`` x2, plus ``score_pool4``, then x16.

    Staged training (paper, section 4.2): ``copy_params_from_fcn32s`` with ``score_pool4``
    still zero makes the skip contribute exactly nothing and the score_fr map identical to
    FCN-32s's. The output is then *close to*, not equal to FCN-32s's: bilinear x2 followed by
    bilinear x16 is not bilinear x32 (the x2 samples sit 8 px either side of the coarse sample
    centres, so linear interpolation between them cuts the corner at every coarse sample).
    The two agree exactly where the score map is locally affine and in general differ by at
    most ``max|second difference of score_fr| / 8`` per axis in the interior.
    """

    POOL4_OFFSET = 5
    OUTPUT_OFFSET = 27

    def __init__(self, n_class: int = 21) -> None:
        super().__init__(n_class)
        self.score_pool4 = nn.Conv2d(512, n_class, kernel_size=1)
        _zero_init(self.score_pool4)
        self.upscore2 = bilinear_upsampling(n_class, 2)  # k4 s2: 2F + 2
        self.upscore16 = bilinear_upsampling(n_class, 16)  # k32 s16

    def forward(self, x: Tensor) -> Tensor:
        _, pool4, fc7 = self.encode(x)
        return self.fuse([self.score_fr(fc7), self.score_pool4(pool4)], x.shape[-2:])

    def fuse(self, scores: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``[score_fr, score_pool4]`` -> ``(N, n_class, *size)``."""
        score_fr, score_pool4 = scores
        up2 = self.upscore2(score_fr)  # 1/16 grid, 2F + 2
        h = up2 + _crop(score_pool4, self.POOL4_OFFSET, up2.shape[-2:])
        return _crop(self.upscore16(h), self.OUTPUT_OFFSET, size)

    def copy_params_from_fcn32s(self, source: FCN32s | Mapping[str, Tensor]) -> None:
        """Backbone and ``score_fr`` from a trained FCN-32s (its k64 ``upscore`` has no match)."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        _copy_params(self, state, (*_BACKBONE, "score_fr."), "FCN32s")


class FCN8s(_VGG16FCN):
    """FCN-8s: the FCN-16s fusion x2, plus ``score_pool3``, then x8.

    ``at_once=True`` is voc-fcn8s-atonce (trained in one stage from VGG-16): the skips read
    ``pool4 * 0.01`` and ``pool3 * 0.0001``. ``copy_params_from_fcn16s`` (staged training)
    works for both; for ``at_once`` it scales the copied ``score_pool4`` weights by 100 so the
    function is the same.
    """

    POOL4_OFFSET = 5
    POOL3_OFFSET = 9
    OUTPUT_OFFSET = 31

    def __init__(self, n_class: int = 21, at_once: bool = False) -> None:
        super().__init__(n_class)
        self.at_once = at_once
        self.score_pool4 = nn.Conv2d(512, n_class, kernel_size=1)
        self.score_pool3 = nn.Conv2d(256, n_class, kernel_size=1)
        _zero_init(self.score_pool4, self.score_pool3)
        self.upscore2 = bilinear_upsampling(n_class, 2)  # 1/32 -> 1/16
        self.upscore_pool4 = bilinear_upsampling(n_class, 2)  # 1/16 -> 1/8
        self.upscore8 = bilinear_upsampling(n_class, 8)  # 1/8 -> 1, k16 s8

    def forward(self, x: Tensor) -> Tensor:
        pool3, pool4, fc7 = self.encode(x)
        if self.at_once:
            pool4 = pool4 * POOL4_SCALE
            pool3 = pool3 * POOL3_SCALE
        scores = [self.score_fr(fc7), self.score_pool4(pool4), self.score_pool3(pool3)]
        return self.fuse(scores, x.shape[-2:])

    def fuse(self, scores: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``[score_fr, score_pool4, score_pool3]`` -> ``(N, n_class, *size)``."""
        score_fr, score_pool4, score_pool3 = scores
        up2 = self.upscore2(score_fr)  # 1/16 grid
        h = up2 + _crop(score_pool4, self.POOL4_OFFSET, up2.shape[-2:])
        up4 = self.upscore_pool4(h)  # 1/8 grid
        h = up4 + _crop(score_pool3, self.POOL3_OFFSET, up4.shape[-2:])
        return _crop(self.upscore8(h), self.OUTPUT_OFFSET, size)

    def copy_params_from_fcn16s(self, source: FCN16s | Mapping[str, Tensor]) -> None:
        """Backbone, ``score_fr``, ``score_pool4`` and ``upscore2`` from a trained FCN-16s."""
        state = dict(source.state_dict() if isinstance(source, nn.Module) else source)
        if self.at_once and "score_pool4.weight" in state:
            # score_pool4 here reads pool4 * 0.01: W * 100 gives the same scores.
            state["score_pool4.weight"] = state["score_pool4.weight"] / POOL4_SCALE
        prefixes = (*_BACKBONE, "score_fr.", "score_pool4.", "upscore2.")
        _copy_params(self, state, prefixes, "FCN16s")

    def extra_repr(self) -> str:
        return f"at_once={self.at_once}"
