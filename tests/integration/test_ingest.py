"""Ingest: synthetic and real label data, local and S3, bad input, idempotency, dataset
versions (commit last, readers pinned, killed ingests), input limits."""

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from pipelines.core import labels
from pipelines.core.codecs import decode_label, decode_png_mask, decode_rgb
from pipelines.core.frames import FrameTransform
from pipelines.data.discover import IngestError, discover, split_drives
from pipelines.data.shards import SHARD_COLUMNS
from pipelines.data.sources import Limits
from pipelines.data.synthetic import frame_paths, label_png, render_frame, write_tree
from pipelines.data.versions import resolve_dataset
from pipelines.data.workflow import ingest
from pipelines.storage import resolve
from tests.support.fault_handler import fault_env
from tests.support.helpers import CROP_TOP, FRAME_H, FRAME_W, SHARED_DATA, ingest_config, job_env


def read_split(uri: str, split: str):
    loc = resolve_dataset(uri).location.join(split)
    files = [i.path for i in loc.list_files((".parquet",))]
    return pq.ParquetDataset(files, filesystem=loc.fs).read().to_pandas() if files else None


def test_synthetic_tree_local(local_shards, test_transform):
    manifest = resolve_dataset(local_shards).manifest
    c = manifest["counts"]
    assert c["found"] == c["valid"] + c["rejected"] + c["unreadable"] == 24
    assert c["train"] + c["val"] == 24 and c["val"] > 0
    assert not set(manifest["drives"]["train"]) & set(manifest["drives"]["val"])
    # The crops are recorded with the height they are counted in: the source frames'.
    recorded = FrameTransform.from_dict(manifest["transform"])
    assert recorded == replace(test_transform, source_height=FRAME_H)
    train, val = read_split(local_shards, "train"), read_split(local_shards, "val")
    assert list(train.columns) == list(SHARD_COLUMNS)
    assert len(train) == c["train"] and len(val) == c["val"]
    assert not set(train["drive"]) & set(val["drive"])
    assert train["image_id"].is_unique
    row = train.iloc[0]
    assert decode_rgb(row["image"]).shape == (64, 128, 3)
    lbl = decode_png_mask(row["label"])
    assert lbl.shape == (64, 128) and set(np.unique(lbl)) <= set(range(8))
    # Class pixel frequencies in the manifest equal what the shards hold.
    counts = np.zeros(8, dtype=np.int64)
    for data in train["label"]:
        counts += np.bincount(decode_png_mask(data).ravel(), minlength=256)[:8]
    assert [manifest["class_pixels"]["train"][n] for n in labels.CLASS_NAMES] == counts.tolist()
    assert list(manifest["class_pixels"]["train"]) == list(labels.CLASS_NAMES)  # class order


def test_pixel_values_round_trip_exactly(local_shards, test_transform):
    """A shard's label equals the source label put through the one transform and label map."""
    train = read_split(local_shards, "train")
    row = train.iloc[3]
    source = decode_label(resolve(row["source_label"]).read_bytes())
    expected, _ = labels.to_train_ids(test_transform.prepare_label(source))
    assert np.array_equal(decode_png_mask(row["label"]), expected)
    assert (row["height"], row["width"]) == (64, 128)


def test_split_is_deterministic_and_by_drive():
    drives = [f"road{r}/Record{i:03d}" for r in range(2) for i in range(20)]
    a, b = split_drives(drives, 0.2, seed=3), split_drives(list(reversed(drives)), 0.2, seed=3)
    assert a == b
    assert 2 <= sum(v == "val" for v in a.values()) <= 16
    # Adding drives never moves an existing one.
    c = split_drives(drives + ["road9/Record001"], 0.2, seed=3)
    assert all(c[d] == a[d] for d in drives)
    assert set(split_drives(["one", "two"], 0.01, 0).values()) == {"train", "val"}
    with pytest.raises(IngestError, match="val-fraction"):
        split_drives(drives, 1.0, 0)


