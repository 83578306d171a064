"""Batch labeling, the job end to end: a mixed prefix on the local S3 server (good frames and
every kind of bad file) labeled by the real job on the session's Ray cluster (its rows checked
against the same stages run in-process, whose per-frame behaviour
tests/unit/test_labeling_stages.py checks), incremental re-runs, an ingested dataset, runs
killed halfway, overlapping runs, a storage outage and a time limit."""

import contextlib
import io
import os
import re
import subprocess
import sys
from datetime import datetime, timezone

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import label as label_job
from pipelines.core.codecs import decode_png_mask
from pipelines.data.sources import Limits
from pipelines.inference.actors import Segmenter
from pipelines.labeling.commit import STAGING
from pipelines.labeling.inputs import list_inputs
from pipelines.labeling.output import read_output
from pipelines.labeling.stages import LabelStages
from pipelines.registry.versions import ModelRef, fetch_verified, version_transform
from pipelines.storage import resolve
from pipelines.storage.lease import LEASE_NAME
from tests.support.fault_handler import fault_env
from tests.support.frames import MAX_PIXELS, mixed_frames
from tests.support.helpers import ROOT, job_env, start_job
from tests.support.models import register_test_model

MODEL = "lanes-label-test"

SUMMARY = re.compile(r"label: found (\d+) frames, labeled (\d+), errors (\d+), skipped (\d+)")


def write_inputs(prefix: str) -> dict[str, str]:
    """The mixed frames under ``prefix``, and a file that is no frame. Returns {relative path:
    expected error fragment, or "" for a good frame}."""
    files = mixed_frames()
    root = resolve(prefix)
    for rel, (data, _) in files.items():
        root.join(rel).write_bytes(data)
    root.join("notes/readme.txt").write_text("not a frame: listed as ignored, not labeled\n")
    return {rel: why for rel, (_, why) in files.items()}


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


# -- the contract run: one real job, its outcomes checked one by one ---------------------------
@contextlib.contextmanager
def registered_inputs(tmp_path_factory, transform, name: str):
    """For a module's scenario: a store of its own with the test model registered (its planted
    pickle must never run), the mixed frames under a fresh S3 prefix. Yields the setup dict."""
    tmp = tmp_path_factory.mktemp(name)
    prefix = f"s3://lanes/{name}-{tmp.name}"
    store, canary = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "planted-pickle-ran"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        version = register_test_model(store, tmp, MODEL, transform, canary)
        expected = write_inputs(f"{prefix}/incoming")
        yield {"input": f"{prefix}/incoming", "output": f"{prefix}/labeled", "version": version,
               "expected": expected}  # fmt: skip
    assert not canary.exists(), "a job unpickled the registered version's python_model.pkl"


