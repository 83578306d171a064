"""Loading pretrained backbone weights (the I/O that ``fcn_models`` deliberately does not do)."""

from __future__ import annotations

import io

import torch

from pipelines.storage import resolve

TORCHVISION = "torchvision"


def load_state_dict(source: str) -> dict[str, torch.Tensor]:
    """A state_dict from a local path or ``s3://`` URI (``torch.save`` format), or
    ``torchvision`` for torchvision's ImageNet ResNet-101 weights (downloads them: needs
    internet, never used by the tests)."""
    if source == TORCHVISION:
        from torchvision.models import ResNet101_Weights

        return ResNet101_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
    loc = resolve(source)
    if not loc.exists():
        raise FileNotFoundError(f"backbone weights {loc.uri}: no such file")
    state = torch.load(io.BytesIO(loc.read_bytes()), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {loc.uri}: expected a state_dict (name -> tensor)")
    return state
