"""Batch labeling: a mixed prefix on the local S3 server (good frames and every kind of bad
file), incremental re-runs, and runs killed halfway."""

import io
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import label as label_job
from pipelines.core import labels
from pipelines.core.codecs import decode_png_mask, encode_jpeg
from pipelines.data.synthetic import render_frame
from pipelines.labeling.commit import STAGING
from pipelines.labeling.output import read_output
from pipelines.labeling.stages import Pipeline
from pipelines.registry.versions import ModelRef, load_predictor
from pipelines.storage import resolve
from tests.support.helpers import CROP_TOP, FRAME_H, FRAME_W, ROOT, job_env, start_job

MODEL = "lanes-label-test"
MAX_PIXELS = 500_000  # above the 846x428 test frames, below the "oversized" one

SUMMARY = re.compile(r"label: found (\d+) frames, labeled (\d+), errors (\d+), skipped (\d+)")


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def write_inputs(prefix: str) -> dict[str, str]:
    """Good frames (two sizes) and one file of every bad kind. Returns {relative path:
    expected error fragment, or "" for a good frame}."""
    rng = np.random.default_rng(7)
    good = [render_frame(rng, FRAME_W, FRAME_H)[0] for _ in range(4)]
    other_size = render_frame(rng, 640, 360)[0]
    valid_jpeg = encode_jpeg(good[0])
    files: dict[str, tuple[bytes, str]] = {
        **{f"drive1/frame_{i}.jpg": (encode_jpeg(f), "") for i, f in enumerate(good)},
        "drive1/frame_png.png": (png(good[1]), ""),
        "drive2/small.jpeg": (encode_jpeg(other_size), ""),
        "bad/zero.jpg": (b"", "zero-byte"),
        "bad/truncated.jpg": (valid_jpeg[: len(valid_jpeg) // 3], "truncated"),
        "bad/corrupt.jpg": (b"\xff\xd8\xff" + os.urandom(2000), "not a readable image"),
        "bad/text.png": (b"this is not a picture\n", "not a readable image"),
        "bad/grey.png": (png(good[0][..., 0]), "must be 8-bit RGB, got PIL mode 'L'"),
        "bad/rgba.png": (
            png(np.dstack([good[0], np.full(good[0].shape[:2], 255, np.uint8)])),
            "must be 8-bit RGB, got PIL mode 'RGBA'",
        ),
        "bad/sixteen.png": (  # uint16 arrays become 16-bit greyscale PNGs
            png(good[0][..., 0].astype(np.uint16) * 257),
            "must be 8-bit RGB",
        ),
        "bad/oversized.jpg": (
            encode_jpeg(np.zeros((600, 1000, 3), np.uint8)),
            "more than the limit",
        ),
    }
    root = resolve(prefix)
    for rel, (data, _) in files.items():
        root.join(rel).write_bytes(data)
    root.join("notes/readme.txt").write_text("not a frame: listed as ignored, not labeled\n")
    return {rel: why for rel, (_, why) in files.items()}


def run_label(capsys, *argv: str) -> tuple[int, str]:
    status = label_job.main(list(argv))
    return status, capsys.readouterr().out


def counts(out: str) -> tuple[int, ...]:
    m = SUMMARY.search(out)
    assert m, out
    return tuple(int(v) for v in m.groups())


@pytest.fixture
def labeling_setup(s3_prefix, register_version, ray_cluster):
    version = register_version(MODEL)  # random heads: predictions vary with the frame
    expected = write_inputs(f"{s3_prefix}/incoming")
    return {
        "input": f"{s3_prefix}/incoming",
        "output": f"{s3_prefix}/labeled",
        "version": version,
        "expected": expected,
    }


def test_frames_at_half_and_quarter_resolution_are_cropped_by_the_same_fraction(
    s3_prefix, register_version, ray_cluster, test_transform, capsys
):
    """A model ingested from FRAME_H-row frames labels the same camera's frames at 1x, 0.5x
    and 0.25x: each loses the same fraction of its rows to the sky crop (not CROP_TOP rows,
    which would leave a quarter-size frame nothing), and each mask is the model's prediction
    on that frame at its own size."""
    from dataclasses import replace

    transform = replace(test_transform, source_height=FRAME_H)
    version = register_version(MODEL, transform=transform)
    frame = render_frame(np.random.default_rng(11), FRAME_W, FRAME_H)[0]
    root = resolve(f"{s3_prefix}/scaled")
    sizes = {}
    for f in (1, 2, 4):
        w, h = FRAME_W // f, FRAME_H // f
        small = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR))
        root.join(f"cam/x{f}.png").write_bytes(png(small))
        sizes[f"{root.uri}/cam/x{f}.png"] = (h, w, small)
    status, out = run_label(capsys, "--input", root.uri, "--output", f"{s3_prefix}/scaled-out",
                            "--model", f"models:/{MODEL}/{version}")  # fmt: skip
    assert status == 0 and counts(out) == (3, 3, 0, 0), out
    predictor = load_predictor(ModelRef(MODEL, version))
    for row in read_output(f"{s3_prefix}/scaled-out").to_pylist():
        h, w, small = sizes[row["source"]]
        mask = decode_png_mask(row["mask"])
        assert row["status"] == "ok" and mask.shape == (h, w)
        top = round(CROP_TOP * h / FRAME_H)
        assert (mask[:top] == 0).all()
        assert (mask == predictor.predict([small])[0]).mean() > 0.999


