"""Finding the records of a delivery: ApolloScape-layout trees (image and label files paired by
name) or CSV lists, and the train/val split by drive.

Every candidate found is returned, complete pairs and orphans alike: an orphan carries the
reason it cannot be ingested, so the manifest accounts for it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipelines.core.errors import UserError
from pipelines.storage import Location, resolve

# .../ColorImage_road02/ColorImage/Record001/Camera 5/NAME.jpg
_IMAGE_RE = re.compile(
    r"(?:^|/)ColorImage(?:_(?P<road>[^/]+))?/(?:ColorImage/)?(?P<rest>.+)\.(?:jpe?g)$", re.I
)
# .../Labels_road02/Label/Record001/Camera 5/NAME_bin.png
_LABEL_RE = re.compile(
    r"(?:^|/)Labels?(?:_(?P<road>[^/]+))?/(?:Label/)?(?P<rest>.+)_bin\.png$", re.I
)
_RECORD_RE = re.compile(r"^Record\d+$", re.I)


class IngestError(UserError):
    """Bad ingest arguments or a source that cannot be read at all."""


@dataclass
class Candidate:
    """One record found in the source: an image/label pair or an orphan of either."""

    image: str | None  # full URI
    label: str | None
    drive: str
    image_id: str
    reason: str | None = None  # set when rejected before processing
    image_size: int = -1  # bytes, from the listing; -1 when not listed (CSV sources)
    label_size: int = -1

    def as_row(self) -> dict:
        return {
            "image_id": self.image_id,
            "source_image": self.image or "",
            "source_label": self.label or "",
            "drive": self.drive,
            "reason": self.reason or "",
            "image_size": self.image_size,
            "label_size": self.label_size,
        }


@dataclass
class Discovery:
    candidates: list[Candidate]
    ignored_files: list[str] = field(default_factory=list)


def _drive_of(road: str | None, rest: str) -> str:
    """The drive a frame belongs to: road + record (frames of one drive never straddle the
    train/val split, or validation would see near-duplicates of training frames)."""
    parts = rest.split("/")
    record = next((p for p in parts if _RECORD_RE.match(p)), None)
    record = record or (posixpath.dirname(rest) or "unknown")
    return f"{road}/{record}" if road else record


def discover_tree(source: Location) -> Discovery:
    """Find Apollo-layout image/label pairs below ``source``."""
    images: dict[tuple, str] = {}
    label_paths: dict[tuple, str] = {}
    ignored: list[str] = []
    sizes: dict[str, int] = {}
    for info in source.list_files():
        sizes[info.path] = info.size if info.size is not None else -1
        rel = source.relative(info.path)
        m = _IMAGE_RE.search(rel)
        if m:
            images[(m["road"] or "", m["rest"])] = info.path
            continue
        m = _LABEL_RE.search(rel)
        if m:
            label_paths[(m["road"] or "", m["rest"])] = info.path
            continue
        ignored.append(source.at_path(info.path).uri)
    candidates = []
    for key in sorted(set(images) | set(label_paths)):
        road, rest = key
        image, label = images.get(key), label_paths.get(key)
        reason = None
        if image is None:
            reason = "image missing for label (expected a ColorImage*/...jpg of the same name)"
        elif label is None:
            reason = "label missing for image (expected a Label*/..._bin.png of the same name)"
        candidates.append(
            Candidate(
                image=source.at_path(image).uri if image else None,
                label=source.at_path(label).uri if label else None,
                drive=_drive_of(road or None, rest),
                image_id=f"{road}/{rest}" if road else rest,
                reason=reason,
                image_size=sizes[image] if image else -1,
                label_size=sizes[label] if label else -1,
            )
        )
    return Discovery(candidates, ignored)


def discover_csv(csv_loc: Location, allow_outside_root: bool = False) -> Discovery:
    """Pairs from a CSV with header ``image,label[,drive]``; paths are relative to the CSV's
    folder and must stay inside it (no absolute paths or URIs, no ``..`` out of it), unless
    ``allow_outside_root``: a manifest that names any file it likes could make the ingest read
    (and copy into shards) what its author cannot read."""
    try:
        rows = list(csv.DictReader(io.StringIO(csv_loc.read_text())))
    except UnicodeDecodeError as e:
        raise IngestError(f"{csv_loc.uri}: not a UTF-8 CSV file ({e})") from None
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise IngestError(
            f"{csv_loc.uri}: expected a CSV with header 'image,label' (optional 'drive'), "
            f"got columns {list(rows[0]) if rows else '(empty file)'}"
        )
    base = csv_loc.parent()

    def where(path: str) -> str:
        if "://" in path or path.startswith("/"):
            return resolve(path).uri
        return base.join(path).uri

    def outside(path: str) -> str | None:
        """Why ``path`` is outside the CSV's folder, or None."""
        if allow_outside_root:
            return None
        if "://" in path or path.startswith(("/", "\\")):
            return "is an absolute path or URI"
        if posixpath.normpath(path).split("/")[0] == "..":
            return "leads out of it with '..'"
        return None

    candidates = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        label = (row.get("label") or "").strip()
        reason = None
        if not image or not label:
            reason = f"CSV line {line}: empty 'image' or 'label' field"
        for column, path in (("image", image), ("label", label)):
            why = outside(path) if path and reason is None else None
            if why:
                reason = (
                    f"CSV line {line}: {column} {path!r} {why}: only files under the CSV's "
                    f"folder {base.uri} are read (--allow-outside-root to allow others)"
                )
        image_id = posixpath.splitext(image)[0] or f"line{line}"
        if image_id in seen and reason is None:
            reason = f"CSV line {line}: duplicate image {image!r}"
        seen.add(image_id)
        drive = (row.get("drive") or "").strip() or posixpath.dirname(image) or "unknown"
        candidates.append(
            Candidate(
                image=where(image) if image else None,
                label=where(label) if label else None,
                drive=drive,
                image_id=image_id if reason is None else f"{image_id}#line{line}",
                reason=reason,
            )
        )
    return Discovery(candidates)


def discover(source_uri: str, allow_outside_root: bool = False) -> Discovery:
    source = resolve(source_uri)
    if source.path.lower().endswith(".csv"):
        if not source.exists():
            raise IngestError(f"{source.uri}: CSV file not found")
        return discover_csv(source, allow_outside_root)
    if not source.is_dir():
        raise IngestError(f"{source.uri}: source folder not found (or not a folder/CSV)")
    found = discover_tree(source)
    if not found.candidates:
        raise IngestError(
            f"{source.uri}: no ColorImage*/...jpg or Label*/..._bin.png files found "
            f"({len(found.ignored_files)} other files)"
        )
    return found


def split_drives(drives: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign each drive to ``train`` or ``val`` from a seeded hash of its name.

    Hash-based so that a drive keeps its split when new drives are added later; with two or
    more drives and ``val_fraction > 0`` at least one drive goes to val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise IngestError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    drives = sorted(set(drives))

    def u(drive: str) -> float:
        h = hashlib.sha256(f"{seed}:{drive}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    out = {d: ("val" if u(d) < val_fraction else "train") for d in drives}
    if val_fraction > 0 and len(drives) >= 2:
        if "val" not in out.values():
            out[min(drives, key=u)] = "val"
        if "train" not in out.values():
            out[max(drives, key=u)] = "train"
    return out
