"""Where a labeled frame's time goes, stage by stage, and how many CPU cores keep one GPU busy.
Only PyTorch, torchvision, numpy, Pillow and pyarrow: it runs on the lent GPU machines too.

    python -m benchmarks.bench_label_stages [--device cpu|cuda] [--frames 16]
        [--frame-size 3384x1710] [--size 1024x384] [--batch-size 8] [--repeats 3] [--compile]
        [--out FILE]

The job's own CPU stages (:mod:`pipelines.labeling.stages`) per frame on one thread, a Ray Data
task's: load (CPU path: 1/2 JPEG decode, crop/resize; GPU path: header check), encode, Parquet
write. The model: forward only, the actor's call with and without the per-frame scores, on
CUDA its nvJPEG GPU path. The last line, for scripts: ``cpu ms per frame, gpu path: X``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import add_device_arg, device_name, emit, forward_rate, parse_device, rate
from fcn_models import build_model
from pipelines.core import labels
from pipelines.core.codecs import encode_jpeg
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.data.sources import Limits
from pipelines.data.synthetic import render_frame
from pipelines.inference.model_dir import ModelSpec
from pipelines.inference.predictor import Predictor
from pipelines.labeling.schema import SCORE_NAMES
from pipelines.labeling.stages import encode_results, load_frames
from pipelines.storage import resolve

MODEL = "fcn8s_resnet101"


def ms_per_frame(fn: Callable[[], object], frames: int, repeats: int) -> float:
    """Median over ``repeats`` calls (after one warm-up: codec tables, allocator) of the ms per
    frame of ``fn``, which handles ``frames`` frames."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000 / frames)
    return statistics.median(runs)


def cpu_stages(datas: list[bytes], mask: np.ndarray, t: FrameTransform,
               repeats: int) -> dict[str, float]:  # fmt: skip
    """ms/frame of the job's CPU stages on frames in a local folder: load (either path),
    encode (``mask`` as every frame's small mask, the scores as the actor gives them), write."""
    n = len(datas)
    with tempfile.TemporaryDirectory() as tmp:
        names = [str(Path(tmp) / f"{i:04d}.jpg") for i in range(n)]
        for name, data in zip(names, datas, strict=True):
            Path(name).write_bytes(data)
        batch = {"image_id": np.array(names, dtype=object), "source": np.array(names, dtype=object),
                 "bytes": np.array([len(d) for d in datas])}  # fmt: skip
        anchor, limits = resolve(tmp), Limits()

        def load(device_decode: bool) -> dict:
            return load_frames(batch, kind="frames", transform=t, anchor=anchor, limits=limits,
                               device_decode=device_decode)  # fmt: skip

        loaded = load(True)
        assert all(len(e) for e in loaded["encoded"]), "the GPU path's load decoded a JPEG"
        out = {k: v for k, v in loaded.items() if k not in ("prepared", "encoded")}
        out["small_mask"] = np.stack([mask] * n)
        out.update({k: np.full(n, 0.9, np.float32) for k in SCORE_NAMES})

        def encode():
            return encode_results(out, kind="frames", transform=t, model_name="m",
                                  model_version="1", apollo=False,
                                  labeled_at=datetime.now(timezone.utc))  # fmt: skip

        rows = encode()
        assert rows["status"].to_pylist() == ["ok"] * n
        fh, fw = int(loaded["height"][0]), int(loaded["width"][0])
        timed = {
            "load, CPU path (read, 1/2 decode, crop/resize)": lambda: load(False),
            "load, GPU path (read, check JPEG header)": lambda: load(True),
            f"encode (mask PNG {fw}x{fh} from the small mask, counts, row)": encode,
            "Parquet write": lambda: pq.write_table(rows, Path(tmp) / "out.parquet"),
        }
        return {k: ms_per_frame(fn, n, repeats) for k, fn in timed.items()}