def label_argv(setup: dict, *extra: str) -> list[str]:
    return ["--input", setup["input"], "--output", setup["output"],
            "--model", f"models:/{MODEL}/latest", "--max-pixels", str(MAX_PIXELS), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def contract(s3_server, ray_cluster, tmp_path_factory, test_transform):
    """The job on the mixed prefix (S3 in and out, review list asked for every ok frame, 4 rows
    per file), then the same command again; and what the stages give in-process for the same
    inputs and model files. Returns a dict of what each left."""
    with registered_inputs(tmp_path_factory, test_transform, "label-contract") as s:
        argv = label_argv(s, "--apollo-ids", "--rows-per-file", "4", "--review-below", "1")
        first = capture(label_job.main, argv)
        files = sorted(i.path for i in resolve(s["output"]).list_files())
        second = capture(label_job.main, argv)
        ref = ModelRef(MODEL, s["version"])
        inputs = list_inputs(s["input"])
        stages = LabelStages(kind=inputs.kind, anchor=resolve(inputs.uri), transform=version_transform(ref),
                             model_name=MODEL, model_version=s["version"],
                             limits=Limits(max_pixels=MAX_PIXELS), apollo_ids=True)  # fmt: skip
        in_process = stages.label(inputs.rows, Segmenter(fetch_verified(ref), device="cpu"),
                                  datetime.now(timezone.utc))  # fmt: skip
        yield {
            **s, "first": first, "second": second, "files_after_first": files,
            "rows": read_output(s["output"]).to_pylist(),
            "in_process": {r["source"]: r for r in in_process.to_pylist()},
        }  # fmt: skip


def capture(main, argv: list[str]) -> tuple[int, str]:
    """``main(argv)``'s status and standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    return status, out.getvalue()


@pytest.mark.slow
def test_the_summary_counts_every_input_and_names_the_ignored_file(contract):
    status, out = contract["first"]
    expected = contract["expected"]
    n_good = sum(1 for why in expected.values() if not why)
    assert status == 0, out
    assert counts(out) == (len(expected), n_good, len(expected) - n_good, 0)
    assert "ignored (not a .jpg/.jpeg/.png frame)" in out and "readme.txt" in out


@pytest.mark.slow
def test_the_last_progress_line_counts_every_frame(contract):
    n = len(contract["expected"])
    out = contract["first"][1]
    assert re.search(rf"^label: {n}/{n} frames \(100%\), [\d.]+ frames/s$", out, re.M), out


@pytest.mark.slow
def test_the_output_holds_one_row_per_input_none_twice(contract):
    rows = contract["rows"]
    sources = sorted(r["source"] for r in rows)
    assert sources == sorted(f"{contract['input']}/{rel}" for rel in contract["expected"])
    assert {(r["model_name"], r["model_version"]) for r in rows} == {(MODEL, contract["version"])}
    assert all(r["labeled_date"] == r["labeled_at"].strftime("%Y-%m-%d") for r in rows)


@pytest.mark.slow
def test_the_jobs_rows_are_the_stages_rows(contract):
    """What Ray Data's pipeline wrote is what the same stages give in this process: the same
    status and error for every input, the same masks (a few tie flips apart: batches differ,
    so float summation order may differ) and scores."""
    for row in contract["rows"]:
        ref = contract["in_process"][row["source"]]
        assert (row["status"], row["error"]) == (ref["status"], ref["error"]), row["source"]
        if row["status"] != "ok":
            continue
        mask, want = decode_png_mask(row["mask"]), decode_png_mask(ref["mask"])
        assert mask.shape == want.shape and (mask == want).mean() > 0.999, row["source"]
        assert row["confidence"] == pytest.approx(ref["confidence"], abs=1e-4)


@pytest.mark.slow
def test_the_review_list_names_every_ok_frame_where_readers_skip_it(contract):
    out, rows = contract["first"][1], contract["rows"]
    [line] = [x for x in out.splitlines() if x.startswith("review: ")]
    assert f"{contract['output']}/_review/labeled_date=" in line, line
    review = pq.read_table(io.BytesIO(resolve(line.split(" -> ")[1]).read_bytes()))
    assert sorted(review.column("source").to_pylist()) == sorted(
        r["source"] for r in rows if r["status"] == "ok"
    )
    assert all(r["confidence"] is None or r["confidence"] < 1 for r in review.to_pylist())


@pytest.mark.slow
def test_a_second_run_finds_nothing_new_and_writes_nothing(contract):
    status, out = contract["second"]
    n = len(contract["expected"])
    assert status == 0 and "nothing new to label; nothing written" in out, out
    assert counts(out) == (n, 0, 0, n)
    assert (
        sorted(i.path for i in resolve(contract["output"]).list_files())
        == contract["files_after_first"]
    )


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
    (pipelines.runtime.faults, tests/support/fault_handler.py); its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", *argv], cwd=ROOT, capture_output=True, text=True,
        env=job_env(PYTHONUNBUFFERED="1", **fault_env(fault)), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 137, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def gpu_fails(s3_server, ray_cluster, tmp_path_factory, test_transform):
    """A run whose model actors raise CUDA's sticky error at their first batch (fault point
    ``label.predict``, as a GPU failing mid-run does): (status, stdout, stderr, rows left,
    whether the lease is still held)."""
    with registered_inputs(tmp_path_factory, test_transform, "label-gpu-fails") as s:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.label", *label_argv(s)], cwd=ROOT, capture_output=True,
            text=True, env=job_env(PYTHONUNBUFFERED="1", **fault_env("label.predict=1")),
            timeout=600,
        )  # fmt: skip
        held = resolve(s["output"]).join(LEASE_NAME).exists()
        yield proc.returncode, proc.stdout, proc.stderr, read_output(s["output"]).to_pylist(), held


@pytest.mark.slow
def test_a_gpu_failing_mid_run_ends_the_run_with_exit_7_and_one_line(gpu_fails):
    status, out, err, _, _ = gpu_fails
    assert status == 7, out[-3000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "failed while predicting" in errors[0], err[-3000:]


@pytest.mark.slow
def test_a_gpu_failing_mid_run_records_no_frame_as_bad_and_releases_the_lease(gpu_fails):
    _, _, _, rows, held = gpu_fails
    assert [r for r in rows if r["status"] == "error"] == []
    assert not held


@pytest.fixture(scope="module")
def killed(s3_server, ray_cluster, tmp_path_factory, test_transform):
    """A run killed after writing its staging files (not yet marked complete); a run while its
    lease lasts; one that waits for the lease, killed in the middle of moving its files into
    place; and the one after. Returns what each left."""
    with registered_inputs(tmp_path_factory, test_transform, "label-killed") as s:
        argv, output, seen = label_argv(s, "--rows-per-file", "3"), resolve(s["output"]), {}
        _killed_run([*argv, "--lease-ttl", "6"], "label.chunk_staged")
        seen["staged"] = sorted(i.path for i in output.list_files())
        seen["visible_after_first"] = read_output(s["output"]).to_pylist()
        seen["during_lease"] = capture(label_job.main, argv)
        seen["files_during_lease"] = sorted(i.path for i in output.list_files())
        seen["cut_mid_commit"] = _killed_run(
            [*argv, "--lease-ttl", "6", "--wait-for-lease", "60"], "label.file_committed=1"
        )
        seen["visible_after_cut"] = read_output(s["output"]).to_pylist()
        seen["last"] = capture(label_job.main, [*argv, "--wait-for-lease", "60"])
        seen["rows"] = read_output(s["output"]).to_pylist()
        seen["staging_left"] = output.join(STAGING).list_files()
        yield {**s, **seen}


@pytest.mark.slow
def test_a_run_killed_after_staging_leaves_nothing_visible(killed):
    assert any(f"/{STAGING}/" in p for p in killed["staged"]), killed["staged"]
    assert killed["visible_after_first"] == []


@pytest.mark.slow
def test_a_run_while_the_dead_runs_lease_lasts_leaves_everything_alone(killed):
    status, out = killed["during_lease"]
    assert status == 0 and "this run does nothing" in out and "is held by run" in out, out
    assert killed["files_during_lease"] == killed["staged"]


@pytest.mark.slow
def test_a_run_that_waits_takes_the_expired_lease_and_discards_the_dead_staging(killed):
    out = killed["cut_mid_commit"]
    assert "took over the expired lease of run" in out
    assert "1 incomplete staging folders discarded" in out


@pytest.mark.slow
def test_a_commit_cut_off_mid_move_shows_only_whole_files(killed):
    assert 0 < len(killed["visible_after_cut"]) < len(killed["expected"])  # one file moved


@pytest.mark.slow
def test_the_next_run_completes_the_cut_commit_and_finds_nothing_new(killed):
    status, out = killed["last"]
    assert status == 0, out
    assert "took over the expired lease of run" in out
    assert "1 commits completed" in out and "nothing new to label" in out


@pytest.mark.slow
def test_after_the_kills_every_input_has_exactly_one_row(killed):
    assert sorted(r["source"] for r in killed["rows"]) == sorted(
        f"{killed['input']}/{rel}" for rel in killed["expected"]
    )
    assert not killed["staging_left"]


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


@pytest.fixture(scope="module")
def outage(ray_cluster, tmp_path_factory, test_transform):
    """The S3 server goes away for 10 s in the middle of a run whose retry budget is shorter;
    then, the outage over, the next run. Returns what each left."""
    from tests.support.faults import outage_server

    tmp = tmp_path_factory.mktemp("outage")
    store, canary = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "planted-pickle-ran"
    with outage_server(outage_after_gets=3, outage_seconds=10) as srv, \
            pytest.MonkeyPatch.context() as mp:  # fmt: skip
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        register_test_model(store, tmp, MODEL, test_transform, canary)
        mp.setenv("AWS_ENDPOINT_URL_S3", srv.endpoint)
        prefix, out = "s3://lanes/incoming", str(tmp / "out")
        expected = write_inputs(prefix)
        argv = ["--input", prefix, "--output", out, "--model", f"models:/{MODEL}/latest",
                "--max-pixels", str(MAX_PIXELS)]  # fmt: skip
        first = capture(label_job.main, [*argv, "--read-retries", "1"])
        rows_after_first = read_output(out).to_pylist()
        outages = srv.outages_started
        srv.wait_outage_end()
        second = capture(label_job.main, argv)
    assert not canary.exists(), "a job unpickled the registered version's python_model.pkl"
    return {"prefix": prefix, "expected": expected, "first": first, "second": second,
            "outages": outages, "rows_after_first": rows_after_first,
            "rows": read_output(out).to_pylist()}  # fmt: skip


def deferred(out: str) -> int:
    return int(re.search(r"deferred (\d+)", out)[1])


@pytest.mark.slow
def test_an_outage_mid_run_defers_frames_with_exit_3(outage):
    status, out = outage["first"]
    assert outage["outages"] == 1
    assert status == 3, out
    found, labeled, errors, _ = counts(out)
    assert deferred(out) > 0 and labeled + errors + deferred(out) == found == len(
        outage["expected"]
    ), out


@pytest.mark.slow
def test_deferred_frames_get_no_row_and_the_outage_leaves_no_error_row(outage):
    _, labeled, errors, _ = counts(outage["first"][1])
    rows = outage["rows_after_first"]
    assert len(rows) == labeled + errors
    for row in rows:  # only bad files are error rows: the outage left no trace
        why = outage["expected"][row["source"].removeprefix(outage["prefix"] + "/")]
        assert (row["status"] == "error") == bool(why), row["error"]


@pytest.mark.slow
def test_the_summary_names_each_deferred_frame_with_why(outage):
    _, out = outage["first"]
    named = re.findall(r"deferred \(storage failed; labeled by the next run\): (\S+): (.+)", out)
    assert len(named) == min(10, deferred(out)), out
    for source, why in named:
        assert source.startswith(outage["prefix"] + "/") and "transient reason" in why, why


@pytest.mark.slow
def test_the_next_run_labels_exactly_the_deferred_frames(outage):
    _, labeled, errors, _ = counts(outage["first"][1])
    status, out = outage["second"]
    assert status == 0, out
    _, labeled2, errors2, skipped2 = counts(out)
    assert (labeled2 + errors2, skipped2) == (deferred(outage["first"][1]), labeled + errors), out


@pytest.mark.slow
def test_after_the_outage_every_input_has_one_row_and_only_bad_files_are_errors(outage):
    prefix, expected, table = outage["prefix"], outage["expected"], outage["rows"]
    assert sorted(r["source"] for r in table) == sorted(f"{prefix}/{rel}" for rel in expected)
    assert sorted(r["source"] for r in table if r["status"] == "error") == sorted(
        f"{prefix}/{rel}" for rel, why in expected.items() if why
    )


def test_a_run_reads_only_the_shards_that_hold_its_frames(local_shards):
    from pipelines.labeling.dataset import shards_of

    inputs = list_inputs(local_shards)
    shards = list(dict.fromkeys(r["shard"] for r in inputs.rows))
    assert len(inputs.rows) == 24 and len(shards) >= 2, shards  # else the test is empty
    first = inputs.rows[:5]
    assert shards_of(first) == [first[0]["shard"]]  # not every shard of the dataset
    assert shards_of(inputs.rows) == shards  # each once


@pytest.fixture(scope="module")
def from_shards(local_shards, ray_cluster, tmp_path_factory, test_transform):
    """The job labeling an ingested dataset, 5 frames per commit, its Ray Data pipelines
    counted. Returns (status, output, pipelines' input rows, output folder)."""
    from pipelines.labeling import workflow

    with registered_inputs(tmp_path_factory, test_transform, "label-shards") as s, \
            pytest.MonkeyPatch.context() as mp:  # fmt: skip
        pipelines, dataset = [], workflow.label_dataset

        def counted(stages, rows, **kwargs):
            pipelines.append(rows)
            return dataset(stages, rows, **kwargs)

        mp.setattr(workflow, "label_dataset", counted)
        out = tmp_path_factory.mktemp("from-shards") / "out"
        status, text = capture(label_job.main, ["--input", local_shards, "--output", str(out),
                                                "--model", f"models:/{MODEL}/{s['version']}",
                                                "--chunk-frames", "5"])  # fmt: skip
        yield status, text, pipelines, out


@pytest.mark.slow
def test_an_ingested_dataset_is_labeled_by_one_pipeline(from_shards):
    status, text, pipelines, _ = from_shards
    assert status == 0, text
    assert counts(text) == (24, 24, 0, 0)
    assert [len(rows) for rows in pipelines] == [24]  # one pipeline (one actor pool) per run


@pytest.mark.slow
def test_an_ingested_dataset_is_committed_chunk_by_chunk(from_shards):
    out = from_shards[3]
    files = [p for p in out.rglob("*.parquet") if not {"_review", "review"} & set(p.parts)]
    assert len({p.name.rsplit("-", 1)[0] for p in files}) == 5  # 24 frames, 5 per commit


@pytest.mark.slow
def test_an_ingested_dataset_gets_one_row_per_frame(from_shards, local_shards):
    rows = read_output(str(from_shards[3])).to_pylist()
    assert sorted(r["source"] for r in rows) == sorted(
        r["source"] for r in list_inputs(local_shards).rows
    )


@pytest.fixture(scope="module")
def time_limited(s3_server, ray_cluster, tmp_path_factory, test_transform):
    """--time-limit mid-run: each commit is followed by a pause longer than the limit, so the
    run stops at its first commit whatever the speed of this machine; then the next run."""
    with registered_inputs(tmp_path_factory, test_transform, "label-limit") as s, \
            pytest.MonkeyPatch.context() as mp:  # fmt: skip
        argv = label_argv(s, "--chunk-frames", "3")
        for key, value in fault_env("label.chunk_committed=16").items():
            mp.setenv(key, value)
        first = capture(label_job.main, [*argv, "--time-limit", "15"])
        rows_after_first = read_output(s["output"]).to_pylist()
        mp.delenv("LANE_FAULTS")  # the handler stays, with nothing armed
        second = capture(label_job.main, argv)
        yield {**s, "first": first, "rows_after_first": rows_after_first, "second": second,
               "rows": read_output(s["output"]).to_pylist()}  # fmt: skip


@pytest.mark.slow
def test_a_run_past_its_time_limit_stops_at_the_next_commit(time_limited):
    status, out = time_limited["first"]
    assert status == 0, out
    found, labeled, errors, *_ = counts(out)
    assert labeled + errors == 3, out  # one chunk
    assert f"--time-limit 15s reached: {len(time_limited['expected']) - 3} frames left" in out
    assert len(time_limited["rows_after_first"]) == 3


@pytest.mark.slow
def test_the_run_after_the_time_limit_labels_the_rest(time_limited):
    status, out = time_limited["second"]
    assert status == 0, out
    assert sorted(r["source"] for r in time_limited["rows"]) == sorted(
        f"{time_limited['input']}/{rel}" for rel in time_limited["expected"]
    )
