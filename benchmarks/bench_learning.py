"""What the training recipe learns: val mIoU per epoch of the training job's model and recipe
on the demo's data, trained and scored by the training engine, from one or more seeds.

    python -m benchmarks.bench_learning [--device cpu|cuda] [--model fcn8s_resnet101]
        [--size 256x128] [--frame-size 846x428] [--crop-top 172] [--frames 48] [--epochs 5]
        [--batch-size 4] [--lr 0.02] [--seeds 0] [--out FILE]

The demo's synthetic drives (``make demo``), converted by the pipeline's ``process_pair`` and
split by drive as ``jobs.ingest`` does, are held decoded on the device (no Ray, so it runs on
the lent GPU machines too); each epoch is what a training worker does with its shard, through
``pipelines.training.engine``. The curves before issue 11's recipe are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import add_device_arg, device_name, emit, parse_device
from fcn_models import MODEL_NAMES
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.core.labels import N_CLASSES
from pipelines.core.metrics import scores
from pipelines.data.decode import decode_batch
from pipelines.data.discover import discover, split_drives
from pipelines.data.ingest import process_pair
from pipelines.data.synthetic import write_tree
from pipelines.storage import resolve
from pipelines.training import engine
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.recipe import make_recipe

Frames = dict[str, torch.Tensor]


# -- the demo's data, in memory (also bench_fcn_table's) -----------------------------------------
def seed_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def demo_parser(doc: str, *, size: tuple[int, int], frames: int, batch_size: int,
                seeds: str) -> argparse.ArgumentParser:  # fmt: skip
    """The flags of a run on the demo's data, this benchmark's and bench_fcn_table's."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--size", type=parse_size, default=size, help="model input WxH")
    p.add_argument("--frame-size", type=parse_size, default=(846, 428), help="source frames WxH")
    p.add_argument("--crop-top", type=int, default=172, help="sky rows cut from each frame")
    p.add_argument("--frames", type=int, default=frames)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seeds", type=seed_list, default=seeds, help="comma list")
    p.add_argument("--out", type=Path)
    return p


def load_demo(args: argparse.Namespace, transform: FrameTransform,
              device: torch.device) -> tuple[Frames, Frames]:  # fmt: skip
    """(train, val) frames of the demo's drive (``args.frames`` frames in four chunks of four
    records each; a quarter of the chunks held out as ``jobs.ingest`` splits drives), decoded
    once as the job decodes them (``decode_batch``) and held on the device: uint8 ``image``
    (N, H, W, 3) and ``label`` (N, H, W)."""
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    with tempfile.TemporaryDirectory() as tmp:
        step = max(1, args.frames // 4)
        for start in range(0, args.frames, step):
            write_tree(Path(tmp), min(step, args.frames - start), records=4, seed=start,
                       width=args.frame_size[0], height=args.frame_size[1], road="road02")  # fmt: skip
        found = discover(tmp)
        split = split_drives((c.drive for c in found.candidates), 0.25, 0)
        for c in sorted(found.candidates, key=lambda c: c.image_id):
            if c.image and c.label:
                pair = (resolve(c.image).read_bytes(), resolve(c.label).read_bytes())
                rows[split[c.drive]].append(process_pair(*pair, transform))
    print(f"data: {len(rows['train'])} train, {len(rows['val'])} val frames", flush=True)
    if len(rows["train"]) < args.batch_size or not rows["val"]:
        raise SystemExit(f"--frames {args.frames}: too few frames for a batch and a val split")
    keys = ("image", "label")
    out = [decode_batch({k: np.array([r[k] for r in part], dtype=object) for k in keys})
           for part in (rows["train"], rows["val"])]  # fmt: skip
    return tuple({k: torch.from_numpy(d[k]).to(device) for k in keys} for d in out)


def epoch_batches(frames: Frames, size: int, seed: int) -> Iterator[Frames]:
    """One epoch of raw batches in an order drawn from ``seed``; the last partial batch is
    dropped, as the job does."""
    n = len(frames["label"])
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n)).to(frames["label"].device)
    for i in range(0, n - size + 1, size):
        yield {k: v[order[i : i + size]] for k, v in frames.items()}


