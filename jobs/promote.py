"""Promote a registered model version to an alias (default ``champion``) only when it is better.

    python -m jobs.promote --model NAME --candidate VERSION|latest --eval-data URI \\
        [--alias champion] [--min-gain 0.0] [--actors N] [--use-gpu]
    python -m jobs.promote --model NAME --rollback [--alias champion]

Both the candidate and the current alias holder are evaluated on the same shards with the
training metric code, on the cluster (Ray Data over a pool of model actors, a GPU each when the
cluster has GPUs; the driver only sums confusion matrices). Each result is recorded as tags on
its version and as an MLflow evaluation run whose metrics are linked to the version's logged
model and to the dataset, so the MLflow UI compares candidate and holder. The alias moves by
compare-and-swap: only if it still points at the version evaluated against (another promotion
or a rollback may have moved it meanwhile). Exit status: 0 the candidate holds the alias
(promoted now, or already), 1 not promoted (not better, or the alias moved meanwhile), 2 bad
input.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from jobs._cli import (
    add_actor_pool_args,
    add_progress_arg,
    cli,
    init_ray,
    parse_args,
    quiet_ray_data,
)
from pipelines import capacity, progress, registry, tracking, watchdog
from pipelines.evaluate import evaluate
from pipelines.versions import resolve_dataset

NOT_PROMOTED = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.promote",
        description="Evaluate a candidate model version against the alias holder; move the alias if it is better.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--candidate", default="latest", help="candidate version number, or 'latest'")
    p.add_argument("--eval-data", help="ingested dataset URI to evaluate on (local or s3://)")
    p.add_argument("--split", default="val", help="split of --eval-data to evaluate on")
    p.add_argument("--alias", default="champion")
    p.add_argument(
        "--min-gain", type=float, default=0.0, help="mIoU the candidate must gain over the holder"
    )
    p.add_argument(
        "--stall-minutes",
        type=float,
        default=30.0,
        help="give up (exit 1) when evaluation makes no progress for this long",
    )
    p.add_argument(
        "--rollback", action="store_true", help="point the alias back to its previous holder"
    )
    add_actor_pool_args(p)
    add_progress_arg(p, "frames scored / total, rate, ETA")
    p.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment of the evaluation runs (default: the candidate's training "
        "experiment, so its UI compares candidate and holder next to the training runs)",
    )
    return p


def record(client, name: str, version: str, result: dict, data) -> None:
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


def evaluation_run(
    client, experiment_id: str, name: str, version, result: dict, data, split: str, alias: str
) -> str:
    """One MLflow run per evaluated version: the scores as metrics, linked to the version's
    logged model (``model_id``: the model's page lists them, and the experiment's Models tab
    compares candidate and holder) and to the dataset (``log_input``, the Datasets column).
    Returns the run id."""
    import mlflow
    import numpy as np

    from pipelines.metrics import flat_metrics
    from pipelines.pictures import confusion_png

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
        mlflow.log_metrics(clean, model_id=registry.logged_model_id(version), dataset=dataset)
        mlflow.log_image(
            _png_image(confusion_png(np.array(result["confusion"]))), key="eval_confusion", step=0
        )
    return run.info.run_id


def _png_image(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def experiment_of(client, version, explicit: str | None, uri: str) -> str:
    """The experiment for the evaluation runs: ``--experiment``, else the one of the run that
    logged the candidate, else ``promotion``."""
    if explicit:
        return tracking.ensure_experiment(explicit, uri)
    try:
        return client.get_run(version.run_id).info.experiment_id
    except Exception:  # no source run (registered from elsewhere, or deleted)
        return tracking.ensure_experiment("promotion", uri)


def table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> int:
    from mlflow import MlflowClient

    args = parse_args(build_parser(), argv)
    uri = tracking.configure()
    tracking.check_tracking(uri)
    client = MlflowClient()

    if args.rollback:
        current, previous = registry.rollback_alias(args.model, args.alias, client)
        print(f"rolled back {args.model}@{args.alias}: v{current} -> v{previous}")
        return 0
    if not args.eval_data:
        raise registry.RegistryError("--eval-data is required (unless --rollback)")

    # Resolved once, before models load (a clear error now), and used for both models: a
    # version committed meanwhile never splits the comparison.
    data = resolve_dataset(args.eval_data)
    candidate = registry.resolve_version(f"models:/{args.model}/{args.candidate}", client)
    holder = registry.alias_holder(args.model, args.alias, client)
    if holder == candidate.version:
        print(f"v{candidate.version} already holds {args.model}@{args.alias}; nothing to do")
        return 0

    for flag in ("batch_size", "stall_minutes", "progress_seconds"):
        if getattr(args, flag) <= 0:
            raise registry.RegistryError(f"--{flag.replace('_', '-')} must be > 0")
    versions = {
        v: client.get_model_version(args.model, v)
        for v in [candidate.version] + ([holder] if holder else [])
    }
    experiment_id = experiment_of(client, versions[candidate.version], args.experiment, uri)

    init_ray()
    quiet_ray_data()
    cluster = capacity.cluster()
    capacity.check_reader(cluster)
    actors, use_gpu, note = capacity.plan_actor_pool(cluster, args.actors, args.use_gpu)
    if note:
        print(note, flush=True)
    print(
        f"evaluating on {actors} {'GPU' if use_gpu else 'CPU'} actor(s) of the cluster",
        flush=True,
    )
    results, run_ids = {}, {}
    dog = watchdog.Watchdog(
        args.stall_minutes * 60,
        "evaluation",
        hint=f"The cluster has {cluster.describe()}; raise --stall-minutes if scoring is just slow",
    )
    try:
        with dog:
            for version, mv in versions.items():
                ref = registry.ModelRef(args.model, version)
                dog.beat(f"loading v{version}")
                total = int(data.manifest.get("counts", {}).get(args.split, 0))
                line = progress.RateLine(f"evaluate v{version}", total,
                                         every_s=args.progress_seconds)  # fmt: skip

                def scored(frames: int, v=version, line=line) -> None:
                    dog.beat(f"v{v}: {frames} frames scored")
                    line.update(frames)

                results[version] = evaluate(
                    registry.fetch_verified(ref, client), data.uri, args.split,
                    batch_size=args.batch_size, actors=actors, use_gpu=use_gpu,
                    progress=scored,
                )  # fmt: skip
                line.update(results[version]["frames"], force=True)
                record(client, args.model, version, results[version], data)
                run_id = evaluation_run(client, experiment_id, args.model, mv,
                                        results[version], data, args.split, args.alias)  # fmt: skip
                client.set_model_version_tag(args.model, version, "eval_run_id", run_id)
                run_ids[version] = run_id
    except watchdog.Stalled as e:
        print(f"error: {e}; the alias was not moved", file=sys.stderr)
        return NOT_PROMOTED

    cand = results[candidate.version]
    rows = [
        (
            "metric",
            f"candidate v{candidate.version}",
            f"{args.alias} v{holder}" if holder else f"{args.alias} (none)",
            "gain",
        )
    ]
    keys = ["miou", "pixel_acc", "mean_class_acc", "fwiou"] + [f"iou:{k}" for k in cand["iou"]]
    for key in keys:
        get = (
            (lambda r, k=key: r["iou"][k[4:]])
            if key.startswith("iou:")
            else (lambda r, k=key: r[k])
        )
        c = get(cand)
        h = get(results[holder]) if holder else None
        rows.append(
            (
                key,
                f"{c:.4f}",
                "-" if h is None else f"{h:.4f}",
                "-" if h is None else f"{c - h:+.4f}",
            )
        )
    print(f"evaluated on {data.uri} [{args.split}], {cand['frames']} frames")
    print(table(rows))

    gain = cand["miou"] - results[holder]["miou"] if holder else None
    promote = holder is None or (gain > 0 and gain >= args.min_gain)
    if promote:
        # Compare-and-swap: evaluation took minutes, and the alias may have moved meanwhile.
        try:
            registry.move_alias(args.model, args.alias, candidate.version, client, expected=holder)
        except registry.AliasMoved as e:
            promote = False
            decision = (
                f"not promoted: {e}, while v{candidate.version} was evaluated against "
                f"{'v' + holder if holder else 'no holder'}; re-run to evaluate against the new holder"
            )
        else:
            why = (
                "no previous holder"
                if holder is None
                else f"mIoU gain {gain:+.4f} >= {args.min_gain}"
            )
            decision = f"promoted v{candidate.version} to {args.alias} ({why})"
    else:
        decision = f"kept v{holder} as {args.alias}: candidate mIoU gain {gain:+.4f} does not beat min gain {args.min_gain}"
    client.set_model_version_tag(args.model, candidate.version, f"promotion_{args.alias}", decision)
    client.set_tag(run_ids[candidate.version], "decision", decision)
    print(decision)
    return 0 if promote else NOT_PROMOTED


if __name__ == "__main__":
    sys.exit(main())
