"""Promotion: a candidate version takes an alias (default ``champion``) only when it is better.

Both the candidate and the current holder are evaluated on the same shards (resolved once) with
the training metric code, in one pass on the cluster (:mod:`pipelines.registry.evaluation`: the
split read once, one pool of actors holding both). Each result is
recorded as tags on its version and as an MLflow evaluation run whose metrics are linked to the
version's logged model and to the dataset, so the MLflow UI compares candidate and holder. The
alias moves by compare-and-swap (:mod:`pipelines.registry.aliases`): only if it still points at
the version evaluated against.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from pipelines.core.errors import Exit
from pipelines.core.options import ConfigError, check_options, option
from pipelines.data.versions import DatasetVersion, resolve_dataset
from pipelines.registry import aliases
from pipelines.registry.versions import ModelRef, fetch_verified, logged_model_id, resolve_version
from pipelines.runtime import capacity, progress, tracking, watchdog
from pipelines.runtime.capacity import ActorPoolOptions
from pipelines.runtime.progress import ProgressOptions

NOT_PROMOTED = Exit.NOT_PROMOTED


@dataclass(frozen=True, kw_only=True)
class PromoteConfig(ActorPoolOptions, ProgressOptions):
    """Which version to evaluate against which alias, on which data; or a rollback."""

    model: str = option(help="registered model name")
    candidate: str = option("latest", "candidate version number, or 'latest'")
    eval_data: str | None = option(None, "ingested dataset URI to evaluate on (local or s3://)")
    split: str = option("val", "split of --eval-data to evaluate on")
    alias: str = option("champion", "the alias to move")
    min_gain: float = option(0.0, "mIoU the candidate must gain over the holder")
    stall_minutes: float = option(
        30.0, "give up (exit 1) when evaluation makes no progress for this long", above=0
    )
    rollback: bool = option(False, "point the alias back to its previous holder")
    experiment: str | None = option(
        None,
        "MLflow experiment of the evaluation runs (default: the candidate's training "
        "experiment, so its UI compares candidate and holder next to the training runs)",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if not self.rollback and not self.eval_data:
            raise ConfigError("--eval-data is required (unless --rollback)")


def run(cfg: PromoteConfig) -> int:
    """The promotion job. Exit status (:class:`~pipelines.core.errors.Exit`): 0 the candidate
    holds the alias (promoted now, or already; or rolled back), 4 not better, 5 the alias
    moved meanwhile, 6 the evaluation stalled."""
    from mlflow import MlflowClient

    uri = tracking.configure()
    tracking.check_tracking(uri)
    client = MlflowClient()
    if cfg.rollback:
        current, previous = aliases.rollback_alias(cfg.model, cfg.alias, client)
        print(f"rolled back {cfg.model}@{cfg.alias}: v{current} -> v{previous}")
        return 0
    # Resolved once, before models load (a clear error now), and used for both models: a
    # version committed meanwhile never splits the comparison.
    data = resolve_dataset(cfg.eval_data)
    candidate = resolve_version(f"models:/{cfg.model}/{cfg.candidate}", client)
    holder = aliases.alias_holder(cfg.model, cfg.alias, client)
    if holder == candidate.version:
        print(f"v{candidate.version} already holds {cfg.model}@{cfg.alias}; nothing to do")
        return 0
    versions = {
        v: client.get_model_version(cfg.model, v)
        for v in [candidate.version] + ([holder] if holder else [])
    }
    experiment_id = experiment_of(client, versions[candidate.version], cfg.experiment, uri)
    try:
        results, run_ids = evaluate_all(cfg, client, versions, data, experiment_id)
    except watchdog.Stalled as e:
        print(f"error: {e}; the alias was not moved", file=sys.stderr)
        return Exit.STALLED
    cand = results[candidate.version]
    print(f"evaluated on {data.uri} [{cfg.split}], {cand['frames']} frames")
    print(comparison(cfg.alias, candidate.version, holder, results))
    status, decision = decide(cfg, client, candidate.version, holder, results)
    client.set_model_version_tag(cfg.model, candidate.version, f"promotion_{cfg.alias}", decision)
    client.set_tag(run_ids[candidate.version], "decision", decision)
    print(decision)
    return status


def evaluate_all(
    cfg: PromoteConfig, client, versions: dict, data: DatasetVersion, experiment_id: str
) -> tuple[dict[str, dict], dict[str, str]]:
    """Evaluate the versions in one pass on the cluster's actor pool (the split read once, the
    actors started once, each holding every version), under a watchdog, with a progress line
    per version; record each result (version tags, an evaluation run). Returns (results, run
    ids), by version."""
    from pipelines.registry.evaluation import evaluate_versions
    from pipelines.runtime.cluster import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    pool = capacity.actor_pool(cfg, "evaluation", every_s=cfg.progress_seconds)
    with pool as (actors, use_gpu, note, cluster):
        capacity.check_reader(cluster)
        if note:
            print(note, flush=True)
        print(f"evaluating on {actors} {'GPU' if use_gpu else 'CPU'} actor(s) of the cluster",
              flush=True)  # fmt: skip
        dog = watchdog.Watchdog(
            cfg.stall_minutes * 60, "evaluation",
            hint=f"The cluster has {cluster.describe()}; raise --stall-minutes if scoring is "
            "just slow",
        )  # fmt: skip
        total = int(data.manifest.get("counts", {}).get(cfg.split, 0))
        every_s = cfg.progress_seconds or float("inf")
        lines = {v: progress.RateLine(f"evaluate v{v}", total, every_s=every_s) for v in versions}

        def scored(frames: int) -> None:
            dog.beat(f"{frames} frames scored")
            for line in lines.values():
                line.update(frames)

        with dog:
            dog.beat(f"loading v{', v'.join(versions)}")
            files = [fetch_verified(ModelRef(cfg.model, v), client) for v in versions]
            found = evaluate_versions(files, data.uri, cfg.split, batch_size=cfg.batch_size,
                                      actors=actors, use_gpu=use_gpu, on_frames=scored)  # fmt: skip
        results, run_ids = dict(zip(versions, found, strict=True)), {}
        for version, mv in versions.items():
            lines[version].update(results[version]["frames"], force=True)
            record(client, cfg.model, version, results[version], data)
            run_ids[version] = evaluation_run(client, experiment_id, cfg.model, mv,
                                              results[version], data, cfg.split, cfg.alias)  # fmt: skip
            client.set_model_version_tag(cfg.model, version, "eval_run_id", run_ids[version])
        return results, run_ids


def comparison(alias: str, candidate: str, holder: str | None, results: dict) -> str:
    """The table of metrics, candidate against holder, with the gain."""
    cand = results[candidate]
    rows = [("metric", f"candidate v{candidate}",
             f"{alias} v{holder}" if holder else f"{alias} (none)", "gain")]  # fmt: skip
    keys = ["miou", "pixel_acc", "mean_class_acc", "fwiou"] + [f"iou:{k}" for k in cand["iou"]]
    for key in keys:

        def get(r: dict, k: str = key) -> float:
            return r["iou"][k[4:]] if k.startswith("iou:") else r[k]

        c, h = get(cand), get(results[holder]) if holder else None
        rows.append((key, f"{c:.4f}", "-" if h is None else f"{h:.4f}",
                     "-" if h is None else f"{c - h:+.4f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def decide(
    cfg: PromoteConfig, client, candidate: str, holder: str | None, results: dict
) -> tuple[Exit, str]:
    """Move the alias if the candidate is better (compare-and-swap: evaluation took minutes,
    and the alias may have moved meanwhile). Returns (the exit status, the decision in
    words)."""
    gain = results[candidate]["miou"] - results[holder]["miou"] if holder else None
    if holder is not None and not (gain > 0 and gain >= cfg.min_gain):
        return Exit.NOT_PROMOTED, (
            f"kept v{holder} as {cfg.alias}: candidate mIoU gain {gain:+.4f} does not beat min "
            f"gain {cfg.min_gain}"
        )
    try:
        aliases.move_alias(cfg.model, cfg.alias, candidate, client, expected=holder)
    except aliases.AliasMoved as e:
        return Exit.LOST_RACE, (
            f"not promoted: {e}, while v{candidate} was evaluated against "
            f"{'v' + holder if holder else 'no holder'}; re-run to evaluate against the new "
            "holder"
        )
    why = "no previous holder" if holder is None else f"mIoU gain {gain:+.4f} >= {cfg.min_gain}"
    return Exit.OK, f"promoted v{candidate} to {cfg.alias} ({why})"


def record(client, name: str, version: str, result: dict, data: DatasetVersion) -> None:
    """The evaluation as tags of the version (what the registry's UI shows beside it)."""
    tags = {
        "eval_miou": f"{result['miou']:.6f}",
        "eval_pixel_acc": f"{result['pixel_acc']:.6f}",
        "eval_iou": json.dumps({k: round(v, 6) for k, v in result["iou"].items()}),
        "eval_frames": str(result["frames"]),
        "eval_data": data.root,
        "eval_data_version": data.name,
        "eval_data_manifest_sha256": data.manifest_sha256,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def evaluation_run(client, experiment_id: str, name: str, version, result: dict,
                   data: DatasetVersion, split: str, alias: str) -> str:  # fmt: skip
    """One MLflow run per evaluated version: the scores as metrics, linked to the version's
    logged model (``model_id``: the model's page lists them, and the experiment's Models tab
    compares candidate and holder) and to the dataset (``log_input``, the Datasets column).
    Returns the run id."""
    import mlflow
    import numpy as np
    from PIL import Image

    from pipelines.core.metrics import flat_metrics
    from pipelines.core.pictures import confusion_png

    dataset = tracking.dataset_input(data, split)
    metrics = {k: v for k, v in flat_metrics(result, "eval_").items() if k != "eval_confusion"}
    metrics["eval_frames"] = result["frames"]
    tags = {"model_name": name, "model_version": str(version.version), "alias": alias,
            "eval_data": data.uri}  # fmt: skip
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"evaluate-{name}-v{version.version}",
        tags=tracking.redact(tags),
    ) as run:  # fmt: skip
        mlflow.log_input(dataset, context="evaluation")
        clean = {k: float(v) for k, v in metrics.items() if v == v}  # NaN: class never seen
        mlflow.log_metrics(clean, model_id=logged_model_id(version), dataset=dataset)
        picture = Image.open(io.BytesIO(confusion_png(np.array(result["confusion"]))))
        mlflow.log_image(picture, key="eval_confusion", step=0)
    return run.info.run_id


def experiment_of(client, version, explicit: str | None, uri: str) -> str:
    """The experiment for the evaluation runs: ``--experiment``, else the one of the run that
    logged the candidate, else ``promotion``."""
    if explicit:
        return tracking.ensure_experiment(explicit, uri)
    try:
        return client.get_run(version.run_id).info.experiment_id
    except Exception:  # no source run (registered from elsewhere, or deleted)
        return tracking.ensure_experiment("promotion", uri)