@pytest.mark.slow
def test_mixed_prefix_rows_add_up_and_masks_match_the_model(labeling_setup, capsys):
    s = labeling_setup
    argv = ["--input", s["input"], "--output", s["output"], "--model", f"models:/{MODEL}/latest",
            "--max-pixels", str(MAX_PIXELS), "--apollo-ids", "--rows-per-file", "4",
            "--review-below", "1"]  # fmt: skip
    status, out = run_label(capsys, *argv)
    assert status == 0, out
    expected = s["expected"]
    n_good = sum(1 for why in expected.values() if not why)
    assert counts(out) == (len(expected), n_good, len(expected) - n_good, 0)
    assert "ignored (not a .jpg/.jpeg/.png frame)" in out and "readme.txt" in out
    n = len(expected)
    assert re.search(rf"^label: {n}/{n} frames \(100%\), [\d.]+ frames/s$", out, re.M), out

    table = read_output(s["output"]).to_pylist()
    rows = {r["source"]: r for r in table}
    assert len(table) == len(rows) == len(expected)  # one row per input, none twice
    predictor = load_predictor(ModelRef(MODEL, s["version"]))
    for rel, why in expected.items():
        row = rows[f"{s['input']}/{rel}"]
        assert row["model_name"] == MODEL and row["model_version"] == s["version"]
        assert row["labeled_date"] == row["labeled_at"].strftime("%Y-%m-%d")
        if why:
            assert row["status"] == "error" and why in row["error"], (rel, row["error"])
            assert row["mask"] is None and row["class_pixels"] is None
            continue
        assert row["status"] == "ok" and row["error"] is None, (rel, row["error"])
        data = resolve(row["source"]).read_bytes()
        frame = np.asarray(Image.open(io.BytesIO(data)))
        mask = decode_png_mask(row["mask"])
        assert mask.shape == frame.shape[:2] == (row["height"], row["width"])
        assert (mask[:CROP_TOP] == 0).all()  # the cropped sky rows are background
        assert sum(row["class_pixels"]) == mask.size
        assert row["class_pixels"] == labels.class_pixel_counts(mask)
        np.testing.assert_array_equal(
            decode_png_mask(row["apollo_mask"]), labels.to_apollo_ids(mask)
        )
        # The same model called directly on the same model input (the frame's bytes decoded
        # as labeling does, at half size where that covers the input): the pipeline adds
        # nothing. (Batches differ, so float summation order may differ: a few tie flips.)
        t = predictor.transform
        small, scores = predictor.predict_scored(t.load_image(data)[0][None])
        direct = t.restore_mask(small[0], frame.shape[:2])
        assert (direct == mask).mean() > 0.999
        for k in ("confidence", "pixel_confidence", "uncertain_fraction"):  # its scores too
            assert row[k] == pytest.approx(float(scores[k][0]), abs=1e-4), k
        assert row["novelty"] == pytest.approx(float(scores["novelty"][0]), rel=1e-3)
    assert len({r["mask"] for r in table if r["status"] == "ok"}) > 1  # not a constant model
    # --review-below 1: every frame labeled ok is listed for review (ids and scores), once.
    [line] = [x for x in out.splitlines() if x.startswith("review: ")]
    assert f"{s['output']}/_review/labeled_date=" in line, line  # where readers skip it
    review = pq.read_table(io.BytesIO(resolve(line.split(" -> ")[1]).read_bytes()))
    assert sorted(review.column("source").to_pylist()) == sorted(
        r["source"] for r in table if r["status"] == "ok"
    )
    assert all(r["confidence"] is None or r["confidence"] < 1 for r in review.to_pylist())

    # A second run finds nothing new and writes nothing.
    files_before = sorted(i.path for i in resolve(s["output"]).list_files())
    status, out = run_label(capsys, *argv)
    assert status == 0
    assert "nothing new to label; nothing written" in out
    assert counts(out) == (len(expected), 0, 0, len(expected))
    assert sorted(i.path for i in resolve(s["output"]).list_files()) == files_before


