"""The training job: preflight errors, learning, and one 2-worker DDP run from S3 through fault
tolerance (the whole job dying, then a worker crash in the resumed job) to MLflow registration."""

import contextlib
import io
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import torch
from mlflow import MlflowClient

from jobs import train
from pipelines.core.labels import CLASS_NAMES
from pipelines.core.metrics import scores
from pipelines.data.versions import resolve_dataset
from pipelines.runtime import tracking
from pipelines.storage import resolve
from pipelines.training.checkpoint import METRICS_FILE
from tests.support.fault_handler import FAULT_MARKER, fault_env
from tests.support.helpers import ROOT, assert_same_confusion, free_port
from tests.support.models import TEST_MODEL

MODEL = TEST_MODEL


def train_args(data: str, storage: str, run_name: str, *extra: str) -> list[str]:
    return [
        "--data",
        data,
        "--storage",
        storage,
        "--run-name",
        run_name,
        "--experiment",
        "tests",
        "--register-as",
        "lanes-test",
        "--model",
        MODEL,
        "--num-workers",
        "2",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--no-augment",
        "--system-metrics-seconds",
        "1",
        *extra,
    ]


def copy_tree(src: str, dest: str) -> None:
    src_loc, dest_loc = resolve(src), resolve(dest)
    for info in src_loc.list_files():
        dest_loc.join(src_loc.relative(info.path)).write_bytes(
            src_loc.at_path(info.path).read_bytes()
        )


def copy_dropping_one_val_frame(src: str, dest: str) -> int:
    """Copy the current version of an ingested dataset to ``dest`` as a pinned dataset folder
    (manifest.json beside train/ and val/), without its first validation frame, so that the
    validation split is odd and cannot divide evenly over two workers, and with one validation
    file per frame, so that both workers get some (one file is one block, and a block goes to
    one worker). Returns the val frame count."""
    import pyarrow.parquet as pq

    from pipelines.data.versions import resolve_dataset

    src_loc, dest_loc = resolve_dataset(src).location, resolve(dest)
    manifest = json.loads(src_loc.join("manifest.json").read_text())
    [val_file] = [i.path for i in src_loc.join("val").list_files((".parquet",))]
    for info in src_loc.list_files():
        rel = src_loc.relative(info.path)
        if info.path != val_file and rel != "manifest.json":
            dest_loc.join(rel).write_bytes(src_loc.at_path(info.path).read_bytes())
    table = pq.read_table(pa.BufferReader(src_loc.at_path(val_file).read_bytes())).slice(1)
    for i in range(table.num_rows):
        sink = pa.BufferOutputStream()
        pq.write_table(table.slice(i, 1), sink)
        dest_loc.join(f"val/val-{i:05d}.parquet").write_bytes(sink.getvalue().to_pybytes())
    manifest["counts"]["val"] -= 1
    dest_loc.join("manifest.json").write_text(json.dumps(manifest))
    return manifest["counts"]["val"]


def runs_named(name: str, client: MlflowClient | None = None) -> list:
    client = client or MlflowClient()
    exp = client.get_experiment_by_name("tests")
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'"
    )


def assert_confusion_is_single_process(storage: str, run: str, data: str, epoch: int) -> None:
    from pipelines.registry.evaluation import evaluate_version

    run_loc = resolve(storage).join(run)
    for info in run_loc.list_files((METRICS_FILE,)):
        ckpt = run_loc.at_path(info.path).parent()
        logged = json.loads(ckpt.join(METRICS_FILE).read_text())
        if logged["epoch"] == epoch:
            break
    else:
        raise AssertionError(f"no checkpoint of epoch {epoch} in {run_loc.uri}")
    files = {name: ckpt.join(name).read_bytes() for name in ("model.pt", "model.json")}
    result = evaluate_version(files, data, "val")
    # (Which rank scores which frames is Ray Data's choice: in this small split it often hands
    # all of them to one rank, so the summing itself is tested in test_training.py.)
    assert result["frames"] == logged["val_frames"] == sum(logged["val_frames_by_rank"])
    assert len(logged["val_frames_by_rank"]) == 2
    assert_same_confusion(result["confusion"], logged["val_confusion"])
    logged_scores = scores(np.array(logged["val_confusion"]), CLASS_NAMES)
    assert logged["val_miou"] == pytest.approx(logged_scores["miou"], abs=1e-12)


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "val_miou")]


def poly_lr_logged(
    client: MlflowClient, run_id: str, steps_per_epoch: int, epochs: int, base: float = 0.01
) -> None:
    """The learning rate logged after each epoch is the poly schedule's at that epoch's last
    step: a resumed run continued the schedule instead of starting it again."""
    history = sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(epochs))
    total = steps_per_epoch * epochs
    for m in history:
        expected = base * (1 - (m.step + 1) * steps_per_epoch / total) ** 0.9
        assert m.value == pytest.approx(expected, abs=1e-12), (m.step, m.value, expected)


