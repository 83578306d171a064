"""Where a labeled frame's time goes, stage by stage, before and after issue 15's changes, and
how many CPU cores keep one GPU busy. Needs only PyTorch, torchvision, numpy and Pillow (no
Ray, no MLflow), so it runs on the lent GPU machines as well as here.

    python -m benchmarks.bench_label_stages [--device cpu|cuda] [--frames 16]
        [--frame-size 3384x1710] [--size 1024x384] [--batch-size 8] [--compile] [--out FILE]

Per frame, on one CPU thread (what one Ray Data CPU task gets), median of ``--repeats``:

- *decode + crop/resize*: before, the full decode then :meth:`FrameTransform.prepare_image`;
  after, :meth:`FrameTransform.load_image` (JPEG decoded at 1/2 where that covers the input);
- *write-back*: the mask restored to the frame size, PNG-encoded and its class pixels counted;
  before, zlib's default strategy and a count of the full-size mask; after, run-length
  strategy and the count from the small mask (:meth:`FrameTransform.restored_pixel_counts`);
  now, the PNG written from the small mask's rows (:meth:`FrameTransform.restored_png`);
- the GPU path's CPU stages (the job's load and encode stages with the model actor decoding,
  and the Parquet write): the last line, ``cpu ms per frame, gpu path: X``;
- on CUDA: the actor's device decode (nvJPEG through ``torchvision.io.decode_jpeg``, crop +
  resize on the GPU: :meth:`Predictor.prepare_encoded`) and its whole GPU-path call;
- the model's forward pass alone at ``--batch-size`` (bf16 autocast + channels_last on CUDA),
  with ``torch.compile`` as well when ``--compile``;
- the labeling actor's call (:class:`Predictor`) with and without the per-frame scores
  (softmax statistics, BatchNorm novelty): what ``confidence`` and ``novelty`` cost.

The last rows divide: CPU cores one model replica needs so that decode and write-back keep up
with its forward pass.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import add_device_arg, device_name, emit, parse_device, synchronize
from fcn_models import build_model
from pipelines.core import labels
from pipelines.core.codecs import decode_rgb, encode_jpeg, encode_png
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.data.synthetic import render_frame
from pipelines.inference.model_dir import ModelSpec
from pipelines.inference.predictor import Predictor


def per_item_ms(fn, items, repeats: int) -> float:
    """Median over ``repeats`` passes of the mean ms per item."""
    fn(items[0])  # warm-up: codec tables, allocator
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        runs.append((time.perf_counter() - t0) * 1000 / len(items))
    return statistics.median(runs)


def png_before(mask: np.ndarray) -> bytes:
    """encode_png as it was before issue 15: zlib level 1, default strategy."""
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def forward_rate(model, size, batch, device, *, compile_: bool, steps: int = 20) -> float:
    w, h = size
    cuda = device.type == "cuda"
    net = model.to(device).eval()
    x = torch.randn(batch, 3, h, w, device=device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile_:
        net = torch.compile(net)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for _ in range(3):  # warm-up (and compilation)
            net(x).argmax(1)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            net(x).argmax(1)
        synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def predictor_rates(
    model, t: FrameTransform, batch: int, device, steps: int
) -> tuple[float, float]:
    """The labeling actor's call, images/s: masks only (``predict_prepared``) and masks with
    the per-frame scores (``predict_scored``: softmax statistics and novelty)."""
    predictor = Predictor(model, ModelSpec("fcn8s_resnet101", labels.N_CLASSES, t), device)
    x = np.random.default_rng(1).integers(0, 256, (batch, t.height, t.width, 3), np.uint8)

    def rate(fn) -> float:
        fn(x)  # warm-up; both return host arrays, so each call ends synchronised
        t0 = time.perf_counter()
        for _ in range(steps):
            fn(x)
        return batch * steps / (time.perf_counter() - t0)

    return rate(predictor.predict_prepared), rate(predictor.predict_scored)


def gpu_decode_rate(predictor: Predictor, datas: list[bytes], batch: int, repeats: int) -> float:
    """Frames/s of the labeling actor's device decode: nvJPEG on ``batch`` frames at a time,
    crop + resize on the GPU (:meth:`Predictor.prepare_encoded`, what the job calls)."""
    chunks = [datas[i : i + batch] for i in range(0, len(datas), batch)]
    predictor.prepare_encoded(chunks[0])
    torch.cuda.synchronize()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in chunks:
            predictor.prepare_encoded(c)
        torch.cuda.synchronize()
        best.append(len(datas) / (time.perf_counter() - t0))
    return statistics.median(best)


def gpu_path_actor_rate(predictor: Predictor, datas: list[bytes], batch: int) -> float:
    """Frames/s of the GPU path's whole actor call: JPEG bytes in, masks and scores out."""
    chunks = [datas[i : i + batch] for i in range(0, len(datas), batch)]

    def call(c):
        x, _ = predictor.prepare_encoded(c)
        return predictor.predict_scored(x)

    call(chunks[0])
    t0 = time.perf_counter()
    for c in chunks:
        call(c)
    return len(datas) / (time.perf_counter() - t0)


