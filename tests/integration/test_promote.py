"""Promotion: evaluate candidate and alias holder on the same shards, move the alias only when
the candidate is better, record both results, roll back."""

import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass

import mlflow
import pytest
from mlflow import MlflowClient

from jobs import promote
from pipelines.data.versions import resolve_dataset
from pipelines.registry.evaluation import evaluate_version
from pipelines.registry.versions import ModelRef, load_predictor, logged_model_id
from tests.support.helpers import assert_same_confusion
from tests.support.models import TEST_MODEL, register_test_model

MODEL = "lanes-promote-test"


def alias_holder(alias: str = "champion") -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL, alias).version)
    except mlflow.exceptions.MlflowException:  # no holder
        return None


def single_process_confusion(predictor, data_uri: str, split: str = "val"):
    """The reference: every frame of the split predicted in this process, one confusion
    matrix (what evaluation computed before it moved to Ray Data actors)."""
    import numpy as np
    import torch

    from pipelines.core.metrics import confusion_matrix
    from pipelines.data.shards import build_dataset

    n = predictor.spec.n_class
    conf = torch.zeros(n, n, dtype=torch.int64)
    for batch in build_dataset(data_uri, split).iter_batches(batch_size=4, batch_format="numpy"):
        pred = torch.from_numpy(predictor.predict_prepared(batch["image"]))
        conf += confusion_matrix(pred, torch.as_tensor(np.array(batch["label"])), n)
    return conf.numpy()


def model_files(tmp_path, model, spec) -> dict[str, bytes]:
    from pipelines.inference.model_dir import MODEL_FILE, SPEC_FILE, save_model_dir

    d = save_model_dir(tmp_path / "model", model, spec)
    return {name: (d / name).read_bytes() for name in (MODEL_FILE, SPEC_FILE)}


@dataclass
class Scenario:
    """What the promotion scenario left: each step's (status, output), the versions, and the
    holder of the alias after each step."""

    versions: dict[str, str]  # worse, better, worst
    steps: dict[str, tuple[int, str]]
    holders: dict[str, str]
    tags_after_better: dict[str, dict[str, str]]  # the two versions' tags right after it
    tracking_uri: str
    data: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri, self.tracking_uri)


