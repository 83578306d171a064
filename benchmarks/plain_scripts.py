"""The scripts a user would write instead of this project, the peers of
``benchmarks/bench_vs_plain.py``: plain PyTorch, no Ray, no MLflow; only the model
(``build_model``) and the label id map are the project's. They decode the raw frames as such
scripts do (PIL in DataLoader workers) and print one JSON line of timings.

    python -m benchmarks.plain_scripts label --frames DIR --weights model.pt --out out.parquet \\
        --size 512x192 --crop-top 690 --batch-size 4 [--workers 2] [--device cpu|cuda]
    python -m benchmarks.plain_scripts train --frames DIR --size 256x96 --crop-top 690 \\
        --batch-size 4 --epochs 3 [--procs 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fcn_models import build_model
from pipelines.core.labels import to_train_ids

N_CLASS = 8
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def _size(text: str) -> tuple[int, int]:
    return tuple(int(v) for v in text.split("x"))


class Frames(torch.utils.data.Dataset):
    """Raw JPEG frames (and, for training, their label PNGs) decoded at full size, cropped and
    resized: the usual map-style dataset."""

    def __init__(self, paths, size, crop_top, labels=None):
        self.paths, self.size, self.crop_top, self.labels = paths, size, crop_top, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        w, h = img.size
        x = np.asarray(img.crop((0, self.crop_top, w, h)).resize(self.size, Image.BILINEAR))
        out = {"image": torch.from_numpy(x.copy()), "index": i, "hw": torch.tensor([h, w])}
        if self.labels is not None:
            lbl = Image.open(self.labels[i])  # palette indices are the ids
            y = np.asarray(lbl.crop((0, self.crop_top, w, h)).resize(self.size, Image.NEAREST))
            out["label"] = torch.from_numpy(to_train_ids(y)[0].astype(np.int64))
        return out


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.permute(0, 3, 1, 2).float() - MEAN.to(x.device)) / STD.to(x.device)


def label(args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    paths = sorted(Path(args.frames).rglob("*.jpg"))
    model = build_model("fcn8s_resnet101", N_CLASS)
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.to(args.device).eval()
    loader = torch.utils.data.DataLoader(
        Frames(paths, _size(args.size), args.crop_top),
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    rows = {"image_id": [], "height": [], "width": [], "mask": []}
    t_first = None
    with torch.inference_mode():
        for batch in loader:
            if t_first is None:
                t_first = time.perf_counter()
            x = normalize(batch["image"].to(args.device))
            pred = model(x).argmax(1).to(torch.uint8).cpu().numpy()
            for m, i, (h, w) in zip(pred, batch["index"], batch["hw"].tolist(), strict=True):
                full = np.zeros((h, w), dtype=np.uint8)
                small = Image.fromarray(m)
                full[args.crop_top :] = np.asarray(
                    small.resize((w, h - args.crop_top), Image.NEAREST)
                )
                buf = io.BytesIO()
                Image.fromarray(full).save(buf, format="PNG")
                rows["image_id"].append(paths[int(i)].stem)
                rows["height"].append(h)
                rows["width"].append(w)
                rows["mask"].append(buf.getvalue())
    pq.write_table(pa.table(rows), args.out)
    end = time.perf_counter()
    return {"frames": len(paths), "seconds": end - t0, "after_first_batch_s": end - t_first}


def _train_worker(rank: int, world: int, args, result_file: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    images = sorted(Path(args.frames).rglob("*.jpg"))
    by_stem = {p.name.replace("_bin.png", ""): p for p in Path(args.frames).rglob("*_bin.png")}
    labels = [by_stem[p.stem] for p in images]
    data = Frames(images, _size(args.size), args.crop_top, labels)
    sampler = torch.utils.data.distributed.DistributedSampler(data, world, rank, seed=0)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size // world, sampler=sampler, num_workers=1,
        drop_last=True, persistent_workers=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model("fcn8s_resnet101", N_CLASS))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    torch.set_flush_denormal(True)
    per_epoch = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0, n = time.perf_counter(), 0
        for batch in loader:
            loss = loss_fn(model(normalize(batch["image"])), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(batch["image"])
        per_epoch.append(n * world / (time.perf_counter() - t0))
    if rank == 0:
        Path(result_file).write_text(json.dumps({"images_per_s_by_epoch": per_epoch}))
    dist.destroy_process_group()


def train(args) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_train_worker, args=(args.procs, args, f.name), nprocs=args.procs)
        return json.loads(Path(f.name).read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("label")
    lp.add_argument("--weights", required=True)
    lp.add_argument("--out", required=True)
    lp.add_argument("--workers", type=int, default=2)
    lp.add_argument("--device", default="cpu")
    tp = sub.add_parser("train")
    tp.add_argument("--epochs", type=int, default=3)
    tp.add_argument("--procs", type=int, default=2)
    for q in (lp, tp):
        q.add_argument("--frames", required=True)
        q.add_argument("--size", default="256x96")
        q.add_argument("--crop-top", type=int, default=690)
        q.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    print(json.dumps(label(args) if args.cmd == "label" else train(args)), flush=True)


if __name__ == "__main__":
    main()
