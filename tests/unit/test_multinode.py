"""Issue 24's multi-node options of jobs.train: bf16 gradient compression (and the bytes each
step all-reduces), SyncBatchNorm as an option, and checkpoints every N epochs uploaded in the
background. Each test fails when the line it guards is broken."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from jobs import train
from pipelines.core.options import ConfigError
from pipelines.training import loop
from pipelines.training.checkpoint import checkpoint_due
from pipelines.training.config import LoopConfig, TrainConfig
from pipelines.training.distributed import allreduce_bytes_per_step, compress_gradients
from pipelines.training.engine import TrainState
from pipelines.training.recipe import make_recipe

REQUIRED = ["--data", "d", "--experiment", "e", "--register-as", "m", "--storage", "s"]


def job(**kw) -> TrainConfig:
    return TrainConfig(data="d", experiment="e", register_as="m", storage="s", **kw)


# -- flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint-every", "0"], "error: --checkpoint-every must be >= 1, got 0\n"),
        (
            ["--sync-batchnorm"],
            "error: --sync-batchnorm needs --use-gpu: torch's SyncBatchNorm has no CPU (gloo) "
            "kernel\n",
        ),
    ],
)
def test_a_bad_value_is_one_line_and_status_2(argv, message, capsys):
    assert train.main(REQUIRED + argv) == 2
    assert capsys.readouterr().err == message


@pytest.mark.parametrize("flag", ["--grad-compression", "--checkpoint-upload"])
def test_an_unknown_choice_is_refused_by_the_parser(flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(REQUIRED + [flag, "fp8"])
    assert e.value.code == 2 and f"{flag}: invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"unknown {flag} 'fp8'; choose one of"):
        job(**{flag[2:].replace("-", "_"): "fp8"})


def test_the_flags_reach_the_config():
    cfg = train.load_config(REQUIRED + ["--grad-compression", "bf16", "--checkpoint-every",
                                        "3", "--checkpoint-upload", "sync", "--use-gpu",
                                        "--no-sync-batchnorm"])  # fmt: skip
    assert (cfg.grad_compression, cfg.checkpoint_every, cfg.checkpoint_upload) == ("bf16", 3,
                                                                                   "sync")  # fmt: skip
    assert cfg.sync_batchnorm is False
    defaults = train.load_config(REQUIRED)
    assert (defaults.grad_compression, defaults.checkpoint_every,
            defaults.checkpoint_upload) == ("none", 1, "async")  # fmt: skip


def test_sync_batchnorm_defaults_to_what_the_loop_did_before():
    """On with GPUs and more than one worker (the loop's behaviour before the flag), off on
    CPUs or one worker; an explicit --no-sync-batchnorm stays off."""
    assert job(use_gpu=True, num_workers=2).resolved().sync_batchnorm is True
    assert job(use_gpu=True, num_workers=1, batch_size=2).resolved().sync_batchnorm is False
    assert job(use_gpu=False).resolved().sync_batchnorm is False
    assert job(use_gpu=True, sync_batchnorm=False).resolved().sync_batchnorm is False


# -- gradient compression -------------------------------------------------------------------------
@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo process group in this process (DDP all-reduces, world size 1)."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.ConvTranspose2d(4, 4, 4, 2, bias=False))  # fmt: skip
    net[4].requires_grad_(False)  # like the fixed upsamplers: not in DDP's buckets
    return net


def _grads(model: nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model(torch.randn(2, 3, 9, 9) * 1e3).square().mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.usefixtures("one_rank_group")
def test_bf16_compression_all_reduces_the_gradients_in_bf16_only_when_asked():
    """With one rank the all-reduce is the identity, so what DDP leaves in .grad is the
    gradient as it was sent: exactly fp32 without the hook, rounded to bf16 with it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    plain = _grads(_net())
    for how in ("none", "bf16"):
        ddp = DDP(_net())
        compress_gradients(ddp, how)
        got = _grads(ddp)
        want = [g.bfloat16().float() for g in plain] if how == "bf16" else plain
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), how
        assert any(not torch.equal(a, b) for a, b in zip(got, plain, strict=True)) == (
            how == "bf16"
        )
    compress_gradients(_net(), "bf16")  # one worker: no DDP, nothing to hook
    with pytest.raises(ValueError, match="unknown gradient compression 'fp8'"):
        compress_gradients(DDP(_net()), "fp8")


