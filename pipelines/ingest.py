"""Ingest raw drive data into Parquet shards: discover image/label pairs, validate, crop + resize,
map label ids, split train/val by drive, write shards with Ray Data, and a manifest.

Nothing is lost: every candidate record found ends up in a shard, in the manifest's ``rejected``
list with its reason (the record is bad), or in its ``unreadable`` list (storage still failed
after retries: the record may be fine, and the version is not committed, see
:func:`run_ingest`): ``found == valid + rejected + unreadable``. Label ids that are not in the
label map become the ignore index and are counted in ``unknown_ids``.

Each ingest writes a new dataset version and commits it last (:mod:`pipelines.versions`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import labels
from pipelines.errors import UserError
from pipelines.frames import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    FrameError,
    FrameTransform,
    decode_label,
    encode_jpeg,
    encode_png,
)
from pipelines.storage import (
    DEFAULT_RETRY,
    Location,
    ObjectTooLarge,
    Retry,
    TransientStorageError,
    resolve,
)
from pipelines.versions import (
    MANIFEST_NAME,
    commit_version,
    new_version_name,
    prune_versions,
    read_pointer,
    version_location,
)

SPLITS = ("train", "val")
SHARD_COLUMNS = (
    "image_id",
    "image",
    "label",
    "height",
    "width",
    "source_image",
    "source_label",
    "drive",
)
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),  # JPEG, model input size
        ("label", pa.binary()),  # PNG, training ids
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source_image", pa.string()),
        ("source_label", pa.string()),
        ("drive", pa.string()),
    ]
)
assert tuple(SHARD_SCHEMA.names) == SHARD_COLUMNS
IMAGE_SUFFIXES = (".jpg", ".jpeg")
LABEL_SUFFIX = "_bin.png"

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


def process_pair(
    image: bytes, label: bytes, transform: FrameTransform, max_pixels: int | None = None
) -> dict:
    """Validate and convert one pair. Raises :class:`FrameError` with the reason to reject."""
    # Decoded at the reduced size the model input allows (JPEG DCT scaling), as labeling does.
    small, (h, w) = transform.load_image(image, max_pixels=max_pixels, what="image")
    ids = decode_label(label, max_pixels=max_pixels, what="label")
    if (h, w) != ids.shape:
        raise FrameError(f"image is {w}x{h} but label is {ids.shape[1]}x{ids.shape[0]} (W x H)")
    train_ids, unknown = labels.to_train_ids(transform.prepare_label(ids))
    return {
        "image": encode_jpeg(small),
        "label": encode_png(train_ids),
        "height": int(small.shape[0]),
        "width": int(small.shape[1]),
        "class_pixels": labels.class_pixel_counts(train_ids),
        "ignore_pixels": int((train_ids == labels.IGNORE_INDEX).sum()),
        "unknown_ids": json.dumps(unknown),
    }


# One schema for every processed block, even an empty one or one whose rows were all rejected
# (a block built from pandas without rows has no columns, and the shuffle that groups rows into
# files refuses to concatenate it with the others).
PROCESSED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_image", pa.string()),
        ("source_label", pa.string()),
        ("drive", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),  # why the record is not in a shard; "" when it is
        ("unreadable", pa.bool_()),  # storage failed (transiently) after retries: not bad data
        ("image", pa.binary()),
        ("label", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("class_pixels", pa.list_(pa.int64())),
        ("ignore_pixels", pa.int64()),
        ("unknown_ids", pa.string()),
        ("nbytes", pa.int64()),
    ]
)


@dataclass(frozen=True)
class Limits:
    """What one record may be: checked from the listing (bytes) and the image header
    (pixels) before anything large is read or decoded."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry: Retry = DEFAULT_RETRY


def _process_batch(
    batch: pd.DataFrame, transform: FrameTransform, locate: Location, limits: Limits, counter=None
) -> pa.Table:
    """Ray Data stage: read + process each candidate of the batch; failures become reasons.
    ``counter``: the job's progress counter, given the batch's count when it is done."""
    out = []
    for row in batch.to_dict("records"):
        rec = {
            **{k: row[k] for k in ("image_id", "source_image", "source_label", "drive", "split")},
            "reason": row["reason"],
            "unreadable": False,
            "image": b"",
            "label": b"",
            "height": 0,
            "width": 0,
            "class_pixels": [0] * labels.N_CLASSES,
            "ignore_pixels": 0,
            "unknown_ids": "{}",
            "nbytes": 0,
        }
        if not rec["reason"]:
            try:
                image = _read(locate, rec["source_image"], "image", row["image_size"], limits)
                label = _read(locate, rec["source_label"], "label", row["label_size"], limits)
                rec.update(process_pair(image, label, transform, limits.max_pixels))
                rec["nbytes"] = len(rec["image"]) + len(rec["label"])
            except FrameError as e:
                rec["reason"] = str(e)
            except TransientStorageError as e:
                rec["reason"], rec["unreadable"] = str(e), True
        out.append(rec)
    from pipelines.progress import count

    count(counter, len(out))
    return pa.Table.from_pylist(out, schema=PROCESSED_SCHEMA)