def test_model_actor_without_gpu_takes_its_share_of_the_node(ray_cluster, tmp_path, test_transform):
    """Ray gives an actor one thread per reserved CPU (one); a labeling actor on a CPU-only
    node takes the node's cores, shared among the pool's actors, and loads the model from the
    bytes the driver verified (no MLflow in the actor)."""
    import torch

    from pipelines.inference.actors import Segmenter
    from pipelines.inference.model_dir import MODEL_FILE, SPEC_FILE, ModelSpec, save_model_dir
    from tests.support.models import TEST_MODEL, make_model

    model = make_model(constant_class=3)
    d = save_model_dir(tmp_path / "m", model, ModelSpec(TEST_MODEL, 8, test_transform))
    files = ray_cluster.put({n: (d / n).read_bytes() for n in (MODEL_FILE, SPEC_FILE)})

    class Probe(Segmenter):
        def threads(self) -> int:
            return torch.get_num_threads()

        def predicts(self) -> set[int]:
            h, w = test_transform.height, test_transform.width
            return set(np.unique(self.predictor.predict_prepared(np.zeros((1, h, w, 3), np.uint8))))

    cores = min(4, len(os.sched_getaffinity(0)))  # the session cluster counts 4 CPUs
    actors = max(1, cores // 2)  # a pool sized so each actor's share is 2 threads (Ray's: 1)
    probe = ray_cluster.remote(num_cpus=1)(Probe).remote(files, actors=actors)
    assert ray_cluster.get(probe.threads.remote()) == cores // actors
    assert ray_cluster.get(probe.predicts.remote()) == {3}
    ray_cluster.kill(probe)


def test_bad_model_reference_is_one_line(tmp_path, mlflow_store, capsys):
    for model, message in [
        ("lanes@champion", "expected models:/NAME@ALIAS"),
        ("models:/nope@champion", "models:/nope@champion"),
    ]:
        argv = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", model]
        assert label_job.main(argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value, message",
    [("--review-below", "0", "--review-below must be in (0, 1], got 0"),
     ("--uncertain-below", "1.5", "--uncertain-below must be in (0, 1], got 1.5"),
     ("--review-novelty-above", "-1", "--review-novelty-above must be > 0, got -1")],
)  # fmt: skip
def test_score_thresholds_out_of_range_are_one_line(tmp_path, capsys, flag, value, message):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "out"),
            "--model", "models:/lanes@champion", flag, value]  # fmt: skip
    assert label_job.main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {message}"
    ]


