"""The model directory: the one on-disk format of a trained model, shared by training
checkpoints and registered MLflow models.

- ``model.pt``: the model's ``state_dict``, loaded as data only (``weights_only``);
- ``model.json``: the :class:`ModelSpec` (factory name, classes, frame transform), rebuilt by
  ``fcn_models.build_model``.

PyTorch is imported by the functions that need it: the spec and the file names are read by
code that has no use for it (labeling's driver).
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.core.errors import UserError
from pipelines.core.frames import FrameTransform

if TYPE_CHECKING:
    from torch import nn

MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it exactly as in training."""

    model: str
    n_class: int
    transform: FrameTransform
    class_names: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)  # provenance: data manifest, run id, code version

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "n_class": self.n_class,
                "transform": self.transform.to_dict(),
                "class_names": list(self.class_names),
                "info": self.info,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        d = json.loads(text)
        return cls(
            model=d["model"],
            n_class=int(d["n_class"]),
            transform=FrameTransform.from_dict(d["transform"]),
            class_names=tuple(d.get("class_names", ())),
            info=d.get("info", {}),
        )


class UnsafeFileError(UserError):
    """A weights or state file that would need more than tensors and plain data to load."""


def load_tensors(path: str | Path, data: bytes | None = None):
    """``torch.load`` as data only (``weights_only=True``): tensors and plain containers.
    A file whose pickle would call anything else (run code) is refused, never executed.
    ``data``: the file's bytes already read (``path`` then only names it in errors)."""
    import torch

    try:
        source = io.BytesIO(data) if data is not None else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"{path}: refused to load: it holds more than tensors and plain data, so loading "
            f"it could run code ({reason[:300]})"
        ) from None


def save_model_dir(directory: str | Path, model: nn.Module, spec: ModelSpec) -> Path:
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, directory / MODEL_FILE)
    (directory / SPEC_FILE).write_text(spec.to_json())
    return directory


def load_model_dir(directory: str | Path) -> tuple[nn.Module, ModelSpec]:
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file() or not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{directory}: not a model directory (expected {MODEL_FILE} and {SPEC_FILE})"
        )
    return model_from_files(
        {MODEL_FILE: (directory / MODEL_FILE).read_bytes(), SPEC_FILE: spec_path.read_bytes()},
        where=str(directory),
    )


def model_from_files(files: dict[str, bytes], where: str = "model") -> tuple[nn.Module, ModelSpec]:
    """A model directory's files as bytes ({MODEL_FILE: ..., SPEC_FILE: ...}) -> the model
    (built by ``build_model`` from the spec, weights loaded as data) and its spec."""
    from fcn_models import build_model

    spec = ModelSpec.from_json(files[SPEC_FILE].decode())
    model = build_model(spec.model, spec.n_class)
    model.load_state_dict(load_tensors(f"{where}/{MODEL_FILE}", files[MODEL_FILE]))
    return model, spec


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