def _read(anchor: Location, uri: str, what: str, listed_size: int, limits: Limits) -> bytes:
    """Read one source file. Bad or missing files become :class:`FrameError` (the record is
    rejected); storage that still fails after retries raises :class:`TransientStorageError`
    (the record is unreadable this time, not bad)."""
    if listed_size > limits.max_bytes:
        raise FrameError(
            f"{what} is {listed_size} bytes, over the --max-bytes limit {limits.max_bytes}"
        )
    try:
        return anchor.at_uri(uri).read_bytes(max_bytes=limits.max_bytes, retry=limits.retry)
    except ObjectTooLarge as e:
        raise FrameError(f"{what}: {e}") from None
    except TransientStorageError:
        raise
    except Exception as e:  # missing, permission denied: the record is bad, the ingest goes on
        raise FrameError(f"{what} could not be read ({type(e).__name__}: {e})") from None


def _valid_rows(batch: pa.Table, file_of: dict[str, str]) -> pa.Table:
    """Ray Data stage: the valid rows of a block with the shard file (relative to the
    version folder) each goes to; an explicit schema even when no row is valid."""
    ok = pc.equal(batch["reason"], "")
    valid = batch.filter(ok).select(list(SHARD_COLUMNS))
    files = [file_of[i] for i in valid["image_id"].to_pylist()]
    table = valid.append_column("file", pa.array(files, pa.string()))
    return table.cast(SHARD_SCHEMA.append(pa.field("file", pa.string())))


@dataclass
class IngestResult:
    manifest: dict
    dest: str  # the dataset root
    version: str
    version_uri: str
    committed: bool  # current.json now names this version
    pruned: list[str] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.manifest["counts"]["valid"]

    @property
    def unreadable(self) -> int:
        return self.manifest["counts"]["unreadable"]

    def summary(self) -> str:
        c = self.manifest["counts"]
        unknown = self.manifest["unknown_ids"]
        return (
            f"ingest: found {c['found']} records, wrote {c['train']} train + {c['val']} val "
            f"frames, rejected {c['rejected']}, unreadable {c['unreadable']}"
            + (f", unknown label ids {sorted(int(k) for k in unknown)}" if unknown else "")
            + f" -> {self.version_uri}"
            + (" (committed: the current version)" if self.committed else " (NOT committed)")
        )