@pytest.fixture(scope="module")
def scenario(local_shards, ray_cluster, tmp_path_factory, test_transform):
    """Constant predictors whose ranking is known: everything "background" scores the
    background IoU (most pixels); everything "dividing" or "zebra" scores next to nothing.
    Then, in order: the first candidate with no holder; a better one under a min gain it does
    not reach; the better one; "latest" (the worst); the holder again; two rollbacks."""
    tmp = tmp_path_factory.mktemp("promote")
    store, canary = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "planted-pickle-ran"
    steps, holders, after = {}, {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        v = {name: register_test_model(store, tmp, MODEL, test_transform, canary, cls)
             for name, cls in (("worse", 1), ("better", 0), ("worst", 5))}  # fmt: skip
        data = ["--eval-data", local_shards]
        plan = {
            "first": ["--candidate", v["worse"], *data],
            "short_of_min_gain": ["--candidate", v["better"], "--min-gain", "0.99", *data],
            "better": ["--candidate", v["better"], *data],
            "worse_latest": ["--candidate", "latest", *data],
            "holder_again": ["--candidate", v["better"], *data],
            "rollback": ["--rollback"],
            "rollback_again": ["--rollback"],
        }
        for step, argv in plan.items():
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                status = promote.main(["--model", MODEL, *argv])
            steps[step] = (status, out.getvalue())
            holders[step] = alias_holder()
            if step == "better":  # later evaluations re-tag the holder
                client = MlflowClient(store, store)
                after = {k: client.get_model_version(MODEL, v[k]).tags for k in ("worse", "better")}
    assert not canary.exists(), "a promotion unpickled a registered version's python_model.pkl"
    return Scenario(v, steps, holders, after, store, local_shards)


@pytest.mark.slow
def test_the_first_candidate_is_promoted_when_nobody_holds_the_alias(scenario):
    status, out = scenario.steps["first"]
    worse = scenario.versions["worse"]
    assert status == 0 and f"promoted v{worse} to champion (no previous holder)" in out
    assert scenario.holders["first"] == worse


@pytest.mark.slow
def test_better_by_less_than_the_min_gain_is_refused(scenario):
    status, out = scenario.steps["short_of_min_gain"]
    worse = scenario.versions["worse"]
    assert status == promote.NOT_PROMOTED and scenario.holders["short_of_min_gain"] == worse
    assert f"kept v{worse} as champion" in out


@pytest.mark.slow
def test_better_is_promoted_after_both_are_evaluated(scenario):
    status, out = scenario.steps["better"]
    better, worse = scenario.versions["better"], scenario.versions["worse"]
    assert status == 0 and scenario.holders["better"] == better
    assert f"candidate v{better}" in out and f"champion v{worse}" in out
    for v in (better, worse):  # the progress line of each evaluation
        assert re.search(rf"^evaluate v{v}: 6/6 frames \(100%\), [\d.]+ frames/s$", out, re.M)


@pytest.mark.slow
def test_both_versions_are_tagged_with_their_scores_on_the_same_data(scenario):
    better, worse = scenario.versions["better"], scenario.versions["worse"]
    tags = {scenario.versions[k]: t for k, t in scenario.tags_after_better.items()}
    assert float(tags[better]["eval_miou"]) > float(tags[worse]["eval_miou"])
    assert tags[better]["eval_data_manifest_sha256"] == tags[worse]["eval_data_manifest_sha256"]
    assert json.loads(tags[better]["eval_iou"])["background"] > 0.9
    assert tags[better]["promotion_champion"].startswith(f"promoted v{better}")


@pytest.mark.slow
def test_the_recorded_score_is_the_single_process_one(scenario):
    """The score the metric code gives for that model on those shards, in one process."""
    from pipelines.core.metrics import scores

    better = scenario.versions["better"]
    tags = scenario.client().get_model_version(MODEL, better).tags
    predictor = load_predictor(ModelRef(MODEL, better), scenario.client())
    direct = scores(single_process_confusion(predictor, scenario.data))
    assert float(tags["eval_miou"]) == pytest.approx(direct["miou"], abs=1e-6)


@pytest.mark.slow
def test_each_evaluation_is_a_run_linked_to_the_logged_model_and_the_dataset(scenario):
    client, ds = scenario.client(), resolve_dataset(scenario.data)
    for k, tags in scenario.tags_after_better.items():
        v = scenario.versions[k]
        mv = client.get_model_version(MODEL, v)
        ev = client.get_run(tags["eval_run_id"])
        assert ev.data.metrics["eval_miou"] == pytest.approx(float(tags["eval_miou"]), abs=1e-6)
        assert ev.data.tags["model_version"] == v
        [inp] = ev.inputs.dataset_inputs
        assert inp.dataset.digest == ds.manifest_sha256
        assert json.loads(inp.dataset.source)["uri"] == ds.uri
        logged = client.get_logged_model(logged_model_id(mv))
        on_model = {m.key: m.value for m in logged.metrics if m.run_id == ev.info.run_id}
        assert on_model["eval_miou"] == pytest.approx(ev.data.metrics["eval_miou"])
        assert all(m.dataset_digest == ds.manifest_sha256 for m in logged.metrics
                   if m.run_id == ev.info.run_id)  # fmt: skip


@pytest.mark.slow
def test_the_decision_is_on_the_candidates_evaluation_run(scenario):
    better = scenario.versions["better"]
    run_id = scenario.tags_after_better["better"]["eval_run_id"]
    cand_run = scenario.client().get_run(run_id)
    assert cand_run.data.tags["decision"].startswith(f"promoted v{better}")


@pytest.mark.slow
def test_worse_than_the_holder_is_refused_and_still_evaluated(scenario):
    status, _ = scenario.steps["worse_latest"]
    assert status == promote.NOT_PROMOTED
    assert scenario.holders["worse_latest"] == scenario.versions["better"]
    worst = scenario.client().get_model_version(MODEL, scenario.versions["worst"])
    assert "eval_miou" in worst.tags


@pytest.mark.slow
def test_the_holder_as_candidate_has_nothing_to_do(scenario):
    status, out = scenario.steps["holder_again"]
    assert status == 0 and "already holds" in out


@pytest.mark.slow
def test_a_rollback_points_the_alias_at_the_previous_holder_and_a_second_undoes_it(scenario):
    better, worse = scenario.versions["better"], scenario.versions["worse"]
    status, out = scenario.steps["rollback"]
    assert status == 0 and f"v{better} -> v{worse}" in out and scenario.holders["rollback"] == worse
    status, _ = scenario.steps["rollback_again"]
    assert status == 0 and scenario.holders["rollback_again"] == better


def test_bad_input_is_one_line(tmp_path, local_shards, register_version, ray_cluster, capsys):
    def error(*argv: str) -> str:
        assert promote.main(list(argv)) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    assert "registered model 'nope' has no versions" in error(
        "--model", "nope", "--eval-data", local_shards
    )
    assert "registered model 'nope'" in error("--model", "nope", "--rollback")
    version = register_version(MODEL, constant_class=0)
    assert "--eval-data is required" in error("--model", MODEL, "--candidate", version)
    assert "no manifest.json" in error(
        "--model", MODEL, "--candidate", version, "--eval-data", str(tmp_path)
    )
    assert f"{MODEL}@champion: no previous holder" in error("--model", MODEL, "--rollback")
    # Shards ingested with another geometry than the model's: refused, not silently scored.
    other = tmp_path / "other"
    shutil.copytree(resolve_dataset(local_shards).uri, other)  # a pinned copy of the version
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["transform"]["width"] *= 2
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert "re-ingest with the model's --size/--crop-top" in error(
        "--model", MODEL, "--candidate", version, "--eval-data", str(other)
    )
    assert MlflowClient().get_registered_model(MODEL).aliases == {}


def test_evaluation_counts_the_models_classes(tmp_path, local_shards, test_transform, ray_cluster):
    """The confusion matrix has the model's classes, not the label map's: a 9-class model
    scores 9 rows and columns (class 8 never occurs in the labels, so its row is empty)."""
    import numpy as np
    import torch

    from fcn_models import build_model
    from pipelines.inference.model_dir import ModelSpec

    torch.manual_seed(0)
    model = build_model(TEST_MODEL, 9).eval()
    with torch.no_grad():
        model.score_layer4.bias[8] = 1.0  # predicts the extra class everywhere
    spec = ModelSpec(TEST_MODEL, 9, test_transform)
    result = evaluate_version(model_files(tmp_path, model, spec), local_shards)
    conf = np.array(result["confusion"])
    assert conf.shape == (9, 9)
    assert conf[8].sum() == 0 and conf[:, 8].sum() == conf.sum() > 0
    assert result["frames"] == 6 and len(result["iou"]) == 9


def test_actor_pool_evaluation_equals_the_single_process_confusion(
    tmp_path, local_shards, test_transform, ray_cluster
):
    """Two model actors, batches of 2, each batch's confusion matrix summed on the driver:
    exactly the matrix of one process predicting every frame."""
    import torch

    from fcn_models import build_model
    from pipelines.core import labels
    from pipelines.inference.model_dir import ModelSpec
    from pipelines.inference.predictor import Predictor

    torch.manual_seed(3)
    model = build_model(TEST_MODEL, 8).eval()
    with torch.no_grad():  # a model whose predictions vary over the frame: a real matrix
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    spec = ModelSpec(TEST_MODEL, 8, test_transform, labels.CLASS_NAMES)
    expected = single_process_confusion(Predictor(model, spec, "cpu"), local_shards)
    assert (expected > 0).sum() >= 4  # several (true, predicted) pairs: a non-trivial check
    beats = []
    result = evaluate_version(model_files(tmp_path, model, spec), local_shards, batch_size=2, actors=2,
                      on_frames=beats.append)  # fmt: skip
    assert_same_confusion(result["confusion"], expected)
    assert result["frames"] == 6
    assert beats == [2, 4, 6]  # 3 batches of 2, summed one after the other


def test_one_scorer_scores_each_of_its_models_as_if_alone(tmp_path, local_shards, test_transform):
    """Promotion scores candidate and holder in one pass: one actor holds both, and each
    model's confusion matrix is the one it gives alone."""
    import numpy as np

    from pipelines.data.shards import build_dataset
    from pipelines.inference.actors import Scorer
    from pipelines.inference.model_dir import ModelSpec
    from tests.support.models import make_model

    spec = ModelSpec(TEST_MODEL, 8, test_transform)
    files = [model_files(tmp_path / str(s), make_model(seed=s), spec) for s in (1, 2)]
    batches = build_dataset(local_shards, "val").iter_batches(batch_size=4, batch_format="numpy")
    batch = next(iter(batches))
    both = Scorer(files, device="cpu")(batch)
    alone = [Scorer([f], device="cpu")(batch)["confusion_0"] for f in files]
    assert both["frames"].tolist() == [4]
    for i in (0, 1):
        np.testing.assert_array_equal(both[f"confusion_{i}"], alone[i])
    assert not np.array_equal(alone[0], alone[1])  # two different models: a real check
