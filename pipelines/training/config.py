"""The options of a training run, declared once (:mod:`pipelines.core.options`), and the typed
config every Ray Train worker's loop receives.

Ray hands ``train_loop_per_worker`` a plain dict (:meth:`LoopConfig.to_dict`); the worker
rebuilds the dataclass at its door (:meth:`LoopConfig.from_dict`), so the loop reads typed
fields and a key that is missing or misspelt fails at once, not in epoch 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

import fcn_models
from pipelines.core.frames import FrameTransform
from pipelines.core.options import ConfigError, as_dict, check_options, option
from pipelines.runtime.progress import ProgressOptions
from pipelines.training.recipe import RECIPES, Recipe, RecipeError, make_recipe

GRAD_COMPRESSION = ("none", "bf16")
CHECKPOINT_UPLOAD = ("async", "sync")
DATA, SCALE, OPTIMIZATION, TRACKING = (
    "data and model", "scale", "optimization", "tracking and checkpoints"
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ProgressOptions):
    """What to train on what, at what scale, with which recipe, tracked and checkpointed where."""

    data: str = option(
        help="ingested dataset (the --dest of jobs.ingest: its current version is used, "
        "resolved once; or a versions/NAME folder to pin one); local or s3://",
        group=DATA,
    )
    model: str = option(
        "fcn8s_resnet101", "model factory name", choices=fcn_models.MODEL_NAMES, group=DATA
    )
    backbone_weights: str | None = option(
        None,
        "ImageNet backbone state_dict (local path or s3:// URI), or 'torchvision' to download "
        "torchvision's (needs internet)",
        group=DATA,
    )
    num_workers: int = option(
        2, "Ray Train DDP workers (one per GPU with --use-gpu)", min=1, group=SCALE
    )
    use_gpu: bool = option(
        False, "one GPU per worker (NCCL); otherwise CPU workers (gloo)", group=SCALE
    )
    cpus_per_worker: float | None = option(
        None,
        "logical CPUs reserved per training worker (default: 1, lowered when the cluster is too "
        "small to also run the data pipeline; given, it is kept or the job fails)",
        above=0,
        group=SCALE,
    )
    cluster_cpus: float | None = option(
        None, "CPUs an autoscaling cluster can scale to (default: the CPUs it has now)",
        above=0, group=SCALE,
    )  # fmt: skip
    stall_minutes: float = option(
        30.0,
        "fail the job when no training or validation step completes for this long (waiting "
        "for resources, a stuck data pipeline)",
        above=0,
        group=SCALE,
    )
    skip_gpu_check: bool = option(
        False,
        "with --use-gpu on a cluster without an autoscaler Ray knows of, do not require the "
        "GPUs to be there now (an autoscaling cluster is asked for them and waited for)",
        group=SCALE,
    )
    provision_timeout: float = option(
        900.0,
        "seconds an autoscaling cluster may take to provide the workers' nodes",
        above=0,
        group=SCALE,
    )
    grad_compression: str = option(
        "none",
        "gradients as DDP all-reduces them: none (fp32) or bf16 (half the bytes per step: "
        "torch's bf16_compress_hook; NCCL and gloo)",
        choices=GRAD_COMPRESSION,
        group=SCALE,
    )
    sync_batchnorm: bool | None = option(
        None,
        "BatchNorm statistics over the global batch (SyncBatchNorm: ~2 collectives per "
        "BatchNorm layer per step); GPUs only. Default: on with --use-gpu and more than one "
        "worker",
        group=SCALE,
    )
    epochs: int = option(10, "passes over the training set", min=1, group=OPTIMIZATION)
    batch_size: int = option(
        16, "global batch size, split evenly over the workers", min=1, group=OPTIMIZATION
    )
    recipe: str = option(
        "default",
        "default: SGD, poly decay, mean pixel loss (torchvision); reference: the FCN paper's "
        "Caffe solvers for the VGG FCNs (summed loss, fixed tiny lr, momentum 0.99)",
        choices=RECIPES,
        group=OPTIMIZATION,
    )
    lr: float | None = option(
        None, "base learning rate (default: the recipe's, 0.01 for default)", above=0,
        group=OPTIMIZATION,
    )  # fmt: skip
    momentum: float | None = option(
        None, "default: the recipe's (0.9 / 0.99)", min=0, group=OPTIMIZATION
    )
    weight_decay: float | None = option(
        None, "default: the recipe's (1e-4 / 5e-4)", min=0, group=OPTIMIZATION
    )
    learn_upsampling: bool = option(
        False,
        "train the bilinear-initialised upsamplers too (the reference keeps them fixed)",
        group=OPTIMIZATION,
    )
    seed: int = option(
        0,
        "initial weights, shuffling and dropout; each epoch draws from seed + epoch, so a "
        "resumed run continues the sequence",
        group=OPTIMIZATION,
    )
    shuffle_buffer: int = option(
        64,
        "frames per worker that each training batch is drawn from at random (0: off)",
        min=0,
        group=OPTIMIZATION,
    )
    amp: bool | None = option(
        None, "bf16 autocast + channels_last (default: on with --use-gpu)", group=OPTIMIZATION
    )
    augment: bool = option(
        True, "flip / scale / colour augmentation of training frames", group=OPTIMIZATION
    )
    system_metrics_seconds: float = option(
        10.0,
        "rank 0's node: CPU, memory and GPU utilisation sampled into the MLflow run (system/ "
        "metrics) this often; 0: off",
        min=0,
        group=TRACKING,
    )
    experiment: str = option(help="MLflow experiment name", group=TRACKING)
    register_as: str = option(
        help="MLflow registered model name for the best checkpoint", group=TRACKING
    )
    storage: str = option(
        help="checkpoint storage URI (local folder or s3://bucket/prefix)", group=TRACKING
    )
    run_name: str | None = option(
        None,
        "name of this run (Ray Train run and MLflow run); re-use it to resume. Default: "
        "MODEL-TIMESTAMP",
        group=TRACKING,
    )
    allow_config_change: bool = option(
        False,
        "resume --run-name even with other hyperparameters than it started with: the new ones "
        "apply from the checkpoint's step on and are recorded as the run's resumed_with.* tags",
        group=TRACKING,
    )
    keep_checkpoints: int = option(
        2, "keep the best N checkpoints by val mIoU", min=1, group=TRACKING
    )
    checkpoint_every: int = option(
        1, "checkpoint every N epochs (the last epoch always); a resume restarts after the "
        "last checkpoint", min=1, group=TRACKING,
    )  # fmt: skip
    checkpoint_upload: str = option(
        "async",
        "async: rank 0 uploads each checkpoint in the background while the ranks train on "
        "(Ray Train's CheckpointUploadMode.ASYNC); sync: every rank waits for the upload",
        choices=CHECKPOINT_UPLOAD,
        group=TRACKING,
    )
    max_failures: int = option(
        3, "worker-group restarts from the last checkpoint before giving up", min=0,
        group=TRACKING,
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_options(self)
        if self.batch_size < self.num_workers:
            raise ConfigError(
                f"--batch-size {self.batch_size} is smaller than --num-workers "
                f"{self.num_workers}: the global batch is split over the workers, each needs at "
                "least one frame"
            )
        if self.batch_size % self.num_workers:
            lo = self.batch_size // self.num_workers * self.num_workers
            raise ConfigError(
                f"--batch-size {self.batch_size} is not divisible by --num-workers "
                f"{self.num_workers}: the global batch is split evenly over the workers (try "
                f"{lo} or {lo + self.num_workers})"
            )
        if self.sync_batchnorm and not self.use_gpu:
            raise ConfigError(
                "--sync-batchnorm needs --use-gpu: torch's SyncBatchNorm has no CPU (gloo) kernel"
            )
        try:
            self.recipe_in_force()
        except RecipeError as e:
            raise ConfigError(str(e)) from None

    def recipe_in_force(self) -> Recipe:
        return make_recipe(self.recipe, self.model, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay,
                           learn_upsampling=self.learn_upsampling)  # fmt: skip

    def resolved(self) -> TrainConfig:
        """The values in force where a default depends on others (the recipe's lr, momentum
        and weight decay; amp and SyncBatchNorm with GPUs; a run name from the model and the time): what MLflow
        records and the workers use."""
        recipe = self.recipe_in_force()
        return replace(
            self,
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            amp=self.use_gpu if self.amp is None else self.amp,
            sync_batchnorm=(
                self.use_gpu and self.num_workers > 1
                if self.sync_batchnorm is None
                else self.sync_batchnorm
            ),
            run_name=self.run_name or f"{self.model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
        )


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """What every worker's training loop gets from the driver: the job's options (resolved),
    what the driver read from the data and the tracking server, and two handles (the backbone
    weights in the object store, the progress actor the driver's watchdog reads)."""

    job: TrainConfig
    recipe: Recipe
    transform: FrameTransform
    n_class: int
    train_frames: int
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # rank 0 records into it; None: no MLflow record
    provenance: dict[str, Any] = field(default_factory=dict)
    backbone_weights: Any = None  # ray.ObjectRef of a state_dict, read and checked once
    progress: Any = None  # the driver's ProgressActor: rank 0's beats

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for Ray's ``train_loop_config`` (handles are kept as they are)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(job=as_dict(self.job), recipe=asdict(self.recipe),
                   transform=self.transform.to_dict())  # fmt: skip
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopConfig:
        return cls(**{**d, "job": TrainConfig(**d["job"]), "recipe": Recipe(**d["recipe"]),
                      "transform": FrameTransform.from_dict(d["transform"])})  # fmt: skip
