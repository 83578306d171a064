"""The training recipe without Ray: parameter groups, the two recipes, the step on one batch,
resuming the schedule and momentum exactly, per-epoch seeds."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from fcn_models import build_model
from pipelines.data.decode import decode_batch
from pipelines.data.shards import shard_files
from pipelines.runtime import tracking
from pipelines.runtime.progress import StepLine
from pipelines.training import engine
from pipelines.training.batches import NormalizeCollate
from pipelines.training.checkpoint import (
    read_epoch_record,
    restore_train_state,
    write_epoch_record,
)
from pipelines.training.engine import epoch_seed
from pipelines.training.recipe import (
    RecipeError,
    make_loss,
    make_optimizer,
    make_recipe,
    set_trainable,
)
from pipelines.training.record import EpochLogger, SystemMetrics, epoch_pictures
from tests.support.models import TEST_MODEL

MODEL = TEST_MODEL  # the suite's quarter-size production model (tests/support/models.py)
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def _groups(optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


@pytest.mark.parametrize("name", ["fcn8s_resnet101", "fcn16s"])
def test_parameter_groups_are_the_reference_ones(name):
    model = build_model(name, 8)
    set_trainable(model, learn_upsampling=False)
    optimizer, _ = make_optimizer(model, make_recipe("default", name, lr=0.1), 100)
    groups = _groups(optimizer)
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == {"fcn8s_resnet101": 3, "fcn16s": 2}[name]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for m in ups:  # fixed bilinear upsamplers: no gradient, not optimized
        assert all(not p.requires_grad and id(p) not in in_optimizer for p in m.parameters())
    # Every other parameter is optimized exactly once.
    others = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, others)) == sorted(
        id(p) for g in optimizer.param_groups for p in g["params"]
    )
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["weights"]["lr"] == 0.1 and groups["weights"]["weight_decay"] == 1e-4
    assert all(names[id(p)].endswith("weight") for p in groups["weights"]["params"])
    assert groups["biases"]["lr"] == pytest.approx(0.2) and groups["biases"]["weight_decay"] == 0
    assert all(names[id(p)].endswith("bias") for p in groups["biases"]["params"])
    norms = {
        id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    }
    if name == "fcn8s_resnet101":
        assert {id(p) for p in groups["norm"]["params"]} == norms and norms
        assert groups["norm"]["weight_decay"] == 0 and groups["norm"]["lr"] == 0.1
        assert not norms & {id(p) for p in groups["weights"]["params"] + groups["biases"]["params"]}
    else:
        assert "norm" not in groups  # VGG has no normalization layers

    # --learn-upsampling: the upsamplers are trained like any weight.
    set_trainable(model, learn_upsampling=True)
    optimizer, _ = make_optimizer(model, make_recipe("default", name, lr=0.1), 100)
    weights = {id(p) for p in _groups(optimizer)["weights"]["params"]}
    assert all(id(m.weight) in weights for m in ups)


def test_fixed_upsamplers_do_not_move_in_a_step():
    model = build_model(MODEL, 8)
    state = engine.build_train_state(model, make_recipe("default", MODEL), total_steps=10)
    before = model.upscore8.weight.detach().clone()
    head = model.score_layer4.weight.detach().clone()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 8, (2, 64, 64))
    engine.train_step(state, {"image": x, "label": y})
    assert torch.equal(model.upscore8.weight, before)
    assert not torch.equal(model.score_layer4.weight, head)  # the step did learn


def test_reference_recipe_is_the_papers_solver():
    expected = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s_atonce": 1e-10}
    for name, lr in expected.items():
        r = make_recipe("reference", name)
        assert (r.lr, r.momentum, r.weight_decay, r.poly_power, r.loss_reduction) == (
            lr, 0.99, 5e-4, None, "sum",
        )  # fmt: skip
    with pytest.raises(RecipeError, match="VGG solvers"):
        make_recipe("reference", MODEL)
    d = make_recipe("default", MODEL)
    assert (d.lr, d.momentum, d.weight_decay, d.poly_power, d.loss_reduction) == (
        0.01, 0.9, 1e-4, 0.9, "mean",
    )  # fmt: skip
    # Summed loss: per-image sums over pixels, averaged over the batch (Caffe, normalize: false).
    logits, target = torch.randn(3, 8, 5, 7), torch.randint(0, 8, (3, 5, 7))
    target[0, 0, :3] = 255  # ignored pixels count in neither
    mean = make_loss(d)(logits, target)
    summed = make_loss(make_recipe("reference", "fcn32s"))(logits, target)
    valid = int((target != 255).sum())
    assert float(summed) == pytest.approx(float(mean) * valid / 3, rel=1e-5)
    # Schedules: the reference rate is fixed, the default decays to zero (poly 0.9).
    model = nn.Conv2d(3, 8, 1)
    for recipe, at_half in ((make_recipe("reference", "fcn32s"), 1e-10),
                            (d, 0.01 * 0.5**0.9)):  # fmt: skip
        opt, sched = make_optimizer(model, recipe, 10)
        for _ in range(5):
            opt.step()
            sched.step()
        assert _groups(opt)["weights"]["lr"] == pytest.approx(at_half, rel=1e-9)
        assert _groups(opt)["biases"]["lr"] == pytest.approx(2 * at_half, rel=1e-9)


def test_training_step_learns_one_batch(local_shards, test_transform):
    """The job's own recipe (SGD, poly schedule, parameter groups, loss) fits one batch (the
    first two rows of the first shard, decoded by the pipeline's own stages) beyond what any
    model blind to the image can: its loss ends well below the entropy of the batch's class
    frequencies, the best loss a constant per-class prediction reaches. (From scratch, 40
    SGD steps learn where the 3% of lane pixels are *not*; telling lane classes apart takes
    hundreds: benchmarks/bench_learning.py.)"""
    table = pq.read_table(sorted(shard_files(local_shards, "train"))[0], columns=["image", "label"])
    rows = table.slice(0, 2).to_pydict()
    batch = NormalizeCollate(test_transform)(
        decode_batch({k: np.array(v, dtype=object) for k, v in rows.items()})
    )
    model = engine.build_model(MODEL, 8, seed=0)
    recipe = make_recipe("default", MODEL, lr=0.02)  # the demo's rate
    state = engine.build_train_state(model, recipe, total_steps=40)
    losses = []
    engine.train_one_epoch(
        state, [batch] * 40, on_step=lambda i, n, loss: losses.append(float(loss))
    )
    y = batch["label"][batch["label"] != 255]
    freq = torch.bincount(y, minlength=8).double()
    freq = freq[freq > 0] / freq.sum()
    prior_entropy = float(-(freq * freq.log()).sum())
    final = float(np.mean(losses[-10:]))
    assert losses[-1] < 0.1 * losses[0], losses
    assert final < 0.85 * prior_entropy, (final, prior_entropy)


def test_resume_continues_schedule_and_momentum_exactly(tmp_path, test_transform):
    """2 + 2 steps with a checkpoint between them (engine.save_checkpoint, load_checkpoint and
    resume, as the job's workers use them) give bit-identical weights and learning rate to 4
    steps in one go."""
    from pipelines.inference.model_dir import ModelSpec

    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 3, 32, 64), "label": torch.randint(0, 8, (2, 32, 64))}
            for _ in range(4)]  # fmt: skip
    recipe = make_recipe("default", MODEL, lr=0.05)
    spec = ModelSpec(MODEL, 8, test_transform)

    def fresh(model=None):
        model = model or engine.build_model(MODEL, 8, seed=1)
        return engine.build_train_state(model, recipe, total_steps=6)

    ref = fresh()
    engine.train_one_epoch(ref, data)

    state = fresh()
    engine.train_one_epoch(state, data[:2])
    engine.save_checkpoint(tmp_path, state, spec, epoch=0)
    del state
    model, train_state = engine.load_checkpoint(tmp_path)
    state = fresh(model)
    assert engine.resume(state, train_state) == 1 and state.global_step == 2
    assert state.scheduler.get_last_lr() == [recipe.lr * (1 - 2 / 6) ** 0.9,
                                             2 * recipe.lr * (1 - 2 / 6) ** 0.9,
                                             recipe.lr * (1 - 2 / 6) ** 0.9]  # fmt: skip
    engine.train_one_epoch(state, data[2:])
    assert state.scheduler.get_last_lr() == ref.scheduler.get_last_lr()
    for (k, a), b in zip(ref.model.state_dict().items(), state.model.state_dict().values(),
                         strict=True):  # fmt: skip
        assert torch.equal(a, b), k


def test_epoch_seeds_differ_by_epoch_and_rank_and_repeat():
    seeds = {(e, r): epoch_seed(7, e, r) for e in range(4) for r in range(2)}
    assert len(set(seeds.values())) == len(seeds)
    assert epoch_seed(7, 3, 1) == seeds[(3, 1)] and epoch_seed(8, 3, 1) != seeds[(3, 1)]


def test_backbone_weights_are_checked_against_the_model(tmp_path):
    """Read once on the driver and checked against the chosen model's backbone, so a wrong
    file is one clear error before any worker starts; 'torchvision' picks the model's own."""
    from torchvision.models import ResNet101_Weights, VGG16_Weights

    from fcn_models import ResNet101Backbone
    from pipelines.training.weights import (
        BackboneWeightsError,
        load_backbone_weights,
        torchvision_weights,
    )

    assert torchvision_weights("fcn8s_resnet101") is ResNet101_Weights.IMAGENET1K_V2
    for name in ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"):
        assert torchvision_weights(name) is VGG16_Weights.IMAGENET1K_V1
    resnet = tmp_path / "resnet101.pt"
    torch.save(ResNet101Backbone().state_dict(), resnet)
    state = load_backbone_weights(str(resnet), "fcn8s_resnet101", 8)
    assert "layer4.2.conv3.weight" in state
    with pytest.raises(BackboneWeightsError, match=r"resnet101.pt does not fit fcn32s"):
        load_backbone_weights(str(resnet), "fcn32s", 8)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(BackboneWeightsError, match="not a torch.save state_dict"):
        load_backbone_weights(str(junk), "fcn8s_resnet101", 8)


def _replica_worker(rank: int, world: int, port: int, broadcast: bool, out) -> None:
    import torch.distributed as dist

    from pipelines.training.distributed import (
        broadcast_buffers,
        check_replicas_agree,
        sum_over_ranks,
    )

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        torch.manual_seed(0)  # the same weights on both ranks, as DDP keeps them
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
        torch.manual_seed(10 + rank)  # each rank's own last training batch
        model(torch.randn(2, 3, 8, 8))  # updates this rank's running statistics
        if broadcast:
            broadcast_buffers(model)
        try:
            check_replicas_agree(model)
            out.put((rank, "agree", model[1].running_mean.tolist()))
        except RuntimeError as e:
            out.put((rank, "differ", str(e)))
        # Each rank's part of a validation split: rank r scored r + 2 frames, all class r.
        conf = torch.zeros(3, 3, dtype=torch.int64)
        conf[rank, rank] = 10 * (rank + 1)
        stats = torch.tensor([1.0, 2.0, rank + 2.0], dtype=torch.float64)
        by_rank = sum_over_ranks(conf, stats, torch.tensor(float(rank + 2)))
        out.put((rank, "sum", (conf.tolist(), stats.tolist(), by_rank)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("broadcast", [True, False])
def test_validation_replicas_agree_only_after_the_buffer_broadcast(broadcast):
    """Two gloo ranks whose BatchNorm statistics drifted apart in their last step: after
    broadcast_buffers every rank holds rank 0's, and check_replicas_agree (run before every
    validation) passes; without the broadcast it refuses to validate. Then the validation
    parts are summed over the ranks (confusion matrix, loss and frame counts)."""
    import torch.multiprocessing as mp

    from tests.support.helpers import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_replica_worker, args=(r, 2, port, broadcast, out)) for r in range(2)
    ]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    results = sorted(r for r in got if r[1] != "sum")
    # Both ranks end with the sum of both parts, and know who scored what.
    summed = ([[10, 0, 0], [0, 20, 0], [0, 0, 0]], [2.0, 4.0, 5.0], [2, 3])
    assert [r[2] for r in got if r[1] == "sum"] == [summed, summed]
    if broadcast:
        assert [r[1] for r in results] == ["agree", "agree"]
        assert results[0][2] == results[1][2]
    else:
        assert [r[1] for r in results] == ["differ", "differ"]
        assert "different weights or BatchNorm statistics" in results[0][2]


def test_a_resumed_run_sends_only_what_its_last_epoch_record_lacks(tmp_path, mlflow_store):
    """The worker sending epoch 0's record died after the metrics went out, halfway through
    the overlays (its node was lost with their PNG sent and their thumbnail not). The resumed
    run's catch-up, from the checkpoint, removes that half and sends the overlays whole; the
    metrics and the confusion matrix are not recorded twice; a second catch-up (another
    restart) changes nothing."""
    import mlflow
    from mlflow import MlflowClient

    conf = torch.tensor([[5, 1], [2, 7]])
    samples = [(np.full((8, 16, 3), 100, np.uint8), np.eye(8, 16, dtype=np.uint8))] * 2
    pictures = epoch_pictures(0, conf, samples)
    assert set(pictures) == {"confusion", "overlays"}
    metrics = {"epoch": 0, "val_miou": 0.25, "train_loss": 1.5}
    write_epoch_record(tmp_path, metrics, {"val_confusion": conf.tolist()}, pictures)
    record = read_epoch_record(tmp_path)
    assert record == (0, {"val_miou": 0.25, "train_loss": 1.5}, pictures)

    client = MlflowClient()
    run_id = client.create_run(mlflow.create_experiment("catch-up")).info.run_id
    sent = EpochLogger(mlflow_store, run_id, flush_s=30)
    sent.log_epoch(0, metrics, {"confusion": pictures["confusion"]})
    sent.close()
    # ... and it died halfway through the overlays: their PNG is there, the thumbnail is not.
    half = (
        tmp_path / "half" / f"overlays+step+0+timestamp+1+{'0' * 8}-0000-0000-0000-{'0' * 12}.png"
    )
    half.parent.mkdir()
    half.write_bytes(pictures["overlays"])
    client.log_artifact(run_id, str(half), "images")
    assert tracking.image_steps(client, run_id, "overlays") == set()  # half an image is none
    for _ in range(2):
        resumed = EpochLogger(mlflow_store, run_id, flush_s=30)
        resumed.catch_up(*record)
        resumed.close()
    for key in ("val_miou", "train_loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0], key
    # Each picture is one MLflow image at step 0 (PNG + thumbnail), sent once, as it was made;
    # the stray half is gone.
    files = sorted(a.path for a in client.list_artifacts(run_id, "images"))
    assert len(files) == 4, files
    assert f"images/{half.name}" not in files
    for key, data in pictures.items():
        [png] = [f for f in files if f.startswith(f"images/{key}+step+0+") and f.endswith(".png")]
        assert f"{png[:-4]}+compressed.webp" in files
        local = client.download_artifacts(run_id, png, str(tmp_path))
        assert np.array_equal(
            np.asarray(Image.open(local)), np.asarray(Image.open(io.BytesIO(data)))
        )
        assert tracking.image_steps(client, run_id, key) == {0}
    # A run that got nothing of the epoch gets all of it.
    empty = client.create_run(mlflow.get_experiment_by_name("catch-up").experiment_id)
    logger = EpochLogger(mlflow_store, empty.info.run_id, flush_s=30)
    logger.catch_up(*record)
    logger.close()
    assert client.get_metric_history(empty.info.run_id, "train_loss")[0].value == 1.5
    assert tracking.image_steps(client, empty.info.run_id, "overlays") == {0}


def test_a_store_that_refuses_deletes_still_gets_the_image(mlflow_store, monkeypatch, caplog):
    """Removing a stray half is best effort: where the artifact store refuses deletes (a
    bucket policy without DeleteObject), the image is still sent, once, with a warning;
    the logger's queue does not retry the refusal for ever."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    def refuse(*args, **kwargs):
        raise PermissionError("AccessDenied: s3:DeleteObject")

    monkeypatch.setattr(tracking, "remove_partial_images", refuse)
    client = MlflowClient()
    run_id = client.create_run(mlflow.create_experiment("refuses-deletes")).info.run_id
    conf = torch.tensor([[5, 1], [2, 7]])
    pictures = epoch_pictures(
        0, conf, [(np.full((8, 16, 3), 90, np.uint8), np.eye(8, 16, dtype=np.uint8))]
    )
    logger = EpochLogger(mlflow_store, run_id, flush_s=10)
    with caplog.at_level(logging.WARNING, logger="pipelines.training.record"):
        logger.log_epoch(0, {"val_miou": 0.5}, {"confusion": pictures["confusion"]})
        logger.close()
    assert tracking.image_steps(client, run_id, "confusion") == {0}
    assert any("could not remove the half of image confusion step 0" in r.message
               for r in caplog.records)  # fmt: skip


def test_progress_lines_give_rate_loss_and_etas(caplog):
    """Rank 0's line: a step that is due (every_s elapsed) or ends the epoch logs the step,
    images/s, the last loss and ETAs that count down from the steps left."""
    import logging

    p = StepLine(every_s=3600, steps_per_epoch=4, epochs=3, first_epoch=1)
    with caplog.at_level(logging.INFO, logger="pipelines.runtime.progress"):
        assert p.step(1, 1, 8, torch.tensor(0.5)) is None  # not due
        p.t_start -= 20  # the two steps took 20 s: 10 s a step, 16 images in 20 s
        p.t_last -= 20
        line = p.step(1, 2, 8, torch.tensor(0.25), end_of_epoch=True)
    # This process runs epochs 2 and 3 (8 steps); 2 are done: 2 left in the epoch (20 s),
    # 6 in the run (60 s).
    assert line == "epoch 2/3 step 2/4: 0.8 img/s, loss 0.2500, epoch ETA 0m20s, run ETA 1m00s"
    assert line in caplog.text
    p.every_s = 0
    assert "step 3/4" in p.step(1, 3, 8, torch.tensor(0.1))


def test_system_metrics_reach_the_run_and_restart_after_the_monitor_stopped(mlflow_store):
    """CPU and memory samples land in the run as system/ metrics; when MLflow's monitor
    thread has stopped (it does on any failed call to the tracking server), keep_alive
    starts a new one whose steps continue after the last."""
    import time

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = client.create_run(mlflow.create_experiment("system")).info.run_id
    system = SystemMetrics(mlflow_store, run_id, interval_s=0.2)
    key = "system/cpu_utilization_percentage"

    def steps() -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, key)]

    deadline = time.monotonic() + 30
    while len(steps()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (
        len(steps()) >= 2
        and "system/system_memory_usage_percentage" in client.get_run(run_id).data.metrics
    )
    system.keep_alive()  # alive: nothing new
    assert system.starts == 1
    # Stop the thread as a failed server call would.
    system.monitor._shutdown_event.set()
    system.monitor._process.join(timeout=10)
    before = max(steps())
    system.keep_alive()
    assert system.starts == 2
    deadline = time.monotonic() + 30
    while max(steps()) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    system.close()
    assert max(steps()) > before and len(steps()) == len(set(steps()))  # no step twice


def test_a_resume_allowed_to_change_hyperparameters_uses_the_new_ones():
    """--allow-config-change: the schedule's position and the momentum buffers come from the
    checkpoint, the learning rate, momentum and weight decay from the new recipe."""
    from pipelines.training.recipe import make_optimizer, make_recipe

    def run(lr: float, momentum: float):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        recipe = make_recipe("default", "fcn8s_resnet101", lr=lr, momentum=momentum)
        return model, *make_optimizer(model, recipe, total_steps=10)

    model, optimizer, scheduler = run(0.01, 0.9)
    for _ in range(4):
        model(torch.randn(2, 3, 5, 5)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": 0, "global_step": 4}  # fmt: skip
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    kept = run(0.05, 0.5)
    restore_train_state(state, kept[1], kept[2])
    assert kept[1].param_groups[0]["lr"] == pytest.approx(0.01 * 0.6**0.9)  # the run's own

    model, optimizer, scheduler = run(0.05, 0.5)
    assert restore_train_state(state, optimizer, scheduler, new_hyperparameters=True) == (1, 4)
    weights, biases = optimizer.param_groups[0], optimizer.param_groups[1]
    assert weights["lr"] == pytest.approx(0.05 * 0.6**0.9)  # step 4 of 10, poly 0.9
    assert biases["lr"] == pytest.approx(2 * 0.05 * 0.6**0.9)
    assert weights["momentum"] == 0.5
    assert scheduler.last_epoch == 4
    for p, before in zip(model.parameters(), buffers, strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], before)
    scheduler.step()
    assert weights["lr"] == pytest.approx(0.05 * 0.5**0.9)  # and it continues from there
