"""Ingest: synthetic and real label data, local and S3, bad input, idempotency."""

import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from pipelines import labels
from pipelines.frames import FrameTransform, decode_label, decode_png_mask, decode_rgb
from pipelines.ingest import SHARD_COLUMNS, IngestError, discover, run_ingest, split_drives
from pipelines.storage import resolve
from pipelines.synthetic import frame_paths, label_png, render_frame, write_tree

from .conftest import CROP_TOP, FRAME_H, FRAME_W, SHARED_DATA


def read_split(uri: str, split: str):
    loc = resolve(uri).join(split)
    files = [i.path for i in loc.list_files((".parquet",))]
    return pq.ParquetDataset(files, filesystem=loc.fs).read().to_pandas() if files else None


def test_synthetic_tree_local(local_shards, test_transform):
    manifest = json.loads(resolve(local_shards).join("manifest.json").read_text())
    c = manifest["counts"]
    assert c["found"] == c["valid"] + c["rejected"] == 24
    assert c["train"] + c["val"] == 24 and c["val"] > 0
    assert not set(manifest["drives"]["train"]) & set(manifest["drives"]["val"])
    assert FrameTransform.from_dict(manifest["transform"]) == test_transform
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
    result = run_ingest(
        str(tmp_path / "src"), str(tmp_path / "out"), transform=test_transform, progress=False
    )
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
    first = run_ingest(
        str(synthetic_tree), dest, transform=test_transform, val_fraction=0.25, progress=False
    )
    rows1 = {s: read_split(dest, s) for s in ("train", "val")}
    second = run_ingest(
        str(synthetic_tree), dest, transform=test_transform, val_fraction=0.25, progress=False
    )
    rows2 = {s: read_split(dest, s) for s in ("train", "val")}
    for s in ("train", "val"):
        assert len(rows2[s]) == len(rows1[s])  # no duplicates
        assert rows2[s]["image_id"].tolist() == rows1[s]["image_id"].tolist()
        assert rows2[s]["label"].tolist() == rows1[s]["label"].tolist()
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert strip(first.manifest) == strip(second.manifest)


def test_ingest_to_s3_and_read_back_with_ray_data(
    s3_prefix, synthetic_tree, ray_cluster, test_transform
):
    from pipelines.dataset import build_dataset

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
    manifest = json.loads(resolve(s3_prefix).join("manifest.json").read_text())
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
    result = run_ingest(src.uri, str(tmp_path / "out"), transform=test_transform, progress=False)
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
    result = run_ingest(
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        transform=transform,
        val_fraction=0.0,
        progress=False,
    )
    m = result.manifest
    assert m["counts"] == {
        "found": 3,
        "valid": 3,
        "rejected": 0,
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
    images = sorted(synthetic_tree.rglob("*.jpg"))[:4]
    lines = ["image,label,drive"]
    for i, img in enumerate(images):
        label = str(img).replace("ColorImage_", "Labels_").replace("/ColorImage/", "/Label/")
        label = label[: -len(".jpg")] + "_bin.png"
        lines.append(f"{img},{label},drive{i % 2}")
    lines.append(f"{images[0]},{tmp_path}/missing_bin.png,drive0")  # duplicate image
    lines.append(f"extra.jpg,{tmp_path}/nope.png,drive1")  # relative, missing file
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    result = run_ingest(
        str(tmp_path / "pairs.csv"),
        str(tmp_path / "out"),
        transform=test_transform,
        val_fraction=0.5,
        progress=False,
    )
    c = result.manifest["counts"]
    assert (c["found"], c["valid"], c["rejected"]) == (6, 4, 2)
    reasons = sorted(r["reason"] for r in result.manifest["rejected"])
    assert "duplicate image" in reasons[0] and "could not be read" in reasons[1]
    assert set(result.manifest["drives"]["train"]) | set(result.manifest["drives"]["val"]) == {
        "drive0",
        "drive1",
    }
    (tmp_path / "bad.csv").write_text("path;other\nx;y\n")
    with pytest.raises(IngestError, match="header 'image,label'"):
        run_ingest(
            str(tmp_path / "bad.csv"),
            str(tmp_path / "out2"),
            transform=test_transform,
            progress=False,
        )


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
    assert code == 1
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
    from jobs._cli import parse_args

    args = parse_args(ingest_job.build_parser(), ["--config", str(cfg), "--crop-top", "20"])
    assert (args.source, args.dest, args.size, args.crop_top) == ("/a", "/b", (320, 96), 20)
    cfg.write_text("source: /a\ndest: /b\nsizes: 1x1\n")
    from jobs._cli import ConfigError

    with pytest.raises(ConfigError, match="unknown option 'sizes'"):
        parse_args(ingest_job.build_parser(), ["--config", str(cfg)])