def _killed_run(argv: list[str], fault: str) -> str:
    """A labeling run in its own process, killed (exit 137) at fault point ``fault``
    (pipelines.ops.faults); its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", *argv], cwd=ROOT, capture_output=True, text=True,
        env=job_env(PYTHONUNBUFFERED="1", LANE_FAULTS=fault), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 137, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_runs_killed_halfway_then_rerun_end_with_one_row_per_input(labeling_setup, capsys):
    """A run killed after writing its staging files (not yet marked complete), then the next
    one killed in the middle of moving its files into place: nothing half-written is ever
    visible, each run takes over the dead one's lease once it expires and cleans up after it,
    and the last ends with exactly one row per input."""
    s = labeling_setup
    argv = ["--input", s["input"], "--output", s["output"], "--model", f"models:/{MODEL}/latest",
            "--max-pixels", str(MAX_PIXELS), "--rows-per-file", "3"]  # fmt: skip
    output = resolve(s["output"])
    # 1. Killed after writing: never committed, nothing visible.
    _killed_run([*argv, "--lease-ttl", "6"], "label.exit_after_write")
    assert output.join(STAGING).exists()
    assert read_output(s["output"]).to_pylist() == []

    # The dead run's lease has not expired yet: a run now leaves everything alone.
    staged = sorted(i.path for i in output.list_files())
    status, out = run_label(capsys, *argv)
    assert status == 0 and "this run does nothing" in out and "is held by run" in out, out
    assert sorted(i.path for i in output.list_files()) == staged

    # 2. One that waits takes the lease over once it expires, discards the dead run's staging
    # and labels everything, but is killed after moving one file of several into place.
    out = _killed_run(
        [*argv, "--lease-ttl", "6", "--wait-for-lease", "60"], "label.exit_mid_commit=1"
    )
    assert "took over the expired lease of run" in out
    assert "1 incomplete staging folders discarded" in out
    visible = read_output(s["output"]).to_pylist()
    assert 0 < len(visible) < len(s["expected"])  # one file of several moved

    # 3. The next one completes that commit (its files were all written) and finds nothing new.
    status, out = run_label(capsys, *argv, "--wait-for-lease", "60")
    assert status == 0, out
    assert "took over the expired lease of run" in out
    assert "1 commits completed" in out and "nothing new to label" in out
    table = read_output(s["output"]).to_pylist()
    assert sorted(r["source"] for r in table) == sorted(
        f"{s['input']}/{rel}" for rel in s["expected"]
    )
    assert not output.join(STAGING).list_files()


@pytest.mark.slow
def test_overlapping_runs_end_with_one_row_per_frame(labeling_setup):
    """Two scheduled runs started together on the same input: one holds the lease and labels
    (in several commits); the other exits 0 naming it, or waits and then finds nothing new.
    Every frame ends with exactly one row, none labeled twice, none lost."""
    s = labeling_setup
    argv = ["--input", s["input"], "--output", s["output"], "--model", f"models:/{MODEL}/latest",
            "--max-pixels", str(MAX_PIXELS), "--rows-per-file", "3", "--chunk-frames", "5"]  # fmt: skip
    procs = [start_job("jobs.label", *argv, *extra) for extra in ([], ["--wait-for-lease", "300"])]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    written = [counts(o)[1] + counts(o)[2] for o in outs if SUMMARY.search(o)]
    assert sum(written) == len(s["expected"]), outs  # labeled once, by one of them
    assert any("this run does nothing" in o or "nothing new to label" in o for o in outs), outs
    table = read_output(s["output"]).to_pylist()
    assert sorted(r["source"] for r in table) == sorted(
        f"{s['input']}/{rel}" for rel in s["expected"]
    )
    assert not resolve(s["output"]).join(STAGING).list_files()


@pytest.mark.slow
def test_storage_outage_defers_frames_to_the_next_run(
    register_version, ray_cluster, tmp_path, capsys, monkeypatch
):
    """The S3 server goes away for 10 s in the middle of a run whose retry budget is shorter:
    the frames it could not read get no row (not a permanent error) and exit status 3; the
    next run labels them."""
    from tests.support.faults import outage_server

    register_version(MODEL)
    with outage_server(outage_after_gets=3, outage_seconds=10) as srv:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", srv.endpoint)
        prefix = "s3://lanes/incoming"
        expected = write_inputs(prefix)
        argv = ["--input", prefix, "--output", str(tmp_path / "out"),
                "--model", f"models:/{MODEL}/latest", "--max-pixels", str(MAX_PIXELS)]  # fmt: skip
        status, out = run_label(capsys, *argv, "--read-retries", "1")
        assert srv.outages_started == 1
        assert status == 3, out
        found, labeled, errors, _ = counts(out)
        deferred = int(re.search(r"deferred (\d+)", out)[1])
        assert deferred > 0 and labeled + errors + deferred == found == len(expected), out
        rows = read_output(str(tmp_path / "out")).to_pylist()
        assert len(rows) == labeled + errors
        for row in rows:  # only bad files are error rows: the outage left no trace
            why = expected[row["source"].removeprefix(prefix + "/")]
            assert (row["status"] == "error") == bool(why), row["error"]

        srv.wait_outage_end()
        status, out = run_label(capsys, *argv)
        assert status == 0, out
        _, labeled2, errors2, skipped2 = counts(out)
        assert (labeled2 + errors2, skipped2) == (deferred, labeled + errors), out
    table = read_output(str(tmp_path / "out")).to_pylist()
    assert sorted(r["source"] for r in table) == sorted(f"{prefix}/{rel}" for rel in expected)
    assert sorted(r["source"] for r in table if r["status"] == "error") == sorted(
        f"{prefix}/{rel}" for rel, why in expected.items() if why
    )


def test_an_ingested_dataset_is_labeled_chunk_by_chunk_from_its_own_shards(
    local_shards, register_version, tmp_path, capsys, monkeypatch
):
    """Labeling an ingested dataset: one ok row per shard frame at the shards' size, several
    commits from one pipeline that reads only the shards holding frames left to label."""
    from pipelines.labeling.inputs import list_inputs
    from pipelines.labeling.stages import shards_of

    inputs = list_inputs(local_shards)
    shards = list(dict.fromkeys(r["shard"] for r in inputs.rows))
    assert len(inputs.rows) == 24 and len(shards) >= 2, shards  # else the chunk test is empty
    first = inputs.rows[:5]
    assert shards_of(first) == [first[0]["shard"]]  # not every shard of the dataset
    assert shards_of(inputs.rows) == shards  # each once

    version = register_version(MODEL)
    out = tmp_path / "out"
    pipelines = []
    dataset = Pipeline.dataset

    def counted(self, *args, **kwargs):
        pipelines.append(args[0])
        return dataset(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "dataset", counted)
    status, text = run_label(capsys, "--input", local_shards, "--output", str(out),
                             "--model", f"models:/{MODEL}/{version}", "--chunk-frames", "5")  # fmt: skip
    assert status == 0, text
    assert counts(text) == (24, 24, 0, 0)
    assert [len(rows) for rows in pipelines] == [24]  # one pipeline (one actor pool) per run
    files = [p for p in out.rglob("*.parquet") if not {"_review", "review"} & set(p.parts)]
    assert len({p.name.rsplit("-", 1)[0] for p in files}) == 5  # 24 frames, 5 per commit
    rows = read_output(str(out)).to_pylist()
    assert sorted(r["source"] for r in rows) == sorted(r["source"] for r in inputs.rows)
    t = inputs.transform
    for r in rows:
        assert decode_png_mask(r["mask"]).shape == (r["height"], r["width"]) == (t.height, t.width)


@pytest.mark.slow
def test_a_run_past_its_time_limit_stops_at_the_next_commit_and_the_next_run_finishes(
    labeling_setup, capsys, monkeypatch
):
    """--time-limit mid-run: the run commits its first chunk, finds itself past the limit
    (each commit is followed by a pause longer than the limit, so the outcome does not depend
    on how fast this machine labels) and stops, leaving the rest to the next run, which labels
    exactly those: one row per input in all."""
    s = labeling_setup
    argv = ["--input", s["input"], "--output", s["output"], "--model", f"models:/{MODEL}/latest",
            "--max-pixels", str(MAX_PIXELS), "--chunk-frames", "3"]  # fmt: skip
    monkeypatch.setenv("LANE_FAULTS", "label.pause_after_commit=16")
    status, out = run_label(capsys, *argv, "--time-limit", "15")
    assert status == 0, out
    found, labeled, errors, *_ = counts(out)
    assert labeled + errors == 3, out  # one chunk
    assert f"--time-limit 15s reached: {len(s['expected']) - 3} frames left" in out
    assert len(read_output(s["output"]).to_pylist()) == 3
    monkeypatch.delenv("LANE_FAULTS")
    status, out = run_label(capsys, *argv)
    assert status == 0, out
    table = read_output(s["output"]).to_pylist()
    assert sorted(r["source"] for r in table) == sorted(
        f"{s['input']}/{rel}" for rel in s["expected"]
    )
