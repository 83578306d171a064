"""The ingest workflow: discover image/label pairs, read them under limits, crop + resize, map
label ids (:mod:`pipelines.data.ingest`, as Ray Data stages), split train/val by drive, write
Parquet shards and a manifest; commit the version last.

Nothing is lost: every candidate record found ends up in a shard, in the manifest's ``rejected``
list with its reason (the record is bad), or in its ``unreadable`` list (storage still failed
after retries: the record may be fine, and the version is not committed):
``found == valid + rejected + unreadable``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace

from pipelines.core.errors import Exit
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.core.options import ConfigError, check_options, option
from pipelines.data.discover import discover, split_drives
from pipelines.data.ingest import place_rows, process_batch, source_height, valid_rows
from pipelines.data.manifest import IngestResult, build_manifest
from pipelines.data.shards import SPLITS, count_rows, write_shard
from pipelines.data.sources import SourceLimitOptions
from pipelines.data.versions import (
    MANIFEST_NAME,
    commit_version,
    new_version_name,
    prune_versions,
    read_pointer,
    version_location,
)
from pipelines.runtime import progress
from pipelines.runtime.progress import ProgressOptions
from pipelines.storage import Location, resolve

_DEFAULT = FrameTransform()


@dataclass(frozen=True, kw_only=True)
class IngestConfig(SourceLimitOptions, ProgressOptions):
    """What one ingest reads, how it transforms it, and where the new version goes."""

    source: str = option(help="Apollo-layout folder or CSV (image,label[,drive]); local or s3://")
    dest: str = option(help="dataset root: versions/NAME/ and current.json go here; local or s3://")
    size: tuple[int, int] = option(_DEFAULT.size, "model input WIDTHxHEIGHT", parse=parse_size)
    crop_top: int = option(_DEFAULT.crop_top, "sky rows cropped from the top of each frame", min=0)
    crop_bottom: int = option(
        _DEFAULT.crop_bottom, "rows cropped from the bottom (e.g. the ego hood)", min=0
    )
    source_height: int | None = option(
        None,
        "frame height the crops are counted in (default: the height of the first frame "
        "found); frames of another height from the same camera lose the same fraction of rows",
        min=1,
    )
    val_fraction: float = option(0.1, "fraction of drives held out for validation", min=0, below=1)
    seed: int = option(0, "seed of the drive split and of the row order in the shards")
    shard_mb: float = option(256.0, "target Parquet shard size in MB", above=0)
    keep_versions: int | None = option(
        None, "after committing, remove all but the newest N versions (default: keep all)", min=1
    )
    allow_unreadable: bool = option(
        False, "commit even if some records stayed unreadable after retries"
    )
    allow_outside_root: bool = option(
        False,
        "a CSV source may name files outside its own folder (absolute paths, URIs, '..'); by "
        "default such records are rejected",
    )

    def __post_init__(self) -> None:
        check_options(self)
        _ = self.transform  # crops that leave nothing: an error now, naming the flags

    @classmethod
    def of_transform(cls, source: str, dest: str, transform: FrameTransform, **options):
        """An ingest whose shards are the frames as ``transform`` prepares them."""
        return cls(source=str(source), dest=str(dest), size=transform.size,
                   crop_top=transform.crop_top, crop_bottom=transform.crop_bottom,
                   source_height=transform.source_height, **options)  # fmt: skip

    @property
    def transform(self) -> FrameTransform:
        try:
            return FrameTransform(
                width=self.size[0], height=self.size[1], crop_top=self.crop_top,
                crop_bottom=self.crop_bottom, source_height=self.source_height,
            )  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"--size/--crop-top/--crop-bottom/--source-height: {e}") from None


# -- the stages of one ingest -------------------------------------------------------------------
def _process(rows: list[dict], cfg: IngestConfig, transform: FrameTransform):
    """Every record read and processed by Ray Data (materialized: its rows are written to
    shards next), with a progress line; returns (dataset, its rows without the pixels)."""
    import ray

    blocks = max(1, min(len(rows), int(ray.available_resources().get("CPU", 1)) * 4))
    every_s, final = cfg.progress_seconds, lambda: len(rows)
    with progress.counted("ingest", len(rows), "records", every_s, final) as reports:
        processed = (
            ray.data.from_items(rows, override_num_blocks=blocks)
            .map_batches(
                process_batch,
                batch_size=4,
                batch_format="pandas",
                fn_kwargs={
                    "transform": transform,
                    "locate": resolve(cfg.source),
                    "limits": cfg.limits,
                    "reports": reports,
                },
            )  # fmt: skip
            .materialize()
        )
    meta = processed.drop_columns(["image", "label"]).to_pandas()
    if len(meta) != len(rows):  # every record comes back: as a row or with its reason
        raise RuntimeError(f"ingest processed {len(meta)} of {len(rows)} records")
    return processed, meta


def _write_shards(processed, file_of: dict[str, str], version: Location, seed: int) -> None:
    if not file_of:
        return
    (
        processed.map_batches(valid_rows, batch_format="pyarrow", fn_kwargs={"file_of": file_of})
        # One shuffle partition per file: the default (200 aggregators) made a small ingest
        # spend ~10 s starting them.
        .groupby("file", num_partitions=len(set(file_of.values())))
        .map_groups(write_shard, batch_format="pyarrow", fn_kwargs={"dest": version, "seed": seed})
        .materialize()
    )


def ingest(cfg: IngestConfig) -> IngestResult:
    """Ingest ``cfg.source`` (Apollo tree or CSV) into a new version of the dataset at
    ``cfg.dest``: ``dest/versions/NAME/{train,val}/*.parquet`` + ``manifest.json``, then
    ``dest/current.json`` pointing at it (the commit, last). Nothing already under ``dest``
    changes before the commit, so a crash at any point leaves the previous version current and
    whole. Not committed when nothing is valid, or when records stayed unreadable after retries
    (a storage outage would otherwise shrink the training set) unless ``allow_unreadable``.
    Re-running on the same source gives the same shards and manifest."""
    t0 = time.time()
    dest = resolve(cfg.dest)
    previous = read_pointer(dest)  # also a clear error now if dest holds a bad pointer
    found = discover(cfg.source, cfg.allow_outside_root)
    found.candidates.sort(key=lambda c: c.image_id)
    splits = split_drives((c.drive for c in found.candidates), cfg.val_fraction, cfg.seed)
    transform = cfg.transform
    if transform.source_height is None:
        transform = replace(transform, source_height=source_height(found, cfg.source, cfg.limits))
    rows = [{**c.as_row(), "split": splits[c.drive]} for c in found.candidates]
    processed, meta = _process(rows, cfg, transform)

    # Shards sized from the real encoded sizes: ~shard_mb each, at least one row.
    ok = meta["reason"] == ""
    mean_row_bytes = float(meta.loc[ok, "nbytes"].mean()) if ok.any() else 1.0
    rows_per_file = max(1, int(cfg.shard_mb * 2**20 // max(1.0, mean_row_bytes)))
    name = new_version_name()
    version = version_location(dest, name)
    _write_shards(processed, place_rows(meta, rows_per_file, cfg.seed), version, cfg.seed)

    manifest = build_manifest(
        source=resolve(cfg.source).uri, transform=transform, meta=meta, splits=splits,
        ignored_files=found.ignored_files, val_fraction=cfg.val_fraction, seed=cfg.seed,
        rows_per_file=rows_per_file, seconds=time.time() - t0,
    )  # fmt: skip
    manifest["version"] = name
    manifest["previous_version"] = previous["version"] if previous else None
    manifest["limits"] = {"max_bytes": cfg.max_bytes, "max_pixels": cfg.max_pixels}
    # Reconcile with what storage really holds (Parquet footers), not with what was asked for.
    written = {split: count_rows(version.join(split)) for split in SPLITS}
    if any(manifest["counts"][s] != written[s] for s in SPLITS):
        raise RuntimeError(
            f"{version.uri}: shards hold {written} rows, manifest says {manifest['counts']}"
        )
    data = json.dumps(manifest, indent=2).encode()  # class order kept
    version.join(MANIFEST_NAME).write_bytes(data)  # the version is complete ...
    counts = manifest["counts"]
    committed = counts["valid"] > 0 and (cfg.allow_unreadable or counts["unreadable"] == 0)
    if committed:  # ... and this makes it the one readers get
        commit_version(dest, name, hashlib.sha256(data).hexdigest()[:16])
    pruned = prune_versions(dest, cfg.keep_versions) if cfg.keep_versions else []
    return IngestResult(manifest, dest.uri, name, version.uri, committed, pruned)


def run(cfg: IngestConfig) -> int:
    """The ingest job: :func:`ingest`, its summary and the records it left out (the first ten
    of each kind). Exit status: 0 committed, 2 nothing valid, 3 records unreadable (storage
    trouble: not committed unless ``allow_unreadable``)."""
    from pipelines.runtime.cluster import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    result = ingest(cfg)
    print(result.summary())
    manifest = result.manifest
    where = f"{result.version_uri}/manifest.json"
    for kind in ("rejected", "unreadable"):
        for r in manifest[kind][:10]:
            print(f"  {kind} {r['image'] or r['label']}: {r['reason']}")
        if len(manifest[kind]) > 10:
            print(f"  ... and {len(manifest[kind]) - 10} more {kind} in {where}")
    for name in result.pruned:
        print(f"  removed old version {name}")
    if result.valid == 0:
        print("error: nothing valid to ingest (see the reasons above)", file=sys.stderr)
        return Exit.BAD_INPUT
    if not result.committed:
        print(
            f"error: {result.unreadable} records could not be read after "
            f"{cfg.read_retries} attempts (storage errors, listed above); the version was "
            "written but not committed, the current one is unchanged. Re-run when storage "
            "is healthy, or pass --allow-unreadable.",
            file=sys.stderr,
        )
        return Exit.TRANSIENT
    return Exit.OK