def make_bad_tree(root):
    """A tree with 3 good pairs and one record of every bad kind."""
    write_tree(root, 3, records=3, width=FRAME_W, height=FRAME_H, seed=7)
    rng = np.random.default_rng(1)
    bad = {}

    def pair(name: str, record: int = 9):
        p = frame_paths(root, "road02", record, 5, name)
        p.image.parent.mkdir(parents=True, exist_ok=True)
        p.label.parent.mkdir(parents=True, exist_ok=True)
        frame, label = render_frame(rng, FRAME_W, FRAME_H)
        Image.fromarray(frame).save(p.image, format="JPEG")
        p.label.write_bytes(label_png(label))
        return p, frame, label

    p, *_ = pair("no_label")
    p.label.unlink()
    bad[p.image] = "label missing"
    p, *_ = pair("no_image")
    p.image.unlink()
    bad[p.label] = "image missing"
    p, *_ = pair("zero_byte")
    p.image.write_bytes(b"")
    bad[p.image] = "empty \\(zero-byte\\)"
    p, *_ = pair("truncated")
    data = p.image.read_bytes()
    p.image.write_bytes(data[: len(data) // 2])
    bad[p.image] = "truncated or corrupt"
    p, *_ = pair("not_an_image")
    p.image.write_text("<html>404 not found</html>")
    bad[p.image] = "not a readable image"
    p, frame, _ = pair("size_mismatch")
    Image.fromarray(frame[:-10]).save(p.image, format="JPEG")
    bad[p.image] = "but label is"
    p, _, label = pair("rgb_label")
    Image.fromarray(np.stack([label] * 3, axis=-1)).save(p.label)
    bad[p.image] = "single-channel 8-bit"
    # Valid, but with an id outside the label map (counted, mapped to ignore).
    p, _, label = pair("unknown_ids", record=8)
    label = label.copy()
    label[-20:, :50] = 7
    p.label.write_bytes(label_png(label))
    return bad


def test_every_bad_input_is_in_the_manifest(tmp_path, ray_cluster, test_transform):
    bad = make_bad_tree(tmp_path / "src")
    result = ingest(ingest_config(str(tmp_path / "src"), str(tmp_path / "out"), test_transform))
    m = result.manifest
    assert m["counts"]["found"] == 3 + len(bad) + 1
    assert m["counts"]["valid"] == 4 and m["counts"]["rejected"] == len(bad)
    assert m["counts"]["found"] == m["counts"]["valid"] + m["counts"]["rejected"]
    rejected = {(r["image"] or r["label"]): r["reason"] for r in m["rejected"]}
    assert len(rejected) == len(bad)
    for path, reason in bad.items():
        assert str(path) in rejected, path
        assert re.search(reason, rejected[str(path)]), (path, rejected[str(path)])
    # 20x50 source pixels of id 7, resized nearest to the model size: counted, never background.
    assert list(m["unknown_ids"]) == ["7"] and m["unknown_ids"]["7"]["frames"] == 1
    assert 0 < m["unknown_ids"]["7"]["pixels"] <= 20 * 50
    written = len(read_split(str(tmp_path / "out"), "train")) + len(
        read_split(str(tmp_path / "out"), "val")
    )
    assert written == 4


def test_rerun_is_idempotent(tmp_path, ray_cluster, synthetic_tree, test_transform):
    dest = str(tmp_path / "out")
    first = ingest(ingest_config(str(synthetic_tree), dest, test_transform, val_fraction=0.25))
    rows1 = {s: read_split(dest, s) for s in ("train", "val")}
    second = ingest(ingest_config(str(synthetic_tree), dest, test_transform, val_fraction=0.25))
    rows2 = {s: read_split(dest, s) for s in ("train", "val")}
    for s in ("train", "val"):
        assert len(rows2[s]) == len(rows1[s])  # no duplicates
        assert rows2[s]["image_id"].tolist() == rows1[s]["image_id"].tolist()
        assert rows2[s]["label"].tolist() == rows1[s]["label"].tolist()
    assert second.manifest["previous_version"] == first.version != second.version
    volatile = ("seconds", "version", "previous_version")
    strip = lambda m: {k: v for k, v in m.items() if k not in volatile}  # noqa: E731
    assert strip(first.manifest) == strip(second.manifest)


def test_ingest_to_s3_and_read_back_with_ray_data(
    s3_prefix, synthetic_tree, ray_cluster, test_transform
):
    from pipelines.data.shards import build_dataset

    code = ingest_job.main(
        [
            "--source",
            str(synthetic_tree),
            "--dest",
            s3_prefix,
            "--size",
            "128x64",
            "--crop-top",
            str(CROP_TOP),
            "--val-fraction",
            "0.25",
        ]
    )
    assert code == 0
    manifest = resolve_dataset(s3_prefix).manifest
    assert manifest["counts"]["valid"] == 24
    total = 0
    for split in ("train", "val"):
        ds = build_dataset(s3_prefix, split)
        rows = ds.take_all()
        assert len(rows) == manifest["counts"][split]
        total += len(rows)
        for r in rows[:3]:
            assert r["image"].shape == (64, 128, 3) and r["image"].dtype == np.uint8
            assert r["label"].shape == (64, 128)
    assert total == 24
    # Exact pixel round trip through S3: the shard label equals the local source's.
    shard = read_split(s3_prefix, "train").iloc[0]
    expected, _ = labels.to_train_ids(
        test_transform.prepare_label(decode_label(resolve(shard["source_label"]).read_bytes()))
    )
    assert np.array_equal(decode_png_mask(shard["label"]), expected)


def test_source_on_s3(s3_prefix, synthetic_tree, tmp_path, ray_cluster, test_transform):
    src = resolve(s3_prefix).join("raw")
    for path in sorted(synthetic_tree.rglob("*")):
        if path.is_file() and "Record004" not in str(path):
            src.join(str(path.relative_to(synthetic_tree))).write_bytes(path.read_bytes())
    # An orphan label: found, and rejected with its reason.
    src.join("Labels_road02/Label/Record009/Camera 5/lonely_Camera_5_bin.png").write_bytes(b"x")
    found = discover(src.uri)
    pairs = sum(c.reason is None for c in found.candidates)
    result = ingest(ingest_config(src.uri, str(tmp_path / "out"), test_transform))
    c = result.manifest["counts"]
    assert c["found"] == len(found.candidates) == c["valid"] + c["rejected"]
    assert c["valid"] == pairs == 18  # every complete pair read from S3 was good
    assert c["rejected"] == 1
    assert all(
        r["image"].startswith("s3://") or r["label"].startswith("s3://")
        for r in result.manifest["rejected"]
    )
    shard = read_split(str(tmp_path / "out"), "train")
    assert shard["source_image"].str.startswith("s3://lanes/").all()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_real_apollo_labels_with_generated_frames(tmp_path, ray_cluster):
    """The real label files (3384x2710 palette PNGs, a space in 'Camera 5'), each paired with a
    generated frame of the same size."""
    rng = np.random.default_rng(0)
    for f in sorted(SHARED_DATA.glob("*_bin.png")):
        stem = f.name[: -len("_bin.png")]
        p = frame_paths(tmp_path / "src", "road02", 1, 5, stem.rsplit("_Camera", 1)[0])
        p.label.parent.mkdir(parents=True, exist_ok=True)
        p.image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, p.label)
        frame, _ = render_frame(rng, 3384, 2710)
        Image.fromarray(frame).save(p.image, format="JPEG", quality=80)
    transform = FrameTransform(width=256, height=96, crop_top=690)
    result = ingest(
        ingest_config(str(tmp_path / "src"), str(tmp_path / "out"), transform, val_fraction=0.0)
    )
    m = result.manifest
    assert m["counts"] == {
        "found": 3,
        "valid": 3,
        "rejected": 0,
        "unreadable": 0,
        "train": 3,
        "val": 0,
        "ignored_files": 0,
    }
    assert m["unknown_ids"] == {}
    px = m["class_pixels"]["train"]
    for name in ("dividing", "guiding", "stopping", "zebra", "thru_turn", "reduction_other"):
        assert px[name] > 0, name
    assert px["parking"] == 0
    train = read_split(str(tmp_path / "out"), "train")
    assert all(" " in s for s in train["source_image"])  # 'Camera 5' survived


def test_csv_source(tmp_path, synthetic_tree, ray_cluster, test_transform):
    """Paths relative to the CSV's folder; a file named twice, a missing one, and files
    outside the CSV's folder (an absolute path, a '..' path) each rejected with its reason,
    the outside ones admitted only with allow_outside_root."""
    images = sorted(synthetic_tree.rglob("*.jpg"))[:5]
    pairs = []
    for img in images:
        label = str(img).replace("ColorImage_", "Labels_").replace("/ColorImage/", "/Label/")
        pairs.append((img, Path(label[: -len(".jpg")] + "_bin.png")))
    delivery = tmp_path / "delivery"
    lines = ["image,label,drive"]
    for i, (img, label) in enumerate(pairs[:4]):
        (delivery / f"d{i}").mkdir(parents=True)
        shutil.copy(img, delivery / f"d{i}" / "frame.jpg")
        shutil.copy(label, delivery / f"d{i}" / "frame_bin.png")
        lines.append(f"d{i}/frame.jpg,d{i}/frame_bin.png,drive{i % 2}")
    lines.append("d0/frame.jpg,d0/missing_bin.png,drive0")  # duplicate image
    lines.append("extra.jpg,nope.png,drive1")  # missing files
    img, label = pairs[4]
    lines.append(f"{img},{label},drive1")  # absolute: outside the CSV's folder
    shutil.copy(img, tmp_path / "outside.jpg")
    shutil.copy(label, tmp_path / "outside_bin.png")
    lines.append("d1/../../outside.jpg,../outside_bin.png,drive0")
    (delivery / "pairs.csv").write_text("\n".join(lines) + "\n")

    def ingest_csv(out: str, **kw):
        return ingest(ingest_config(str(delivery / "pairs.csv"), str(tmp_path / out),
                                    test_transform, val_fraction=0.5, **kw))  # fmt: skip

    result = ingest_csv("out")
    c = result.manifest["counts"]
    assert (c["found"], c["valid"], c["rejected"]) == (8, 4, 4)
    reasons = sorted(r["reason"] for r in result.manifest["rejected"])
    assert reasons[0].startswith("CSV line 6: duplicate image")
    assert reasons[1] == (
        f"CSV line 8: image {str(img)!r} is an absolute path or URI: only files under the "
        f"CSV's folder {delivery} are read (--allow-outside-root to allow others)"
    )
    assert reasons[2].startswith("CSV line 9: image 'd1/../../outside.jpg' leads out of it")
    assert "could not be read" in reasons[3]
    assert set(result.manifest["drives"]["train"]) | set(result.manifest["drives"]["val"]) == {
        "drive0",
        "drive1",
    }
    c = ingest_csv("out-allowed", allow_outside_root=True).manifest["counts"]
    assert (c["found"], c["valid"], c["rejected"]) == (8, 6, 2)
    (tmp_path / "bad.csv").write_text("path;other\nx;y\n")
    with pytest.raises(IngestError, match="header 'image,label'"):
        ingest(ingest_config(str(tmp_path / "bad.csv"), str(tmp_path / "out2"), test_transform))


def test_nothing_valid_exits_nonzero(tmp_path, ray_cluster, capsys):
    src = tmp_path / "src"
    p = frame_paths(src, "road02", 1, 5, "only")
    p.image.parent.mkdir(parents=True)
    p.image.write_bytes(b"")
    code = ingest_job.main(
        [
            "--source",
            str(src),
            "--dest",
            str(tmp_path / "out"),
            "--size",
            "64x32",
            "--crop-top",
            "0",
        ]
    )
    out = capsys.readouterr()
    assert code == 2  # bad input: nothing valid
    assert "found 1 records, wrote 0 train + 0 val frames, rejected 1" in out.out
    assert "nothing valid" in out.err
    # A missing source is one clear line, exit 2.
    assert (
        ingest_job.main(["--source", str(tmp_path / "nowhere"), "--dest", str(tmp_path / "o")]) == 2
    )
    assert "source folder not found" in capsys.readouterr().err


def test_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("source: /a\ndest: /b\nsize: 320x96\ncrop-top: 10\n")
    args = ingest_job.load_config(["--config", str(cfg), "--crop-top", "20"])
    assert (args.source, args.dest, args.size, args.crop_top) == ("/a", "/b", (320, 96), 20)
    cfg.write_text("source: /a\ndest: /b\nsizes: 1x1\n")
    from jobs._cli import ConfigError

    with pytest.raises(ConfigError, match="unknown option 'sizes'"):
        ingest_job.load_config(["--config", str(cfg)])


# -- broken deliveries -------------------------------------------------------------------------
def break_pair(p, kind: int) -> str:
    """Break one written pair in one of five ways; returns the expected reason fragment."""
    kind %= 5
    if kind == 0:
        p.image.write_bytes(b"")
        return "empty \\(zero-byte\\)"
    if kind == 1:
        p.label.unlink()
        return "label missing"
    if kind == 2:
        data = p.image.read_bytes()
        p.image.write_bytes(data[: len(data) // 3])
        return "truncated or corrupt"
    if kind == 3:
        p.label.write_bytes(b"<html>503 Service Unavailable</html>")
        return "not a readable PNG"
    p.image.unlink()
    return "image missing"


def broken_delivery(root, good: int, broken: int) -> dict[str, str]:
    """``good`` pairs over two records and one record folder (road03/Record001) holding only
    broken pairs. Returns {path of the broken record: expected reason}."""
    write_tree(root, good, records=2, width=FRAME_W, height=FRAME_H, seed=3)
    pairs = write_tree(root, broken, records=1, width=FRAME_W, height=FRAME_H, seed=4,
                       road="road03")  # fmt: skip
    expected = {}
    for i, p in enumerate(pairs):
        why = break_pair(p, i)
        expected[str(p.label if why == "image missing" else p.image)] = why
    return expected


def ingest_cli(source, dest, *extra: str) -> list[str]:
    return ["--source", str(source), "--dest", str(dest), "--size", "128x64",
            "--crop-top", str(CROP_TOP), *extra]  # fmt: skip


@pytest.mark.parametrize("good, broken", [(6, 20), (1, 30)], ids=["broken-folder", "all-but-one"])
def test_broken_deliveries_are_reported_not_fatal(tmp_path, ray_cluster, capsys, good, broken):
    """A whole record folder of broken pairs (whole Ray blocks of rejected rows), and a
    delivery where every record but one is broken: each broken record is named with its
    reason, the valid ones are written and committed, exit 0."""
    expected = broken_delivery(tmp_path / "src", good, broken)
    code = ingest_job.main(ingest_cli(tmp_path / "src", tmp_path / "out"))
    out = capsys.readouterr()
    assert code == 0, out.err
    data = resolve_dataset(str(tmp_path / "out"))
    c = data.manifest["counts"]
    assert (c["found"], c["valid"], c["rejected"], c["unreadable"]) == (good + broken, good,
                                                                         broken, 0)  # fmt: skip
    rejected = {(r["image"] or r["label"]): r["reason"] for r in data.manifest["rejected"]}
    assert rejected.keys() == expected.keys()
    for path, why in expected.items():
        assert re.search(why, rejected[path]), (path, rejected[path])
    assert f"rejected {broken}" in out.out and "(committed: the current version)" in out.out
    # The progress line for every record, rejected ones included (no terminal needed).
    total = good + broken
    assert re.search(rf"^ingest: {total}/{total} records \(100%\), [\d.]+ records/s$", out.out,
                     re.M), out.out  # fmt: skip
    rows = sum(len(t) for t in (read_split(str(tmp_path / "out"), s) for s in ("train", "val"))
               if t is not None)  # fmt: skip
    assert rows == good


def test_processing_stages_keep_one_schema_for_empty_and_rejected_blocks(test_transform):
    """The shuffle that groups rows into files needs every block to have the same schema:
    a block with no rows, or with only rejected rows, included."""
    import pandas as pd

    from pipelines.data.ingest import PROCESSED_SCHEMA, process_batch, valid_rows
    from pipelines.data.shards import SHARD_SCHEMA

    columns = ["image_id", "source_image", "source_label", "drive", "split", "reason",
               "image_size", "label_size"]  # fmt: skip
    anchor = resolve(".")
    empty = process_batch(pd.DataFrame(columns=columns), test_transform, anchor, Limits())
    assert empty.schema == PROCESSED_SCHEMA and empty.num_rows == 0
    rejected = pd.DataFrame(
        [["a", "", "/x_bin.png", "d", "train", "image missing", -1, 10]], columns=columns
    )
    block = process_batch(rejected, test_transform, anchor, Limits())
    assert block.schema == PROCESSED_SCHEMA and block["reason"].to_pylist() == ["image missing"]
    for b in (empty, block):
        valid = valid_rows(b, {})
        assert valid.num_rows == 0
        assert valid.schema == SHARD_SCHEMA.append(pa.field("file", pa.string()))


# -- versions ----------------------------------------------------------------------------------
def test_reingest_is_a_new_version_and_readers_stay_pinned(
    tmp_path, ray_cluster, synthetic_tree, test_transform
):
    from pipelines.data.shards import shard_files
    from pipelines.data.versions import list_versions

    small = tmp_path / "small"
    write_tree(small, 4, records=2, width=FRAME_W, height=FRAME_H, seed=9)
    dest = str(tmp_path / "data")
    first = ingest(ingest_config(str(small), dest, test_transform, val_fraction=0.5))  # fmt: skip
    pinned = resolve_dataset(dest)  # what a job resolved at its start
    assert pinned.name == first.version and first.committed

    def ids(uri: str) -> list[str]:  # the files the training and evaluation readers get
        files = [f for s in ("train", "val") for f in shard_files(uri, s)]
        return sorted(pq.ParquetDataset(files).read(columns=["image_id"])["image_id"].to_pylist())

    before = ids(pinned.uri)
    assert len(before) == 4
    second = ingest(ingest_config(str(synthetic_tree), dest, test_transform, val_fraction=0.25))  # fmt: skip
    assert second.manifest["previous_version"] == first.version
    assert resolve_dataset(dest).name == second.version
    assert ids(pinned.uri) == before  # the running job still reads exactly its version
    assert len(ids(dest)) == 24  # a new job gets the new one
    assert [v.name for v in list_versions(resolve(dest))] == [first.version, second.version]

    third = ingest(ingest_config(str(small), dest, test_transform, val_fraction=0.5, keep_versions=1))  # fmt: skip
    assert third.pruned == [first.version, second.version]
    assert [v.name for v in list_versions(resolve(dest))] == [third.version]
    assert ids(dest) == before


@pytest.mark.slow
def test_ingest_killed_while_writing_leaves_previous_version(
    tmp_path, ray_cluster, synthetic_tree, test_transform
):
    """SIGKILL of the whole process group of an ingest in the middle of writing shards: the
    destination still resolves to the previous version, and training reads exactly its
    frames."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipelines.data.shards import build_dataset
    from pipelines.data.versions import list_versions
    from tests.support.helpers import ROOT

    small = tmp_path / "small"
    write_tree(small, 4, records=2, width=FRAME_W, height=FRAME_H, seed=9)
    dest = tmp_path / "data"
    first = ingest(ingest_config(str(small), str(dest), test_transform, val_fraction=0.5))  # fmt: skip
    # ~3 rows per shard file and a pause after each: the kill lands between shard files.
    env = job_env(**fault_env("ingest.shard_written=20"))
    argv = ingest_cli(synthetic_tree, dest, "--shard-mb", "0.01")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.ingest", *argv], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            new = [v for v in list_versions(resolve(dest)) if v.name != first.version]
            if new and resolve(dest).join("versions", new[0].name).list_files((".parquet",)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "the ingest never started writing"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    [partial] = [v for v in list_versions(resolve(dest)) if v.name != first.version]
    assert not partial.complete and not partial.current

    data = resolve_dataset(str(dest))
    assert data.name == first.version
    seen = sorted(r["image_id"] for s in ("train", "val")
                  for r in build_dataset(data.uri, s).take_all())  # fmt: skip
    expected = sorted(read_split(str(dest), "train")["image_id"].tolist()
                      + read_split(str(dest), "val")["image_id"].tolist())  # fmt: skip
    assert seen == expected and len(seen) == 4


# -- input limits ------------------------------------------------------------------------------
def test_input_limits_reject_before_reading(tmp_path, ray_cluster, test_transform):
    """A 50 GB "frame" (sparse: the listing says 50 GB) is rejected from its listed size
    without being read, a label over the pixel limit from its PNG header."""
    src = tmp_path / "src"
    write_tree(src, 3, records=1, width=FRAME_W, height=FRAME_H, seed=5)
    huge = frame_paths(src, "road02", 7, 5, "huge")
    huge.image.parent.mkdir(parents=True)
    huge.label.parent.mkdir(parents=True)
    with open(huge.image, "wb") as f:
        f.truncate(50 * 2**30)
    huge.label.write_bytes(label_png(np.zeros((FRAME_H, FRAME_W), np.uint8)))
    wide = frame_paths(src, "road02", 7, 5, "wide")
    Image.fromarray(render_frame(np.random.default_rng(0), FRAME_W, FRAME_H)[0]).save(wide.image)
    wide.label.write_bytes(label_png(np.zeros((2000, 3000), np.uint8)))  # 6 MP, a few KB
    result = ingest(ingest_config(str(src), str(tmp_path / "out"), test_transform, val_fraction=0.0, max_bytes=2**20, max_pixels=1_000_000))  # fmt: skip
    reasons = {r["image_id"].rsplit("/", 1)[-1]: r["reason"] for r in result.manifest["rejected"]}
    assert reasons.keys() == {"huge_Camera_5", "wide_Camera_5"}, reasons
    assert f"is {50 * 2**30} bytes, over the --max-bytes limit {2**20}" in reasons["huge_Camera_5"]
    assert "label is 3000x2000 = 6000000 pixels, more than the limit" in reasons["wide_Camera_5"]
    assert result.valid == 3 and result.manifest["limits"]["max_bytes"] == 2**20


# -- storage outages ---------------------------------------------------------------------------
@pytest.mark.slow
def test_s3_outage_mid_ingest(tmp_path, ray_cluster, test_transform, capsys, monkeypatch):
    """The source's S3 server refuses every connection for 10 s in the middle of an ingest.
    With the default retries the ingest rides it out: every record valid, committed. With a
    retry budget shorter than the outage, the records it could not read are named as
    unreadable (not rejected), the ingest exits 3 and does not commit: the previous version
    stays current; the re-run commits everything."""
    from tests.support.faults import outage_server

    local = tmp_path / "local"
    write_tree(local, 6, records=2, width=FRAME_W, height=FRAME_H, seed=11)
    dest = str(tmp_path / "data")

    def upload(srv) -> str:
        src = srv.location("s3://lanes/raw")
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            src.join(str(path.relative_to(local))).write_bytes(path.read_bytes())
        return src.uri

    with outage_server(outage_after_gets=4, outage_seconds=10) as srv:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", srv.endpoint)
        source = upload(srv)
        first = ingest(ingest_config(source, dest, test_transform, val_fraction=0.5))  # fmt: skip
        assert srv.outages_started == 1 and srv.outages_ended == 1
    c = first.manifest["counts"]
    assert (c["valid"], c["rejected"], c["unreadable"], first.committed) == (6, 0, 0, True)

    with outage_server(outage_after_gets=4, outage_seconds=10) as srv:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", srv.endpoint)
        source = upload(srv)
        argv = ingest_cli(source, dest, "--val-fraction", "0.5", "--read-retries", "2")
        code = ingest_job.main(argv)
        out = capsys.readouterr()
        assert srv.outages_started == 1
        assert code == 3, out.out + out.err
        assert "could not be read after 2 attempts" in out.err and "NOT committed" in out.out
        assert resolve_dataset(dest).name == first.version  # the previous version is current
        unread = [line for line in out.out.splitlines() if line.startswith("  unreadable ")]
        assert unread and all("s3://lanes/raw/" in line for line in unread), out.out
        # The written (uncommitted) version names them too, as unreadable, not as bad data.
        from pipelines.data.versions import list_versions, version_location

        newest = list_versions(resolve(dest))[-1]
        assert newest.complete and not newest.current
        m = resolve_dataset(version_location(resolve(dest), newest.name).uri).manifest
        assert m["counts"]["unreadable"] == len(unread) and m["counts"]["rejected"] == 0
        assert m["counts"]["valid"] + len(unread) == 6
        srv.wait_outage_end()
        assert ingest_job.main(argv) == 0
        capsys.readouterr()
    latest = resolve_dataset(dest)
    assert latest.name != first.version and latest.manifest["counts"]["valid"] == 6
