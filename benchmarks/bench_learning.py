"""What the training recipe learns: val mIoU per epoch of FCN-8s ResNet-101, the recipe as it was
before issue 11 against the one the training job runs now, on the same data from the same seed.

    python -m benchmarks.bench_learning [--device cpu|cuda] [--size 256x128] [--frames 48]
        [--epochs 5] [--batch-size 4] [--lr 0.02] [--seed 0] [--variants ...] [--out FILE]

The data are the demo's (``make demo``): synthetic drives, ingested by the pipeline's own
``process_pair`` (crop, resize, label ids) and split by drive as ``jobs.ingest`` splits them,
held in memory so that only the recipe differs between runs (no Ray: it also runs where Ray is
not installed). Every epoch decodes and augments the training frames with the pipeline's
``Augment``, trains, and scores the validation split in eval mode.

Variants, each adding one change to the one before:

- ``before``: frames in ``image_id`` order (consecutive frames of one camera per batch),
  every parameter in one SGD group with weight decay, upsamplers trained, skips fused with
  the old even-kernel upsamplers (3.5 / 7.5 / 15.5 px off at the output);
- ``shuffle``: a new random order every epoch, from ``--seed`` and the epoch;
- ``groups``: the reference parameter groups (upsamplers fixed, biases 2x lr without decay,
  no decay on normalization parameters);
- ``after``: and the centre-aligned skip fusion: the training job's recipe today.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import add_device_arg, device_name, emit, parse_device
from fcn_models import FCN8sResNet101, bilinear_upsampling, build_model
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.core.labels import N_CLASSES
from pipelines.core.metrics import confusion_matrix, scores
from pipelines.data.decode import decode_batch
from pipelines.data.discover import discover, split_drives
from pipelines.data.ingest import process_pair
from pipelines.data.synthetic import write_tree
from pipelines.storage import resolve
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.recipe import make_loss, make_optimizer, make_recipe, set_trainable
from pipelines.training.step import epoch_seed, train_step

VARIANTS = ("before", "shuffle", "groups", "after")


class LegacyFCN8sResNet101(FCN8sResNet101):
    """The model as it was before the aligned fusion: k4 s2 p1, k4 s2 p1, k16 s8 p4."""

    def __init__(self, n_class: int) -> None:
        super().__init__(n_class)
        self.upscore2 = bilinear_upsampling(n_class, 2, padding=1)
        self.upscore_layer3 = bilinear_upsampling(n_class, 2, padding=1)
        self.upscore8 = bilinear_upsampling(n_class, 8, padding=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 32, 0, -h % 32))
        c2, c3, c4 = self.backbone(x)
        fused = self.upscore2(self.score_layer4(self.norm_layer4(c4)))
        fused = self.upscore_layer3(fused + self.score_layer3(self.norm_layer3(c3)))
        fused = fused + self.score_layer2(self.norm_layer2(c2))
        return self.upscore8(fused)[:, :, :h, :w]


def demo_data(root: Path, frames: int, frame_size: tuple[int, int]) -> None:
    """The demo's labeled drive: ``frames`` frames in four chunks of four records each."""
    step = max(1, frames // 4)
    for start in range(0, frames, step):
        write_tree(root, min(step, frames - start), records=4, width=frame_size[0],
                   height=frame_size[1], seed=start, road="road02")  # fmt: skip


def ingest_in_memory(root: Path, transform: FrameTransform, val_fraction: float, seed: int):
    """(train rows, val rows) of encoded frames, as ``jobs.ingest`` would shard them; train
    rows in ``image_id`` order."""
    found = discover(str(root))
    splits = split_drives((c.drive for c in found.candidates), val_fraction, seed)
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for c in sorted(found.candidates, key=lambda c: c.image_id):
        if c.image and c.label:
            row = process_pair(
                resolve(c.image).read_bytes(), resolve(c.label).read_bytes(), transform
            )
            rows[splits[c.drive]].append({"image_id": c.image_id, **row})
    return rows["train"], rows["val"]


def batches(rows: list[dict], size: int, transform, device, augment, generator):
    """Decoded as the job's Ray Data stage decodes, augmented on the device as its step does."""
    for i in range(0, len(rows) - size + 1, size):  # drop_last, as the job
        chunk = rows[i : i + size]
        out = decode_batch(
            {k: np.array([r[k] for r in chunk], dtype=object) for k in ("image", "label")}
        )
        image = torch.from_numpy(out["image"]).to(device)
        label = torch.from_numpy(out["label"]).to(device)
        if augment is not None:
            b = augment_batch({"image": image, "label": label}, augment, transform, generator)
            yield b["image"], b["label"]
        else:
            yield transform.normalize(image), label.long()


def run(variant: str, train_rows, val_rows, args, transform, device) -> list[float]:
    """Val mIoU after each epoch."""
    torch.manual_seed(args.seed)
    model = (LegacyFCN8sResNet101 if variant != "after" else FCN8sResNet101)(N_CLASSES)
    model = model.to(device)
    if variant == "after":
        assert type(model) is type(build_model("fcn8s_resnet101", N_CLASSES))
    steps = (len(train_rows) // args.batch_size) * args.epochs
    recipe = make_recipe("default", "fcn8s_resnet101", lr=args.lr)
    if variant in ("groups", "after"):
        set_trainable(model, learn_upsampling=False)
        optimizer, scheduler = make_optimizer(model, recipe, steps)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: max(0.0, 1 - s / steps) ** recipe.poly_power
        )
    criterion = make_loss(recipe)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    curve = []
    for epoch in range(args.epochs):
        seed = epoch_seed(args.seed, epoch)
        rng = np.random.default_rng(seed)
        order = train_rows
        if variant != "before":
            order = [train_rows[i] for i in rng.permutation(len(train_rows))]
        model.train()
        gen = step_generator(device, seed)
        for x, y in batches(order, args.batch_size, transform, device, Augment(), gen):
            train_step(model, {"image": x, "label": y}, criterion, optimizer, autocast)
            scheduler.step()
        model.eval()
        conf = torch.zeros(N_CLASSES, N_CLASSES, dtype=torch.int64, device=device)
        with torch.no_grad(), autocast:
            for x, y in batches(val_rows, 1, transform, device, None, None):
                conf += confusion_matrix(model(x).argmax(1), y, N_CLASSES)
        curve.append(scores(conf.cpu().numpy())["miou"])
        print(f"  {variant:8s} epoch {epoch + 1}: val mIoU {curve[-1]:.3f}", flush=True)
    return curve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--size", type=parse_size, default=(256, 128), help="model input WxH")
    p.add_argument("--frame-size", type=parse_size, default=(846, 428), help="source frames WxH")
    p.add_argument("--crop-top", type=int, default=172, help="sky rows cut from each frame")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02, help="the demo's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = parse_device(p, args)
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")

    transform = FrameTransform(width=args.size[0], height=args.size[1], crop_top=args.crop_top)
    torch.set_flush_denormal(True)  # as the training loop does (10x on CPU)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        demo_data(Path(tmp), args.frames, args.frame_size)
        train_rows, val_rows = ingest_in_memory(Path(tmp), transform, 0.25, args.seed)
    print(f"data: {len(train_rows)} train, {len(val_rows)} val frames "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if len(train_rows) < args.batch_size or not val_rows:
        p.error(f"--frames {args.frames}: too few frames for a batch and a validation split")
    curves = {}
    for v in variants:
        t = time.perf_counter()
        curves[v] = run(v, train_rows, val_rows, args, transform, device)
        print(f"  {v}: {time.perf_counter() - t:.0f} s", flush=True)

    w, h = args.size
    caption = (
        f"FCN-8s ResNet-101 from scratch, {w}x{h}, batch {args.batch_size}, lr {args.lr:g}, "
        f"{len(train_rows)} train / {len(val_rows)} val frames (the demo's synthetic drives), "
        f"seed {args.seed}; {device.type} ({device_name(device)}), torch {torch.__version__}. "
        f"Val mIoU after each epoch."
    )
    rows = [
        (epoch + 1, *(f"{curves[v][epoch]:.3f}" for v in variants)) for epoch in range(args.epochs)
    ]
    if "before" in curves and "after" in curves:
        rows.append(("gain after - before, last epoch",
                     *(f"{curves[v][-1] - curves['before'][-1]:+.3f}" for v in variants)))  # fmt: skip
    emit(caption, rows, args.out, header=("epoch", *variants))


if __name__ == "__main__":
    main()