def val_conf(
    state: engine.TrainState, frames: Frames, args, transform: FrameTransform
) -> np.ndarray:
    """The confusion matrix of the validation split (``engine.evaluate``), in batches of
    normalized images and int64 labels."""
    n, b = len(frames["label"]), args.batch_size
    batches = (
        {"image": transform.normalize(frames["image"][i : i + b]), "label": frames["label"][i : i + b].long()}
        for i in range(0, n, b)
    )  # fmt: skip
    return engine.evaluate(state.model, batches, N_CLASSES, autocast=state.autocast).cpu().numpy()


def fit(state: engine.TrainState, frames: Frames, steps: int, args, transform: FrameTransform,
        seed: int, *, on_step: Callable | None = None,
        after_epoch: Callable[[], None] | None = None) -> None:  # fmt: skip
    """``steps`` engine steps as the training job takes them: epoch after epoch of ``seed``'s
    batches (the last epoch cut short), augmented on the device, dropout reseeded per epoch."""
    epoch = 0
    while state.global_step < steps:
        s = engine.epoch_seed(seed, epoch)
        torch.manual_seed(s)  # dropout (VGG FCNs), as the loop does
        batches = itertools.islice(epoch_batches(frames, args.batch_size, s),
                                   steps - state.global_step)  # fmt: skip
        gen = step_generator(state.device, s)  # the epoch's own augmentation stream
        engine.train_one_epoch(state, batches, on_step=on_step,
                               augment=lambda b, g=gen: augment_batch(b, Augment(), transform, g))  # fmt: skip
        if after_epoch is not None:
            after_epoch()
        epoch += 1


# -- the curve --------------------------------------------------------------------------------------
def curve(args, seed: int, train: Frames, val: Frames, transform, device) -> list[float]:
    """Val mIoU after each epoch of one run from ``seed``."""
    steps = len(train["label"]) // args.batch_size * args.epochs
    state = engine.build_train_state(
        engine.build_model(args.model, N_CLASSES, seed=seed),
        make_recipe("default", args.model, lr=args.lr), total_steps=steps, device=device,
        amp=device.type == "cuda",
    )  # fmt: skip
    out: list[float] = []

    def score() -> None:
        out.append(scores(val_conf(state, val, args, transform))["miou"])
        print(f"  seed {seed} epoch {len(out)}: val mIoU {out[-1]:.3f}", flush=True)

    fit(state, train, steps, args, transform, seed, after_epoch=score)
    return out


def main(argv: list[str] | None = None) -> None:
    p = demo_parser(__doc__, size=(256, 128), frames=48, batch_size=4, seeds="0")
    p.add_argument("--model", choices=MODEL_NAMES, default="fcn8s_resnet101")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.02, help="the demo's")
    args = p.parse_args(argv)
    device, seeds = parse_device(p, args), args.seeds
    transform = FrameTransform(width=args.size[0], height=args.size[1], crop_top=args.crop_top)
    torch.set_flush_denormal(True)  # as the training loop does (10x on CPU)
    train, val = load_demo(args, transform, device)
    curves = [curve(args, seed, train, val, transform, device) for seed in seeds]

    w, h = args.size
    caption = (
        f"{args.model} from scratch, {w}x{h}, batch {args.batch_size}, lr {args.lr:g}, "
        f"{len(train['label'])} train / {len(val['label'])} val frames (the demo's synthetic "
        f"drives); {device.type} ({device_name(device)}), torch {torch.__version__}"
        f"{', bf16 autocast' if device.type == 'cuda' else ''}. Val mIoU after each epoch."
    )
    mean = [np.mean(curves, axis=0).tolist()] if len(curves) > 1 else []
    rows = [(e + 1, *(f"{c[e]:.3f}" for c in curves + mean)) for e in range(args.epochs)]
    header = ("epoch", *(f"seed {s}" for s in seeds), *(["mean"] if mean else []))
    emit(caption, rows, args.out, header=header)


if __name__ == "__main__":
    main()