# The registered model works in a plain Python process: no Ray, any N, any frame size.
PYFUNC_CHECK = """
import sys, numpy as np, mlflow
mlflow.set_tracking_uri(sys.argv[1])
m = mlflow.pyfunc.load_model("models:/lanes-test/1")
for n, h, w in [(1, 300, 500), (3, 428, 846)]:
    x = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    y = m.predict(x)
    assert y.shape == (n, h, w) and y.dtype == np.uint8, (y.shape, y.dtype)
    # Cropped sky rows are background: 172 of the source's 428 rows, the same fraction of any
    # other height (the crop is relative to the ingested frames' height).
    top = round(172 * h / 428)
    assert int(y.max()) < 8 and (y[:, :top] == 0).all()
assert "ray" not in sys.modules
print("pyfunc ok")
"""


# -- preflight: clear errors before any worker starts --------------------------------------------
#: (extra flags, the error's words); "{data}" is the ingested dataset, "{empty}" an empty folder,
#: "{vgg}" a state_dict of another network.
BAD_ARGUMENTS = [
    (["--data", "{empty}"], "no manifest.json"),
    (["--batch-size", "1"], "--batch-size 1 is smaller than --num-workers 2"),
    (["--batch-size", "64"], "larger than the training set (18 frames)"),
    (["--use-gpu"], "needs 2 GPUs, the Ray cluster has 0"),
    (["--batch-size", "5"], "--batch-size 5 is not divisible by --num-workers 2"),
    (["--recipe", "reference"], "reproduces the FCN paper's VGG solvers"),
    (["--backbone-weights", "{vgg}"], "--backbone-weights: {vgg} does not fit " + MODEL),
    # Too small a cluster (the session's has 4 CPUs): fail at once instead of waiting.
    (["--cpus-per-worker", "2"], "--num-workers 2 x --cpus-per-worker 2 + 1 CPU for the data "
     "pipeline need 5 CPUs; the cluster has 4 CPUs (the Ray cluster)"),
    (["--cluster-cpus", "1"], "the cluster has 1 CPUs (--cluster-cpus). Add nodes: a training "
     "job needs at least 1.25 CPUs"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), BAD_ARGUMENTS)