def model_rows(
    args, t: FrameTransform, datas: list[bytes], device: torch.device
) -> tuple[list[tuple[str, str]], float]:
    """(measure, value) rows of the model side, and the best forward rate (images/s): forward
    only, the labeling actor's call on prepared frames without and with the per-frame scores,
    torch.compile's forward (``--compile``), the actor's GPU path (nvJPEG) on CUDA."""
    model, b, cuda = build_model(MODEL, labels.N_CLASSES), args.batch_size, device.type == "cuda"
    steps = 20 if cuda else 2
    fwd = forward_rate(model, args.size, b, device, steps=steps)
    predictor = Predictor(model, ModelSpec(MODEL, labels.N_CLASSES, t), device, max_batch=b)
    x = np.random.default_rng(1).integers(0, 256, (b, t.height, t.width, 3), np.uint8)
    masks = rate(lambda: predictor.predict_prepared(x), b, steps, device)
    scored = rate(lambda: predictor.predict_scored(x), b, steps, device)
    rows = [(f"forward only, batch {b}, images/s", f"{fwd:.2f}"),
            (f"labeling actor, batch {b}: masks only / masks + scores (confidence, novelty), "
             "images/s", f"{masks:.2f} / {scored:.2f} ({scored / masks:.2f}x)")]  # fmt: skip
    best = fwd
    if args.compile:
        label = f"forward only, torch.compile, batch {b}, images/s"
        try:
            compiled = forward_rate(model, args.size, b, device, steps=steps, compile_=True)
            rows.append((label, f"{compiled:.2f} ({compiled / fwd:.2f}x)"))
            best = max(best, compiled)
        except Exception as e:  # an inductor bug must not lose the other rows
            rows.append((label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    if cuda:
        label = f"labeling actor, GPU path, batch {b}: nvJPEG decode + crop/resize / whole call"
        chunks = [datas[i : i + b] for i in range(0, len(datas), b)]
        try:  # what the job calls: JPEG bytes in, masks and scores out
            n = len(datas)
            nvjpeg = rate(lambda: [predictor.prepare_encoded(c) for c in chunks], n, 1, device)
            whole = rate(lambda: [predictor.predict_scored(predictor.prepare_encoded(c)[0])
                                  for c in chunks], n, 1, device)  # fmt: skip
            value = f"{nvjpeg:.1f} / {whole:.1f} ({whole / fwd:.2f} of forward only)"
            rows.append((f"{label}, frames/s", value))
        except Exception as e:  # a torchvision built without nvJPEG
            rows.append((label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    return rows, best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--frames", type=int, default=16, help="synthetic frames")
    p.add_argument("--frame-size", type=parse_size, default=(3384, 1710))
    p.add_argument("--size", type=parse_size, default=(1024, 384), help="model input WxH")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile's forward")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = parse_device(p, args)
    torch.set_num_threads(1)  # a Ray Data CPU task's one thread (and the CPU forward's)

    (fw, fh), (w, h) = args.frame_size, args.size
    t = FrameTransform(width=w, height=h, crop_top=round(fh * 690 / 1710))
    rng = np.random.default_rng(0)
    # A few distinct frames, repeated: rendering 3384x1710 frames costs more than decoding.
    distinct = [render_frame(rng, fw, fh)[0] for _ in range(min(args.frames, 4))]
    datas = [encode_jpeg(distinct[i % len(distinct)], quality=90) for i in range(args.frames)]
    # A mask the model could give (few lane pixels, as PNG compresses it): a synthetic label.
    mask = labels.to_train_ids(t.prepare_label(render_frame(rng, fw, fh)[1]))[0]
    mask[mask == labels.IGNORE_INDEX] = 0

    stages = cpu_stages(datas, mask, t, args.repeats)
    rows, best_fwd = model_rows(args, t, datas, device)
    rows += [(f"CPU stage: {k}, ms/frame", f"{v:.2f}") for k, v in stages.items()]
    load_cpu, load_gpu, encode, write = stages.values()  # in cpu_stages' order
    per_path = {"CPU": load_cpu + encode + write, "GPU": load_gpu + encode + write}
    rows += [(f"CPU threads to keep one model replica busy, {path} path",
              f"{best_fwd * v / 1000:.1f}") for path, v in per_path.items()]  # fmt: skip
    cuda = device.type == "cuda"
    caption = (
        f"Labeling stages, {args.frames} synthetic frames {fw}x{fh} (JPEG q90) -> model input "
        f"{w}x{h}; CPU stages on 1 thread; model FCN-8s ResNet-101 on {device.type} "
        f"({device_name(device)}{', bf16 + channels_last' if cuda else ', 1 thread'}), "
        f"torch {torch.__version__}, zlib {zlib.ZLIB_VERSION}"
    )
    emit(caption, rows, args.out)
    # The figure a script reads: one 3384x1710 frame's CPU cost when the model stage decodes.
    print(f"cpu ms per frame, gpu path: {per_path['GPU']:.2f}")


if __name__ == "__main__":
    main()
