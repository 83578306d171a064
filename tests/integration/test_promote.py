"""Promotion: evaluate candidate and alias holder on the same shards, move the alias only when
the candidate is better, record both results, roll back."""

import json
import re
import shutil

import pytest
from mlflow import MlflowClient

from jobs import promote
from pipelines.data.versions import resolve_dataset
from pipelines.inference.evaluate import evaluate
from pipelines.registry.versions import ModelRef, load_predictor, logged_model_id
from tests.support.models import TEST_MODEL

MODEL = "lanes-promote-test"


def alias_holder(alias: str = "champion") -> str:
    return str(MlflowClient().get_model_version_by_alias(MODEL, alias).version)


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


def run(capsys, *argv: str) -> tuple[int, str]:
    status = promote.main(["--model", MODEL, *argv])
    return status, capsys.readouterr().out


@pytest.mark.slow
def test_promotes_better_refuses_worse_and_rolls_back(
    local_shards, register_version, ray_cluster, capsys
):
    # Constant predictors whose ranking is known: everything "background" scores the
    # background IoU (most pixels); everything "dividing" or "zebra" scores next to nothing.
    worse = register_version(MODEL, constant_class=1)  # v1: all dividing
    better = register_version(MODEL, constant_class=0)  # v2: all background
    worst = register_version(MODEL, constant_class=5)  # v3: all zebra
    data = ["--eval-data", local_shards]

    # No holder yet: the first candidate is promoted.
    status, out = run(capsys, "--candidate", worse, *data)
    assert status == 0 and f"promoted v{worse} to champion (no previous holder)" in out
    assert alias_holder() == worse

    # Better, but not by the required margin: refused, exit 1.
    status, out = run(capsys, "--candidate", better, "--min-gain", "0.99", *data)
    assert status == promote.NOT_PROMOTED and alias_holder() == worse
    assert f"kept v{worse} as champion" in out

    # Better: promoted; both evaluated on the same shards and tagged.
    status, out = run(capsys, "--candidate", better, *data)
    assert status == 0 and alias_holder() == better
    assert f"candidate v{better}" in out and f"champion v{worse}" in out
    for v in (better, worse):  # the progress line of each evaluation
        assert re.search(rf"^evaluate v{v}: 6/6 frames \(100%\), [\d.]+ frames/s$", out, re.M)
    client = MlflowClient()
    tags = {v: client.get_model_version(MODEL, v).tags for v in (worse, better)}
    assert float(tags[better]["eval_miou"]) > float(tags[worse]["eval_miou"])
    assert tags[better]["eval_data_manifest_sha256"] == tags[worse]["eval_data_manifest_sha256"]
    assert json.loads(tags[better]["eval_iou"])["background"] > 0.9
    assert tags[better]["promotion_champion"].startswith(f"promoted v{better}")

    # The recorded score is the one the metric code gives for that model on those shards.
    from pipelines.core.metrics import scores

    direct = scores(single_process_confusion(load_predictor(ModelRef(MODEL, better)), local_shards))
    assert float(tags[better]["eval_miou"]) == pytest.approx(direct["miou"], abs=1e-6)

    # Each evaluation is an MLflow run: metrics linked to the version's logged model and to
    # the dataset (its Datasets column), the decision on the candidate's run.
    ds = resolve_dataset(local_shards)
    for v in (worse, better):
        mv = client.get_model_version(MODEL, v)
        ev = client.get_run(mv.tags["eval_run_id"])
        assert ev.data.metrics["eval_miou"] == pytest.approx(float(mv.tags["eval_miou"]), abs=1e-6)
        assert ev.data.tags["model_version"] == v
        [inp] = ev.inputs.dataset_inputs
        assert inp.dataset.digest == ds.manifest_sha256
        assert json.loads(inp.dataset.source)["uri"] == ds.uri
        logged = client.get_logged_model(logged_model_id(mv))
        on_model = {m.key: m.value for m in logged.metrics if m.run_id == ev.info.run_id}
        assert on_model["eval_miou"] == pytest.approx(ev.data.metrics["eval_miou"])
        assert all(m.dataset_digest == ds.manifest_sha256 for m in logged.metrics
                   if m.run_id == ev.info.run_id)  # fmt: skip
    cand_run = client.get_run(client.get_model_version(MODEL, better).tags["eval_run_id"])
    assert cand_run.data.tags["decision"].startswith(f"promoted v{better}")

    # Worse than the holder ("latest" is v3): refused, the holder stays.
    status, out = run(capsys, "--candidate", "latest", *data)
    assert status == promote.NOT_PROMOTED and alias_holder() == better
    assert "eval_miou" in client.get_model_version(MODEL, worst).tags

    # The candidate already holds the alias: nothing to evaluate.
    status, out = run(capsys, "--candidate", better, *data)
    assert status == 0 and "already holds" in out

    # Rollback points the alias at the previous holder; a second one undoes the first.
    status, out = run(capsys, "--rollback")
    assert status == 0 and f"v{better} -> v{worse}" in out and alias_holder() == worse
    status, out = run(capsys, "--rollback")
    assert status == 0 and alias_holder() == better


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
    result = evaluate(model_files(tmp_path, model, spec), local_shards)
    conf = np.array(result["confusion"])
    assert conf.shape == (9, 9)
    assert conf[8].sum() == 0 and conf[:, 8].sum() == conf.sum() > 0
    assert result["frames"] == 6 and len(result["iou"]) == 9


def test_actor_pool_evaluation_equals_the_single_process_confusion(
    tmp_path, local_shards, test_transform, ray_cluster
):
    """Two model actors, batches of 2, each batch's confusion matrix summed on the driver:
    exactly the matrix of one process predicting every frame."""
    import numpy as np
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
    result = evaluate(model_files(tmp_path, model, spec), local_shards, batch_size=2, actors=2,
                      on_frames=beats.append)  # fmt: skip
    np.testing.assert_array_equal(np.array(result["confusion"]), expected)
    assert result["frames"] == 6
    assert beats == [2, 4, 6]  # 3 batches of 2, summed one after the other
