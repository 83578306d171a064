"""How a model learns: the optimization recipe, its parameter groups, the schedule and the loss.

Two recipes:

- ``default`` (torchvision's segmentation reference): SGD, momentum 0.9, weight decay 1e-4,
  learning rate 0.01 with poly decay (power 0.9) over all steps, loss averaged over pixels.
  For the ResNet-101 model and for VGG FCNs trained with per-pixel mean loss.
- ``reference`` (the FCN paper's Caffe solvers, VGG FCNs only): loss *summed* over pixels,
  fixed learning rate 1e-10 (FCN-32s), 1e-12 (FCN-16s), 1e-14 (FCN-8s, staged), 1e-10
  (FCN-8s at-once), momentum 0.99, weight decay 5e-4. The tiny rates are what a summed loss
  over ~10^5 pixels per image needs; momentum 0.99 averages over ~100 steps of batch 1.

Both share the reference nets' parameter groups: the bilinear upsamplers stay fixed (Caffe
``lr_mult: 0`` on every ``upscore*``) unless ``learn_upsampling``; biases learn at twice the
rate without weight decay (Caffe ``lr_mult: 2, decay_mult: 0``); normalization parameters
(the ResNet's BatchNorm) have no weight decay (torchvision's ``norm_weight_decay=0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipelines.core import labels
from pipelines.core.errors import UserError

RECIPES = ("default", "reference")
# The FCN reference solvers (fcn.berkeleyvision.org voc-fcn*/solver.prototxt).
REFERENCE_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s_atonce": 1e-10}


class RecipeError(UserError):
    """A recipe that does not apply to the chosen model."""


@dataclass(frozen=True)
class Recipe:
    """Optimizer, schedule and loss of one training run."""

    name: str
    lr: float
    momentum: float
    weight_decay: float
    poly_power: float | None  # None: a fixed learning rate
    loss_reduction: str  # "mean" over pixels, or "sum" over each image's pixels
    learn_upsampling: bool = False


def make_recipe(
    name: str,
    model: str,
    *,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    learn_upsampling: bool = False,
) -> Recipe:
    """The named recipe for ``model``; explicit values override the recipe's own."""
    if name == "default":
        base = Recipe("default", 0.01, 0.9, 1e-4, 0.9, "mean", learn_upsampling)
    elif name == "reference":
        if model not in REFERENCE_LR:
            raise RecipeError(
                f"--recipe reference reproduces the FCN paper's VGG solvers "
                f"({', '.join(REFERENCE_LR)}); {model} has none: use --recipe default"
            )
        base = Recipe("reference", REFERENCE_LR[model], 0.99, 5e-4, None, "sum", learn_upsampling)
    else:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return Recipe(
        base.name,
        base.lr if lr is None else lr,
        base.momentum if momentum is None else momentum,
        base.weight_decay if weight_decay is None else weight_decay,
        base.poly_power,
        base.loss_reduction,
        learn_upsampling,
    )


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def set_trainable(model: nn.Module, *, learn_upsampling: bool) -> None:
    """Freeze (or unfreeze) the bilinear upsamplers: every transposed conv of the FCNs.

    Call before wrapping in DDP, which registers only parameters that require grad."""
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            m.requires_grad_(learn_upsampling)


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The reference parameter groups of the trainable parameters: weights (lr, decay),
    biases (2 x lr, no decay), normalization parameters (lr, no decay)."""
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(False)
    }
    weights, biases, norms = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_ids:
            norms.append(p)
        elif name.endswith("bias"):
            biases.append(p)
        else:
            weights.append(p)
    groups = [
        {"name": "weights", "params": weights, "lr": lr, "weight_decay": weight_decay},
        {"name": "biases", "params": biases, "lr": 2 * lr, "weight_decay": 0.0},
        {"name": "norm", "params": norms, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, recipe: Recipe, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over the reference parameter groups, and the recipe's schedule (stepped once per
    optimizer step): poly decay to zero at ``total_steps``, or a fixed rate."""
    optimizer = torch.optim.SGD(
        param_groups(model, recipe.lr, recipe.weight_decay),
        lr=recipe.lr,
        momentum=recipe.momentum,
    )
    power = recipe.poly_power
    if power is None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1 - step / total_steps) ** power
        )
    return optimizer, scheduler


def make_loss(recipe: Recipe):
    """Pixel-wise cross-entropy, ignore pixels excluded. ``sum``: summed over each image's
    pixels and averaged over images (Caffe's ``normalize: false`` divides by the batch)."""
    if recipe.loss_reduction == "mean":
        return nn.CrossEntropyLoss(ignore_index=labels.IGNORE_INDEX)
    summed = nn.CrossEntropyLoss(ignore_index=labels.IGNORE_INDEX, reduction="sum")
    return lambda logits, target: summed(logits, target) / len(target)