def test_bad_arguments_fail_before_workers_start_in_one_line(
    flags, message, tmp_path, local_shards, mlflow_store, ray_cluster, capsys
):
    vgg = tmp_path / "vgg-ish.pt"  # a state_dict, but not of a ResNet
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, vgg)
    where = {"{empty}": str(tmp_path / "empty"), "{vgg}": str(vgg)}
    flags = [where.get(f, f) for f in flags]
    message = message.replace("{vgg}", str(vgg))
    assert train.main(train_args(local_shards, str(tmp_path / "ckpt"), "bad", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no stack trace
    assert runs_named("bad") == [] and not (tmp_path / "ckpt").exists()  # nothing started


def test_an_unreachable_tracking_server_is_transient(tmp_path, local_shards, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert train.main(train_args(local_shards, str(tmp_path / "ckpt"), "e")) == 3  # retry later
    assert "MLflow tracking server http://127.0.0.1" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_an_unknown_model_names_the_choices(tmp_path, local_shards, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(train_args(local_shards, str(tmp_path / "ckpt"), "f") + ["--model", "unet"])
    assert e.value.code == 2 and "invalid choice: 'unet'" in capsys.readouterr().err


def test_config_file_with_flag_override(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "data: s3://b/shards\nstorage: s3://b/ckpt\nexperiment: e\nregister-as: m\nepochs: 7\nlr: 0.02\n"
    )
    c = train.load_config(["--config", str(cfg), "--epochs", "3"])
    assert (c.data, c.epochs, c.lr, c.register_as, c.amp) == ("s3://b/shards", 3, 0.02, "m", False)
    assert train.load_config(["--config", str(cfg), "--use-gpu"]).amp is True


# -- one real run, through the death of the whole job ------------------------------------------
@dataclass
class S3Run:
    """What the scenario of :func:`s3_run` left behind, for the tests below to check one by one."""

    data: str
    storage: str
    tracking_uri: str
    val_frames: int
    died: int  # exit status of the run that lost a worker with no restarts allowed
    died_err: str
    died_run: Any  # its MLflow run, read right after it died
    died_epochs: list[int]
    marker: str  # the fault marker's text before the resume
    resumed: int
    resumed_out: str
    active_run_after: Any
    pyfunc: subprocess.Popen  # the registered model in a plain Python process, still running

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def run(self):
        [run] = runs_named("s3-run", self.client())
        return run


@pytest.fixture(scope="module")
def s3_run(local_shards, s3_server, ray_cluster, tmp_path_factory):
    """A 2-worker run with data and checkpoints on S3, through the death of the whole job:

    1. No restarts allowed: a worker exits in epoch 2 (epoch 1 is checkpointed), so the job
       dies; its MLflow run is marked FAILED.
    2. Run again with the same --run-name and --storage: the job resumes from the epoch-1
       checkpoint and continues the same MLflow run, then registers a model that works without
       Ray.

    (Ray Train restarting the worker group inside a job, from its last checkpoint, is
    test_faults.py's lost-node test.)
    """
    tmp = tmp_path_factory.mktemp("s3-run")
    prefix = f"s3://lanes/s3-run-{secrets.token_hex(4)}"
    data, storage = f"{prefix}/shards", f"{prefix}/checkpoints"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    val_frames = copy_dropping_one_val_frame(local_shards, data)
    argv = train_args(data, storage, "s3-run", "--max-failures", "0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        # 18 train frames, 9 per worker, 2 per worker step -> 4 steps per epoch; step 6 is in
        # epoch 2 (epoch 1 is checkpointed).
        for key, value in fault_env("train.step=6").items():
            mp.setenv(key, value)
        died, died_out, died_err = main_captured(argv)
        [died_run] = runs_named("s3-run", MlflowClient(uri))
        died_epochs = epochs_logged(MlflowClient(uri), died_run.info.run_id)

        # Resumed (the fault marker stays: no second failure). (A planted train state is
        # refused by the same resume path, engine.load_checkpoint: test_trust.py.)
        run_loc = resolve(storage).join("s3-run")
        marker = run_loc.join(FAULT_MARKER).read_text()
        resumed, resumed_out, _ = main_captured(argv)
        active = mlflow.active_run()
        # It runs beside the tests below; test_registered_model_works_without_ray is last.
        pyfunc = subprocess.Popen(
            [sys.executable, "-c", PYFUNC_CHECK, uri], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        with pyfunc:
            yield S3Run(
                data, storage, uri, val_frames, died, died_err, died_run, died_epochs, marker,
                resumed, resumed_out, active, pyfunc,
            )  # fmt: skip
            pyfunc.kill()


def main_captured(argv: list[str]) -> tuple[int, str, str]:
    """``jobs.train.main(argv)`` with its stdout and stderr (Ray's forwarded worker logs too)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = train.main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_a_job_without_restarts_dies_and_says_how_to_resume(s3_run):
    assert s3_run.died == 1
    assert "error: training failed after 0 restart(s)" in s3_run.died_err
    assert "re-run the same command (--run-name s3-run) to resume" in s3_run.died_err


@pytest.mark.slow
def test_the_dead_job_marks_its_mlflow_run_failed_after_one_epoch(s3_run):
    assert s3_run.died_run.info.status == "FAILED"
    assert s3_run.died_epochs == [0]


@pytest.mark.slow
def test_a_rerun_resumes_the_same_mlflow_run_and_registers(s3_run):
    assert s3_run.marker == "failed at step 6\n"
    assert s3_run.resumed == 0
    assert "registered models:/lanes-test/1" in s3_run.resumed_out
    run = s3_run.run()
    assert run.info.run_id == s3_run.died_run.info.run_id and run.info.status == "FINISHED"
    assert s3_run.active_run_after is None


@pytest.mark.slow
def test_the_resumed_run_trains_each_epoch_once_on_the_continued_schedule(s3_run):
    run_id = s3_run.run().info.run_id
    assert epochs_logged(s3_run.client(), run_id) == [0, 1]  # epoch 0 not trained twice
    poly_lr_logged(s3_run.client(), run_id, steps_per_epoch=4, epochs=2)


@pytest.mark.slow
def test_the_run_logs_its_scores_and_where_each_epoch_went(s3_run):
    metrics = s3_run.run().data.metrics
    for key in ("train_loss", "train_images_per_s", "val_pixel_acc", "val_mean_class_acc",
                "val_fwiou", "val_iou_dividing", "val_iou_background", "best_val_miou"):  # fmt: skip
        assert key in metrics, key
    # Where each epoch's time went (rank 0's clock): all measured, the steps took some.
    split = [metrics[k] for k in ("epoch_setup_s", "epoch_wait_s", "epoch_compute_s")]
    assert min(split) >= 0 and metrics["epoch_compute_s"] > 0 and metrics["val_seconds"] > 0
    assert split[0] > 0  # the first batch of an epoch is always waited for


@pytest.mark.slow
def test_every_validation_frame_is_scored_once_across_the_ranks(s3_run):
    assert s3_run.run().data.metrics["val_frames"] == s3_run.val_frames


@pytest.mark.slow
def test_the_summed_confusion_is_the_single_process_one(s3_run):
    """Both ranks' parts (all-reduce) with rank 0's weights and BatchNorm statistics
    (broadcast before validation) make exactly the checkpointed model's confusion matrix on
    the whole split, scored in one process."""
    assert_confusion_is_single_process(s3_run.storage, "s3-run", s3_run.data, epoch=1)


@pytest.mark.slow
def test_the_pictures_are_logged_by_epoch(s3_run):
    run_id = s3_run.run().info.run_id
    for key in ("confusion", "overlays"):  # the UI's step slider
        assert tracking.image_steps(s3_run.client(), run_id, key) == {0, 1}, key


@pytest.mark.slow
def test_the_dataset_inputs_name_the_version_and_its_manifest_digest(s3_run):
    version = resolve_dataset(s3_run.data)
    run = s3_run.run()
    inputs = {i.dataset.name.rpartition("/")[2]: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    assert {i.dataset.digest for i in inputs.values()} == {version.manifest_sha256}
    assert json.loads(inputs["train"].dataset.source)["uri"] == version.uri
    assert run.data.params["data"] == s3_run.data


@pytest.mark.slow
def test_rank_0_samples_system_metrics(s3_run):
    history = s3_run.client().get_metric_history(
        s3_run.run().info.run_id, "system/cpu_utilization_percentage"
    )
    assert len(history) > 1  # sampled every second here


@pytest.mark.slow
def test_no_secret_in_params_or_tags(s3_run):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    run = s3_run.run()
    version = s3_run.client().get_model_version("lanes-test", "1")
    values = [*run.data.params.values(), *run.data.tags.values(), *version.tags.values()]
    assert values and all(secret not in str(v) for v in values)


@pytest.mark.slow
def test_the_registered_version_records_its_provenance(s3_run):
    run = s3_run.run()
    version = s3_run.client().get_model_version("lanes-test", "1")
    assert version.run_id == run.info.run_id
    tags = version.tags
    assert float(tags["val_miou"]) == pytest.approx(run.data.metrics["best_val_miou"], abs=1e-6)
    assert tags["data_manifest"] == f"{s3_run.data}/manifest.json"
    assert tags["code_version"].startswith(("git-", "code-"))
    assert json.loads(tags["frame_transform"])["width"] == 128


@pytest.mark.slow
def test_checkpoints_go_to_s3_and_the_best_two_are_kept(s3_run):
    storage = resolve(s3_run.storage)
    files = [storage.relative(i.path) for i in storage.join("s3-run").list_files()]
    assert {p.split("/")[0] for p in files} == {"s3-run"}
    assert 1 <= sum(p.endswith("/model.pt") for p in files) <= 2


@pytest.mark.slow
def test_a_resume_with_other_hyperparameters_is_refused(s3_run, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_run.tracking_uri)
    argv = train_args(s3_run.data, s3_run.storage, "s3-run", "--lr", "0.05", "--epochs", "3")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: --run-name s3-run started with other hyperparameters than these: "
        "epochs 2 -> 3, lr 0.01 -> 0.05."
    ), err
    assert len(s3_run.client().search_runs([s3_run.run().info.experiment_id])) == 1


@pytest.mark.slow
def test_the_registered_model_works_without_ray(s3_run):
    stdout, stderr = s3_run.pyfunc.communicate(timeout=300)
    assert s3_run.pyfunc.returncode == 0, stderr[-2000:]
    assert "pyfunc ok" in stdout


def test_checkpoint_spec_round_trip(tmp_path):
    from fcn_models import build_model
    from pipelines.core.frames import FrameTransform
    from pipelines.inference.model_dir import ModelSpec, load_model_dir, save_model_dir
    from pipelines.inference.predictor import Predictor

    model = build_model(MODEL, 8)
    spec = ModelSpec(
        MODEL, 8, FrameTransform(width=64, height=32, crop_top=10), ("a",) * 8, {"run": "x"}
    )
    save_model_dir(tmp_path, model, spec)
    loaded, spec2 = load_model_dir(tmp_path)
    assert spec2 == spec
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    p = Predictor(loaded, spec2, "cpu")
    masks = p.predict(np.zeros((2, 70, 80, 3), dtype=np.uint8))
    assert [m.shape for m in masks] == [(70, 80), (70, 80)] and (masks[0][:10] == 0).all()
    with pytest.raises(ValueError, match="expected prepared frames of shape"):
        p.predict_prepared(np.zeros((1, 10, 10, 3), dtype=np.uint8))