def run_ingest(
    source: str,
    dest: str,
    *,
    transform: FrameTransform,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_bytes: int = 256 * 2**20,
    limits: Limits | None = None,
    keep_versions: int | None = None,
    allow_unreadable: bool = False,
    allow_outside_root: bool = False,
    progress: bool = True,
    progress_seconds: float = 30.0,
    slow_write: float = 0.0,
) -> IngestResult:
    """Ingest ``source`` (Apollo tree or CSV) into a new version of the dataset at ``dest``:
    ``dest/versions/NAME/{train,val}/*.parquet`` + ``manifest.json``, then ``dest/current.json``
    pointing at it (the commit, last). Nothing already under ``dest`` changes before the
    commit, so a crash at any point leaves the previous version current and whole.

    Not committed when nothing is valid, or when records stayed unreadable after retries (a
    storage outage would otherwise shrink the training set): re-run, or pass
    ``allow_unreadable``. A CSV source may name only files under its own folder unless
    ``allow_outside_root``. Re-running on the same source gives the same shards and manifest
    (rows in :func:`shard_order_key` order). ``keep_versions``: afterwards remove all but the
    newest that many versions. ``slow_write``: chaos testing, seconds to pause after each
    shard file. ``progress``: print a line (records processed / total, rate, ETA) at most every
    ``progress_seconds`` and at the end of the processing stage.
    """
    import ray

    from pipelines import progress as lines

    t0 = time.time()
    limits = limits or Limits()
    dest_loc = resolve(dest)
    previous = read_pointer(dest_loc)  # also a clear error now if dest holds a bad pointer
    found = discover(source, allow_outside_root)
    found.candidates.sort(key=lambda c: c.image_id)
    splits = split_drives((c.drive for c in found.candidates), val_fraction, seed)

    if transform.source_height is None:
        transform = replace(transform, source_height=source_height(found, source, limits))
    rows = [{**c.as_row(), "split": splits[c.drive]} for c in found.candidates]
    blocks = max(1, min(len(rows), int(ray.available_resources().get("CPU", 1)) * 4))
    counter = lines.counter_actor() if progress else None
    line = lines.RateLine("ingest", len(rows), "records", every_s=progress_seconds)
    with lines.reported(line, counter, final=lambda: len(rows)) if progress else nullcontext():
        processed = (
            ray.data.from_items(rows, override_num_blocks=blocks)
            .map_batches(
                _process_batch,
                batch_size=4,
                batch_format="pandas",
                fn_kwargs={
                    "transform": transform,
                    "locate": resolve(source),
                    "limits": limits,
                    "counter": counter,
                },  # fmt: skip
            )
            .materialize()
        )
    meta = processed.drop_columns(["image", "label"]).to_pandas()
    if len(meta) != len(rows):  # every record comes back: as a row or with its reason
        raise RuntimeError(f"ingest processed {len(meta)} of {len(rows)} records")
    ok = meta["reason"] == ""

    # Size shards from the real encoded sizes: ~shard_bytes each, at least one row.
    mean_row_bytes = float(meta.loc[ok, "nbytes"].mean()) if ok.any() else 1.0
    rows_per_file = max(1, int(shard_bytes // max(1.0, mean_row_bytes)))

    # Which file each valid row goes to is decided here, and each file is written in that
    # order: a re-run writes the same rows to the same files. (Ray Data's own Parquet sink
    # fills files in whatever order blocks arrive; with it, a re-run in the test suite
    # sometimes wrote a split's rows in another order.) The order is a seeded hash of the
    # id, not the id itself: sorted ids are consecutive video frames of one camera, and
    # every file and every run of rows in it would hold one drive; training reads files and
    # rows in streams, so each stream must already mix drives.
    name = new_version_name()
    version_loc = version_location(dest_loc, name)
    file_of: dict[str, str] = {}
    for split in SPLITS:
        ids = sorted(
            meta.loc[ok & (meta["split"] == split), "image_id"],
            key=lambda i: shard_order_key(i, seed),
        )
        file_of.update(
            {i: f"{split}/{split}-{n // rows_per_file:05d}.parquet" for n, i in enumerate(ids)}
        )
    if file_of:
        (
            processed.map_batches(
                _valid_rows, batch_format="pyarrow", fn_kwargs={"file_of": file_of}
            )
            # One shuffle partition per file: the default (200 aggregators) made a small
            # ingest spend ~10 s starting them.
            .groupby("file", num_partitions=len(set(file_of.values())))
            .map_groups(
                _write_shard,
                batch_format="pyarrow",
                fn_kwargs={"dest": version_loc, "seed": seed, "slow_write": slow_write},
            )
            .materialize()
        )

    manifest = build_manifest(
        source=resolve(source).uri,
        transform=transform,
        meta=meta,
        splits=splits,
        ignored_files=found.ignored_files,
        val_fraction=val_fraction,
        seed=seed,
        rows_per_file=rows_per_file,
        seconds=time.time() - t0,
    )
    manifest["version"] = name
    manifest["previous_version"] = previous["version"] if previous else None
    manifest["limits"] = {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels}
    # Reconcile with what storage really holds (Parquet footers), not with what was asked for.
    written = {split: count_rows(version_loc.join(split)) for split in SPLITS}
    if any(manifest["counts"][s] != written[s] for s in SPLITS):
        raise RuntimeError(
            f"{version_loc.uri}: shards hold {written} rows, manifest says {manifest['counts']}"
        )
    data = json.dumps(manifest, indent=2).encode()  # class order kept
    version_loc.join(MANIFEST_NAME).write_bytes(data)  # the version is complete ...
    committed = manifest["counts"]["valid"] > 0 and (
        allow_unreadable or manifest["counts"]["unreadable"] == 0
    )
    if committed:  # ... and this makes it the one readers get
        commit_version(dest_loc, name, hashlib.sha256(data).hexdigest()[:16])
    pruned = prune_versions(dest_loc, keep_versions) if keep_versions else []
    return IngestResult(manifest, dest_loc.uri, name, version_loc.uri, committed, pruned)


def source_height(found, source: str, limits: Limits, tries: int = 5) -> int | None:
    """The height of the delivery's frames, from the header of the first that can be opened
    (a few tries: a broken first file must not decide): what the crops are counted in, so a
    frame of the same camera at another resolution is cropped by the same fraction. None when
    none opens (nothing valid to ingest anyway)."""
    from PIL import Image

    anchor = resolve(source)
    for c in [c for c in found.candidates if not c.reason and c.image][:tries]:
        try:
            data = _read(anchor, c.image, "image", c.image_size, limits)
            return Image.open(io.BytesIO(data)).size[1]
        except Exception:  # noqa: BLE001 - that record's own processing reports why
            continue
    return None


def shard_order_key(image_id: str, seed: int) -> str:
    """The position of a row in its split's shards: a seeded hash of its id, so consecutive
    rows come from different drives, and a re-run puts every row where it was."""
    return hashlib.sha256(f"{seed}/{image_id}".encode()).hexdigest()


def _write_shard(group: pa.Table, dest: Location, seed: int, slow_write: float) -> pa.Table:
    """Ray Data stage: write the rows of one shard file, in :func:`shard_order_key` order."""
    name = group["file"][0].as_py()
    keys = [shard_order_key(i, seed) for i in group["image_id"].to_pylist()]
    table = group.take(np.argsort(keys, kind="stable")).select(list(SHARD_COLUMNS))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    dest.join(name).write_bytes(buf.getvalue().to_pybytes())  # one put, retried on outages
    time.sleep(slow_write)
    return pa.table({"file": [name], "rows": [table.num_rows]})


def count_rows(loc: Location) -> int:
    """Rows in the Parquet files below ``loc``, from their footers."""
    total = 0
    for info in loc.list_files((".parquet",)):
        with loc.fs.open_input_file(info.path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def build_manifest(
    *,
    source: str,
    transform: FrameTransform,
    meta: pd.DataFrame,
    splits: dict[str, str],
    ignored_files: list[str],
    val_fraction: float,
    seed: int,
    rows_per_file: int,
    seconds: float,
) -> dict:
    ok = meta["reason"] == ""
    unreadable = meta.loc[~ok & meta["unreadable"]].sort_values("image_id")
    rejected = meta.loc[~ok & ~meta["unreadable"]].sort_values("image_id")
    unknown: Counter[int] = Counter()
    unknown_frames: Counter[int] = Counter()
    for text in meta.loc[ok, "unknown_ids"]:
        for k, v in json.loads(text).items():
            unknown[int(k)] += v
            unknown_frames[int(k)] += 1
    class_pixels = {}
    for split in SPLITS:
        rows = meta.loc[ok & (meta["split"] == split), "class_pixels"]
        total = (
            np.sum(np.stack(rows.to_list()), axis=0) if len(rows) else np.zeros(labels.N_CLASSES)
        )
        class_pixels[split] = {
            name: int(v) for name, v in zip(labels.CLASS_NAMES, total, strict=True)
        }
    train_total = sum(class_pixels["train"].values())
    counts = {
        "found": int(len(meta)),
        "valid": int(ok.sum()),
        "rejected": len(rejected),
        "unreadable": len(unreadable),
        "train": int((ok & (meta["split"] == "train")).sum()),
        "val": int((ok & (meta["split"] == "val")).sum()),
        "ignored_files": len(ignored_files),
    }
    return {
        "format": "lane-shards/1",
        "source": source,
        "transform": transform.to_dict(),
        "n_class": labels.N_CLASSES,
        "class_names": list(labels.CLASS_NAMES),
        "val_fraction": val_fraction,
        "seed": seed,
        "rows_per_file": rows_per_file,
        "counts": counts,
        "drives": {s: sorted(d for d, v in splits.items() if v == s) for s in SPLITS},
        "class_pixels": class_pixels,
        "class_frequency": {
            name: (v / train_total if train_total else 0.0)
            for name, v in class_pixels["train"].items()
        },
        "ignore_pixels": int(meta.loc[ok, "ignore_pixels"].sum()),
        "unknown_ids": {
            str(k): {"pixels": v, "frames": unknown_frames[k]} for k, v in sorted(unknown.items())
        },
        "rejected": _records(rejected),
        # Storage failed after retries: not bad data; a re-run reads them again.
        "unreadable": _records(unreadable),
        "ignored_files": ignored_files,
        "seconds": round(seconds, 2),
    }


def _records(frame: pd.DataFrame) -> list[dict]:
    return [
        {"image_id": r.image_id, "image": r.source_image, "label": r.source_label,
         "reason": r.reason}
        for r in frame.itertuples()
    ]  # fmt: skip
