"""Loading pretrained backbone weights (the I/O that ``fcn_models`` deliberately does not do)."""

from __future__ import annotations

import io
import warnings

import torch

from pipelines.core.errors import UserError
from pipelines.storage import resolve

TORCHVISION = "torchvision"


class BackboneWeightsError(UserError):
    """Backbone weights that cannot be read or do not fit the model."""


def torchvision_weights(model: str):
    """torchvision's ImageNet weights enum for ``model``'s backbone: ResNet-101 / ResNet-18 for
    ``fcn8s_resnet101`` / ``fcn8s_resnet18``, VGG-16 (the paper's) for the VGG FCNs."""
    from torchvision.models import ResNet18_Weights, ResNet101_Weights, VGG16_Weights

    return {
        "fcn8s_resnet101": ResNet101_Weights.IMAGENET1K_V2,
        "fcn8s_resnet18": ResNet18_Weights.IMAGENET1K_V1,
    }.get(model, VGG16_Weights.IMAGENET1K_V1)


def load_state_dict(source: str, model: str = "fcn8s_resnet101") -> dict[str, torch.Tensor]:
    """A state_dict from a local path or ``s3://`` URI (``torch.save`` format, loaded as data),
    or ``torchvision`` for torchvision's ImageNet weights of ``model``'s backbone (downloads
    them: needs internet, never used by the tests)."""
    if source == TORCHVISION:
        return torchvision_weights(model).get_state_dict(progress=False)
    loc = resolve(source)
    if not loc.exists():
        raise FileNotFoundError(f"backbone weights {loc.uri}: no such file")
    try:
        state = torch.load(io.BytesIO(loc.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, or one that is not a torch.save archive
        raise BackboneWeightsError(f"{loc.uri}: not a torch.save state_dict ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{loc.uri}: expected a state_dict (name -> tensor)")
    return state


def load_backbone_weights(source: str, model: str, n_class: int) -> dict[str, torch.Tensor]:
    """:func:`load_state_dict`, checked against ``model``'s backbone (names and shapes) by
    building the model on the meta device: a mismatch is one clear error before any worker
    starts, not a stack trace in each of them."""
    from fcn_models import build_model

    state = load_state_dict(source, model)
    try:
        # Loading into meta tensors copies nothing (and torch warns so, once per tensor).
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_model(model, n_class, backbone_weights=state)
    except (ValueError, KeyError) as e:
        raise BackboneWeightsError(f"{source} does not fit {model}: {e}") from None
    return state