@pytest.mark.usefixtures("one_rank_group")
def test_the_bytes_per_step_are_ddps_bucket_sizes_as_sent():
    """fp32: the sum of DDP's own gradient bucket sizes (its logging data, in bytes); bf16:
    half of that; no DDP (one worker): nothing is all-reduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_net())
    _grads(ddp)
    sizes = [int(n) for n in str(ddp._get_ddp_logging_data()["bucket_sizes"]).split(",")]
    assert allreduce_bytes_per_step(ddp, "none") == sum(sizes)
    assert allreduce_bytes_per_step(ddp, "bf16") == sum(sizes) // 2
    assert allreduce_bytes_per_step(_net(), "bf16") == 0


# -- checkpoints ----------------------------------------------------------------------------------
def test_the_checkpoint_schedule_counts_from_the_run_start_and_keeps_the_last_epoch():
    assert [e for e in range(5) if checkpoint_due(e, 5, 1)] == [0, 1, 2, 3, 4]
    assert [e for e in range(7) if checkpoint_due(e, 7, 3)] == [2, 5, 6]
    assert [e for e in range(3) if checkpoint_due(e, 3, 10)] == [2]
    # A run resumed after epoch 2 checkpoints where the uninterrupted one would.
    assert [e for e in range(3, 7) if checkpoint_due(e, 7, 3)] == [5, 6]


def _worker(rank: int, test_transform, **job_kw) -> tuple[loop.Rank, TrainState]:
    net = nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cfg = LoopConfig(job=job(**job_kw), recipe=make_recipe("default", "fcn8s_resnet101"),
                     transform=test_transform, n_class=3, train_frames=8)  # fmt: skip
    state = TrainState(net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1), None, None)
    return loop.Rank(cfg=cfg, rank=rank, world=2, steps_per_epoch=1), state


@pytest.mark.parametrize("upload", ["async", "sync"])
def test_rank_0_checkpoints_the_due_epochs_for_ray_to_upload_and_delete(
    upload, test_transform, monkeypatch
):
    """Every rank reports every epoch; rank 0 attaches a checkpoint on the due epochs only,
    in the chosen upload mode, and leaves the directory for Ray to upload and then delete
    (an async upload reads it after report returned)."""
    import ray.train

    reports = []

    def report(metrics, checkpoint=None, checkpoint_upload_mode=None, **kw):
        path = Path(checkpoint.path) if checkpoint is not None else None
        reports.append((metrics["epoch"], path, checkpoint_upload_mode, kw))

    monkeypatch.setattr(ray.train, "report", report)
    mode = {"async": ray.train.CheckpointUploadMode.ASYNC,
            "sync": ray.train.CheckpointUploadMode.SYNC}[upload]  # fmt: skip
    for rank in (0, 1):
        me, state = _worker(rank, test_transform, epochs=3, checkpoint_every=2,
                            checkpoint_upload=upload)  # fmt: skip
        for epoch in range(3):
            loop.checkpoint_and_report(me, state, {"epoch": epoch, "val_miou": 0.5}, {}, {})
    assert [r[0] for r in reports] == [0, 1, 2, 0, 1, 2]
    assert all(r[2] == mode for r in reports)
    saved = [(e, p) for e, p, _, _ in reports if p is not None]
    assert [e for e, _ in saved] == [1, 2]  # rank 0 only, epoch 2 of 3 and the last
    for _, path in saved:
        assert (path / "train_state.pt").is_file()  # still there for the upload
        assert reports[[r[1] for r in reports].index(path)][3] == {
            "delete_local_checkpoint_after_upload": True
        }
        shutil.rmtree(path)


def test_a_failed_report_leaves_no_checkpoint_behind(test_transform, monkeypatch, tmp_path):
    import ray.train

    made = []

    def report(metrics, checkpoint=None, **kw):
        made.append(Path(checkpoint.path))
        raise RuntimeError("storage down")

    monkeypatch.setattr(ray.train, "report", report)
    with pytest.raises(RuntimeError, match="storage down"):
        loop.checkpoint_and_report(*_worker(0, test_transform, epochs=1),
                                   {"epoch": 0, "val_miou": 0.5}, {}, {})  # fmt: skip
    assert made and not made[0].exists()