def gpu_path_cpu_ms(
    datas: list[bytes], mask: np.ndarray, t: FrameTransform, repeats: int
) -> dict[str, float]:
    """What the CPU still does per frame when the model actor decodes on the GPU, with the
    job's own stage functions on one thread: the load stage (read the file, check the JPEG
    header), the encode stage (the mask PNG at the frame's size and the class counts from
    the small mask, the output row), and the Parquet write of those rows."""
    import tempfile

    import pyarrow.parquet as pq

    from pipelines.data.sources import Limits
    from pipelines.labeling.schema import SCORE_NAMES
    from pipelines.labeling.stages import encode_results, load_frames
    from pipelines.storage import resolve

    n = len(datas)
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, d in enumerate(datas):
            path = Path(tmp) / f"{i:04d}.jpg"
            path.write_bytes(d)
            names.append(str(path))
        batch = {"image_id": np.array(names, dtype=object), "source": np.array(names, dtype=object),
                 "bytes": np.array([len(d) for d in datas])}  # fmt: skip
        anchor, limits = resolve(tmp), Limits()

        def load():
            return load_frames(batch, kind="frames", transform=t, anchor=anchor, limits=limits,
                               device_decode=True)  # fmt: skip

        loaded = load()
        assert all(len(e) for e in loaded["encoded"]), "the load stage decoded a JPEG"
        fh, fw = int(loaded["height"][0]), int(loaded["width"][0])
        out = {k: v for k, v in loaded.items() if k not in ("prepared", "encoded")}
        out["small_mask"] = np.stack([mask] * n)
        out.update({k: np.full(n, 0.9, np.float32) for k in SCORE_NAMES})
        from datetime import datetime, timezone

        def encode():
            return encode_results(out, kind="frames", transform=t, model_name="m",
                                  model_version="1", apollo=False,
                                  labeled_at=datetime.now(timezone.utc))  # fmt: skip

        table = encode()
        assert table["status"].to_pylist() == ["ok"] * n

        def write():
            pq.write_table(table, Path(tmp) / "out.parquet")

        def per_frame(fn) -> float:
            fn()
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - t0) * 1000 / n)
            return statistics.median(runs)

        got = {"load (read file, check JPEG header)": per_frame(load),
               f"encode (mask PNG {fw}x{fh} from the small mask, counts, row)": per_frame(encode),
               "Parquet write": per_frame(write)}  # fmt: skip
    return got


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--frames", type=int, default=16, help="distinct synthetic frames")
    p.add_argument("--frame-size", type=parse_size, default=(3384, 1710))
    p.add_argument("--size", type=parse_size, default=(1024, 384), help="model input WxH")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile's forward")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = parse_device(p, args)
    torch.set_num_threads(1)  # a Ray Data CPU task's one thread (and the CPU forward's)

    fw, fh = args.frame_size
    t = FrameTransform(width=args.size[0], height=args.size[1], crop_top=round(fh * 690 / 1710))
    rng = np.random.default_rng(0)
    # A few distinct frames, repeated: rendering 3384x1710 frames costs more than decoding.
    distinct = [render_frame(rng, fw, fh)[0] for _ in range(min(args.frames, 4))]
    datas = [encode_jpeg(distinct[i % len(distinct)], quality=90) for i in range(args.frames)]
    small = [t.load_image(d)[0] for d in datas]
    # Masks the model could give: the frame's own lanes would do, random ids are the worst case
    # for PNG; use a realistic one (few lane pixels), from the synthetic label.
    _, apollo = render_frame(rng, fw, fh)
    mask = labels.to_train_ids(t.prepare_label(apollo))[0]
    mask[mask == labels.IGNORE_INDEX] = 0

    dec_before = per_item_ms(lambda d: t.prepare_image(decode_rgb(d)), datas, args.repeats)
    dec_after = per_item_ms(lambda d: t.load_image(d), datas, args.repeats)

    def wb_before(m):
        full = t.restore_mask(m, (fh, fw))
        return png_before(full), labels.class_pixel_counts(full)

    def wb_rle(m):
        full = t.restore_mask(m, (fh, fw))
        return encode_png(full), t.restored_pixel_counts(m, (fh, fw))

    def wb_after(m):  # what encode_results does: never builds the full-size mask
        return t.restored_png(m, (fh, fw)), t.restored_pixel_counts(m, (fh, fw))

    masks = [mask] * len(datas)
    wb_b = per_item_ms(wb_before, masks, args.repeats)
    wb_r = per_item_ms(wb_rle, masks, args.repeats)
    wb_a = per_item_ms(wb_after, masks, args.repeats)
    png_kb = (len(png_before(t.restore_mask(mask, (fh, fw)))) / 1024,
              len(encode_png(t.restore_mask(mask, (fh, fw)))) / 1024,
              len(t.restored_png(mask, (fh, fw))) / 1024)  # fmt: skip
    assert t.restored_pixel_counts(mask, (fh, fw)) == labels.class_pixel_counts(
        t.restore_mask(mask, (fh, fw))
    )
    del small

    model = build_model("fcn8s_resnet101", labels.N_CLASSES)
    steps = 20 if device.type == "cuda" else 2
    fwd = forward_rate(model, args.size, args.batch_size, device, compile_=False, steps=steps)
    masks_only, with_scores = predictor_rates(model, t, args.batch_size, device, steps)
    fwd_c, compile_error = None, ""
    if args.compile:
        try:
            fwd_c = forward_rate(model, args.size, args.batch_size, device, compile_=True,
                                 steps=steps)  # fmt: skip
        except Exception as e:  # an inductor bug must not lose the other rows
            compile_error = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    nvjpeg, nvjpeg_error, gpu_actor = None, "", None
    if device.type == "cuda":
        gpu_predictor = Predictor(model, ModelSpec("fcn8s_resnet101", labels.N_CLASSES, t), device,
                                  max_batch=args.batch_size)  # fmt: skip
        try:
            nvjpeg = gpu_decode_rate(gpu_predictor, datas, args.batch_size, args.repeats)
            gpu_actor = gpu_path_actor_rate(gpu_predictor, datas, args.batch_size)
        except Exception as e:  # a torchvision built without nvJPEG
            nvjpeg_error = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    gpu_path = gpu_path_cpu_ms(datas, mask, t, args.repeats)
    gpu_path_total = sum(gpu_path.values())

    best_fwd = max(fwd, fwd_c or 0.0)
    cores_b = best_fwd * (dec_before + wb_b) / 1000
    cores_a = best_fwd * (dec_after + wb_a) / 1000
    w, h = args.size
    rows = [
        ("decode + crop/resize, before (full decode), ms/frame", f"{dec_before:.1f}"),
        ("decode + crop/resize, after (load_image, 1/2 decode), ms/frame", f"{dec_after:.1f}"),
        ("  speed-up", f"{dec_before / dec_after:.2f}x"),
        ("write-back before (restore, PNG level 1, count full mask), ms/frame", f"{wb_b:.1f}"),
        (
            "write-back, issue 15 (restore, PNG run-length, count small mask), ms/frame",
            f"{wb_r:.1f}",
        ),
        (
            "write-back now (PNG from the small mask's rows, count small mask), ms/frame",
            f"{wb_a:.1f}",
        ),
        ("  speed-up against before / issue 15", f"{wb_b / wb_a:.2f}x / {wb_r / wb_a:.2f}x"),
        (
            "mask PNG size before / issue 15 / now, KiB",
            f"{png_kb[0]:.1f} / {png_kb[1]:.1f} / {png_kb[2]:.1f}",
        ),
        (f"forward only, batch {args.batch_size}, images/s", f"{fwd:.2f}"),
    ]
    rows.append((f"labeling actor, batch {args.batch_size}: masks only / masks + scores "
                 "(confidence, novelty), images/s",
                 f"{masks_only:.2f} / {with_scores:.2f} ({with_scores / masks_only:.2f}x)"))  # fmt: skip
    if compile_error:
        rows.append((f"forward only, torch.compile, batch {args.batch_size}", compile_error))
    if fwd_c is not None:
        rows.append((f"forward only, torch.compile, batch {args.batch_size}, images/s",
                     f"{fwd_c:.2f} ({fwd_c / fwd:.2f}x)"))  # fmt: skip
    if nvjpeg_error:
        rows.append(("nvJPEG decode + GPU crop/resize", nvjpeg_error))
    if nvjpeg is not None:
        rows.append((f"nvJPEG decode + GPU crop/resize, batch {args.batch_size}, frames/s",
                     f"{nvjpeg:.1f} ({nvjpeg * dec_after / 1000:.1f} CPU threads' worth)"))  # fmt: skip
    if gpu_actor is not None:
        rows.append((f"labeling actor, GPU path (JPEG bytes in: nvJPEG, resize, model, scores), "
                     f"batch {args.batch_size}, frames/s",
                     f"{gpu_actor:.1f} ({gpu_actor / fwd:.2f} of forward only)"))  # fmt: skip
    rows += [(f"GPU path, CPU stage: {k}, ms/frame", f"{v:.2f}") for k, v in gpu_path.items()]
    rows += [
        ("CPU threads to keep one model replica busy, before", f"{cores_b:.1f}"),
        ("CPU threads to keep one model replica busy, CPU path", f"{cores_a:.1f}"),
        (
            "CPU threads to keep one model replica busy, GPU path",
            f"{best_fwd * gpu_path_total / 1000:.1f}",
        ),
    ]
    caption = (
        f"Labeling stages, {args.frames} synthetic frames {fw}x{fh} (JPEG q90) -> model input "
        f"{w}x{h}; CPU stages on 1 thread; model FCN-8s ResNet-101 on {device.type} "
        f"({device_name(device)}{', bf16 + channels_last' if device.type == 'cuda' else ', 1 thread'}), "
        f"torch {torch.__version__}, zlib {zlib.ZLIB_VERSION}"
    )  # fmt: skip
    emit(caption, rows, args.out)
    # The figure a script reads: one 3384x1710 frame's CPU cost when the model stage decodes.
    print(f"cpu ms per frame, gpu path: {gpu_path_total:.2f}")


if __name__ == "__main__":
    main()
