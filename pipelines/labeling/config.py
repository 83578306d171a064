"""The options of a labeling run, declared once (:mod:`pipelines.core.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.options import check_options, option
from pipelines.data.sources import SourceLimitOptions
from pipelines.labeling.schema import NOVELTY_ABOVE
from pipelines.runtime.capacity import ActorPoolOptions
from pipelines.runtime.progress import ProgressOptions


@dataclass(frozen=True, kw_only=True)
class LabelConfig(ActorPoolOptions, SourceLimitOptions, ProgressOptions):
    """What to label, with which model, into which output, and how a run bounds itself."""

    input: str = option(help="prefix of raw frames, or an ingested dataset folder; local or s3://")
    output: str = option(help="output Parquet folder; local or s3://")
    model: str = option(help="models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
    apollo_ids: bool = option(False, "also write apollo_mask (Apollo label ids)")
    chunk_frames: int = option(
        2000,
        "frames per commit: a long backlog is committed in pieces, so a run that is stopped "
        "keeps what it finished",
        min=1,
        group="scheduling",
    )
    time_limit: float | None = option(
        None,
        "seconds; the run stops at its first commit after this (set it a chunk's time below "
        "the scheduler's deadline: the job stops itself and keeps what it committed)",
        min=0,
        group="scheduling",
    )
    lease_ttl: float = option(
        600.0,
        "seconds a run's lease on OUTPUT lasts without a heartbeat (renewed every ttl/3); "
        "after a crash the next run waits this long at most",
        above=0,
        group="scheduling",
    )
    wait_for_lease: float = option(
        0.0,
        "seconds to wait when another run holds the lease (default: exit 0 at once)",
        min=0,
        group="scheduling",
    )
    cluster_cpus: float | None = option(
        None,
        "CPUs an autoscaling cluster can scale to (default: the CPUs it has now); the model "
        "actors are fitted to leave one for reading frames",
        above=0,
        group="model actors",
    )
    stall_minutes: float = option(
        30.0, "fail the run when no chunk is committed for this long", above=0, group="scheduling"
    )
    rows_per_file: int = option(1000, "rows per output Parquet file", min=1)
    uncertain_below: float = option(
        0.5,
        "a pixel is uncertain when the model's largest class probability is under this (the "
        "uncertain_fraction column)",
        above=0,
        max=1,
        group="review",
    )
    review_below: float | None = option(
        None,
        "also write the frames whose confidence is under this, or whose novelty is over "
        "--review-novelty-above, to OUTPUT/_review/labeled_date=DATE/RUN.parquet (ids, "
        "sources, scores), for people to review",
        above=0,
        max=1,
        group="review",
    )
    review_novelty_above: float = option(
        NOVELTY_ABOVE,
        "with --review-below: a frame this unlike the training data (the novelty column) is "
        "listed for review whatever its confidence",
        above=0,
        group="review",
    )

    def __post_init__(self) -> None:
        check_options(self)
