"""The FCN paper's comparison on the lane task (issue 26): FCN-32s, FCN-16s and FCN-8s trained
in stages, FCN-8s trained at once, and the production FCN-8s ResNet-101, on the same synthetic
drive frames, split and step budget, from two seeds.

    python -m benchmarks.bench_fcn_table [--device cpu|cuda] [--size 64x32] [--frames 24]
        [--frame-size 846x428] [--crop-top 172] [--steps 6] [--batch-size 2] [--lr LR]
        [--recipe default|reference] [--seeds 0,1] [--band 3] [--models ...]
        [--vgg16-weights FILE] [--resnet101-weights FILE] [--out FILE]

The defaults are a CPU size (about 6 minutes on 2 cores: the VGG FCNs cost ~2 s per image and
step there, whatever the input size, because conv1_1 pads every side by 100 px); the figures
the issue asks about need the GPU size, e.g. ``--device cuda --size 1024x384 --frame-size
1692x855 --crop-top 345 --frames 96 --steps 150 --batch-size 8`` (``benchmarks/gpu_check.sh``).

Data: the demo's synthetic drives (``pipelines.data.synthetic.write_tree``), found and split by
drive as ``jobs.ingest`` does (``discover``, ``split_drives``), converted by the pipeline's own
``process_pair``, held in memory (no Ray Data or Train; ``train_step``'s module imports Ray, so
it must be installed), as ``benchmarks/bench_learning.py`` does. The frames are decoded once
(``decode_batch``) onto the device; training batches are augmented there with the training
job's ``Augment`` (``augment_batch``); the validation split is scored in eval mode with
``confusion_matrix`` and ``scores`` (``pipelines.core.metrics``, the one metrics implementation).

Models and how each starts (``fcn_models.build_model`` names):

- ``fcn32s``: VGG-16 backbone (from scratch, or ``--vgg16-weights``), zero score head.
- ``fcn16s``: the *trained* ``fcn32s`` of the same seed, through
  ``FCN16s.copy_params_from_fcn32s`` (backbone and ``score_fr``; ``score_pool4`` zero).
- ``fcn8s``: the trained ``fcn16s`` of the same seed, through ``FCN8s.copy_params_from_fcn16s``.
- ``fcn8s_atonce``: ``FCN8s(at_once=True)``, the reference voc-fcn8s-atonce: the pool4/pool3
  skips read ``pool4 * 0.01`` and ``pool3 * 0.0001`` (the models support it), trained in one
  stage from the same backbone start as ``fcn32s``.
- ``fcn8s_resnet101``: the production model (ResNet-101 from scratch, or
  ``--resnet101-weights``, a torchvision resnet101 state_dict).

Budget: every model trains ``--steps`` steps of ``--batch-size`` frames, with its own poly
schedule over those steps (``make_recipe``/``make_optimizer``, parameter groups and fixed
upsamplers as the training job: ``set_trainable``, ``train_step``). A staged model thus gets
the same budget per stage as an at-once model, as in the paper (each stage its own training);
the ``steps (total)`` column also counts the stages before it (fcn8s: 3x ``--steps``), so the
at-once comparison can be read both ways. Each run draws the same sequence of batches for a
seed; ``torch.manual_seed(seed)`` before each model makes fcn32s and fcn8s_atonce start from the
same VGG-16 weights.

Columns: val mIoU; background IoU; the mean IoU of the lane classes present in the validation
labels; pixel accuracy; the boundary measure (mIoU over the pixels within ``--band`` px of a
label edge: the trimap of the FCN/DeepLab papers, from the ground truth, ignore pixels left
out); training images/s (steps after the first, which warms up); peak GPU memory of the
training (``-`` on CPU). One row per model and seed, then a row per model with the mean over
the seeds +- half their range, a table of per-class IoU (mean over seeds), and the lines::

    ordering fcn32s<fcn16s<fcn8s: yes|no (mIoU a / b / c)
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_learning import demo_data, ingest_in_memory
from benchmarks.common import add_device_arg, device_name, emit, parse_device, synchronize, table
from fcn_models import MODEL_NAMES, build_model
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.core.labels import CLASS_NAMES, IGNORE_INDEX, N_CLASSES
from pipelines.core.metrics import confusion_matrix, scores
from pipelines.data.decode import decode_batch
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.recipe import make_loss, make_optimizer, make_recipe, set_trainable
from pipelines.training.step import epoch_seed, train_step
from pipelines.training.weights import load_backbone_weights

# The paper's FCNs and the production model (fcn8s_resnet18, its light variant, is not in the
# comparison the table exists for).
MODELS = tuple(n for n in MODEL_NAMES if n != "fcn8s_resnet18")
STAGED_FROM = {"fcn16s": "fcn32s", "fcn8s": "fcn16s"}  # each initialised from the trained one
STAGE = {"fcn32s": 1, "fcn16s": 2, "fcn8s": 3}  # stages trained up to and including this one
VGG = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")


# -- data: as bench_learning, the demo's drives held in memory ------------------------------------
def decoded(rows: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Every frame of a split decoded once (``decode_batch``) and held on the device: uint8
    ``image`` (N, H, W, 3) and ``label`` (N, H, W), as the training loop receives them."""
    out = decode_batch(
        {k: np.array([r[k] for r in rows], dtype=object) for k in ("image", "label")}
    )
    return {k: torch.from_numpy(out[k]).to(device) for k in ("image", "label")}


def train_batches(frames: dict[str, torch.Tensor], size: int, transform: FrameTransform,
                  seed: int) -> Iterator[dict]:  # fmt: skip
    """Augmented, normalized batches without end, as the training loop makes them
    (``augment_batch``): a new order and augmentation stream every epoch, drawn from ``seed``
    and the epoch (the same sequence for every model of a seed); the last partial batch of an
    epoch is dropped, as the job does."""
    n, device = len(frames["label"]), frames["label"].device
    for epoch in itertools.count():
        s = epoch_seed(seed, epoch)
        order = torch.from_numpy(np.random.default_rng(s).permutation(n)).to(device)
        generator = step_generator(device, s)
        for i in range(0, n - size + 1, size):
            idx = order[i : i + size]
            batch = {"image": frames["image"][idx], "label": frames["label"][idx]}
            yield augment_batch(batch, Augment(), transform, generator)


# -- the boundary measure -------------------------------------------------------------------------
def boundary_band(
    label: torch.Tensor, radius: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(N, H, W) bool: the pixels within ``radius`` px (a (2r+1)^2 square) of a label edge, i.e.
    whose window holds a label other than their own; ignore pixels are never in the band and
    never make an edge. A max-pool and a min-pool of the labels over the window, compared."""
    if radius < 1:
        raise ValueError(f"band radius must be >= 1 px, got {radius}")
    y = label.float()[:, None]
    ignored = label[:, None] == ignore_index
    k = 2 * radius + 1
    high = F.max_pool2d(y.masked_fill(ignored, -1.0), k, stride=1, padding=radius)
    low = -F.max_pool2d((-y).masked_fill(ignored, -float(ignore_index) - 1), k, stride=1,
                        padding=radius)  # fmt: skip
    return ((high != low) & ~ignored)[:, 0]


# -- models -----------------------------------------------------------------------------------------
def init_model(name: str, seed: int, trained: Mapping[str, nn.Module],
               weights: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[nn.Module, str]:  # fmt: skip
    """(model, how it starts) for ``name``: staged models from the trained model of the stage
    before (``copy_params_from_fcn32s`` / ``copy_params_from_fcn16s``), the others from the
    backbone weights given for their family (``weights["vgg16"]`` / ``weights["resnet101"]``)
    or from scratch (``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    before = STAGED_FROM.get(name)
    if before is not None:
        model = build_model(name, N_CLASSES)
        source = trained[before]
        if name == "fcn16s":
            model.copy_params_from_fcn32s(source)
        else:
            model.copy_params_from_fcn16s(source)
        return model, f"trained {before}"
    family = "resnet101" if name == "fcn8s_resnet101" else "vgg16"
    state = weights.get(family)
    if state is None:
        return build_model(name, N_CLASSES), "scratch"
    return build_model(name, N_CLASSES, backbone_weights=state), family


def recipe_for(name: str, args):
    """The recipe ``--recipe`` names for the model; the reference (Caffe) solvers exist for the
    VGG FCNs only, so ``fcn8s_resnet101`` keeps ``default``."""
    recipe = args.recipe if name in VGG else "default"
    return make_recipe(recipe, name, lr=args.lr)


def train(model: nn.Module, name: str, frames: dict, args, transform: FrameTransform,
          device: torch.device, seed: int) -> dict:  # fmt: skip
    """``args.steps`` training steps as the training job takes them; images/s and peak memory."""
    cuda = device.type == "cuda"
    recipe = recipe_for(name, args)
    set_trainable(model, learn_upsampling=recipe.learn_upsampling)
    if cuda:  # what the job does with --amp on a GPU
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, recipe, args.steps)
    criterion = make_loss(recipe)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)  # dropout
    model.train()
    stream = train_batches(frames, args.batch_size, transform, seed)
    seconds, images, loss = 0.0, 0, float("nan")
    for step, batch in enumerate(itertools.islice(stream, args.steps)):
        synchronize(device)
        t0 = time.perf_counter()
        out = train_step(model, batch, criterion, optimizer, autocast, channels_last=cuda)
        scheduler.step()
        synchronize(device)
        if step > 0 or args.steps == 1:  # the first step warms up (allocations, cuDNN)
            seconds += time.perf_counter() - t0
            images += len(batch["image"])
        loss = float(out)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return {"images_per_s": images / max(seconds, 1e-9), "peak_mib": peak, "loss": loss}


def evaluate(model: nn.Module, frames: dict, transform: FrameTransform,
             device: torch.device, band: int) -> dict:  # fmt: skip
    """Scores of the validation split in eval mode: everywhere, and within the label-edge band."""
    conf = torch.zeros(N_CLASSES, N_CLASSES, dtype=torch.int64, device=device)
    conf_band = torch.zeros_like(conf)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.eval()
    with torch.no_grad(), autocast:
        for i in range(len(frames["label"])):
            y = frames["label"][i : i + 1].long()
            pred = model(transform.normalize(frames["image"][i : i + 1])).argmax(1)
            conf += confusion_matrix(pred, y, N_CLASSES)
            edge = boundary_band(y, band)
            conf_band += confusion_matrix(pred, y.masked_fill(~edge, IGNORE_INDEX), N_CLASSES)
    conf = conf.cpu().numpy()
    s = scores(conf)
    present = [c for c in range(1, N_CLASSES) if conf[c].sum() > 0]  # lane classes in val
    lane = [s["iou"][CLASS_NAMES[c]] for c in present]
    return {
        "miou": s["miou"],
        "pixel_acc": s["pixel_acc"],
        "background_iou": s["iou"][CLASS_NAMES[0]],
        "lane_iou": float(np.mean(lane)) if lane else float("nan"),
        "lane_classes": len(present),
        "band_miou": scores(conf_band.cpu().numpy())["miou"],
        "iou": s["iou"],
    }


def run_seed(names: list[str], seed: int, data, args, transform, device, weights) -> list[dict]:
    """Every model of ``names`` (in ``MODELS`` order, so each stage follows the one it starts
    from) trained and scored from ``seed``."""
    train_frames, val_frames = (decoded(rows, device) for rows in data)
    trained: dict[str, nn.Module] = {}
    results = []
    for name in names:
        t = time.perf_counter()
        model, start = init_model(name, seed, trained, weights)
        for done, before in STAGED_FROM.items():  # nothing later starts from it: free it
            if done == name:
                trained.pop(before, None)
        model = model.to(device)
        fit = train(model, name, train_frames, args, transform, device, seed)
        scored = evaluate(model, val_frames, transform, device, args.band)
        if name in STAGED_FROM.values():
            trained[name] = model
        results.append({"model": name, "seed": seed, "init": start, **fit, **scored})
        print(f"  {name:16s} seed {seed}: val mIoU {scored['miou']:.3f}, loss {fit['loss']:.3f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# -- the table --------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _mean_spread(values: list[float], fmt: str = ".3f") -> str:
    """``mean +- half the range`` (two seeds: +- half their difference)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(float(np.mean(v)), fmt)} ± {format((max(v) - min(v)) / 2, fmt)}"


def steps_cell(name: str, steps: int) -> str:
    return f"{steps} ({steps * STAGE.get(name, 1)})"


HEADER = ("model", "seed", "init", "steps (total)", "val mIoU", "background IoU",
          "lane IoU (classes)", "pixel acc", "band mIoU", "images/s", "peak GPU MiB")  # fmt: skip


def table_rows(results: list[dict], names: list[str], steps: int) -> list[tuple]:
    rows = [
        (r["model"], r["seed"], r["init"], steps_cell(r["model"], steps), _f(r["miou"]),
         _f(r["background_iou"]), f"{_f(r['lane_iou'])} ({r['lane_classes']})",
         _f(r["pixel_acc"]), _f(r["band_miou"]), _f(r["images_per_s"], ".1f"),
         _f(r["peak_mib"], ".0f"))
        for r in results
    ]  # fmt: skip
    for name in names:
        rs = [r for r in results if r["model"] == name]
        col = {k: [r[k] for r in rs] for k in rs[0] if k not in ("model", "init", "iou")}
        peak = [p for p in col["peak_mib"] if p is not None]
        rows.append((f"**{name}** (mean ± spread)", ",".join(str(s) for s in col["seed"]), "",
                     steps_cell(name, steps), _mean_spread(col["miou"]),
                     _mean_spread(col["background_iou"]), _mean_spread(col["lane_iou"]),
                     _mean_spread(col["pixel_acc"]), _mean_spread(col["band_miou"]),
                     _mean_spread(col["images_per_s"], ".1f"),
                     _mean_spread(peak, ".0f") if peak else "-"))  # fmt: skip
    return rows


def mean_miou(results: list[dict], name: str) -> float:
    return float(np.mean([r["miou"] for r in results if r["model"] == name]))


def verdict_lines(results: list[dict], names: list[str]) -> list[str]:
    """The lines a script reads: the paper's ordering, at-once against staged, ResNet-101."""
    lines = []
    chain = ("fcn32s", "fcn16s", "fcn8s")
    if set(chain) <= set(names):
        a, b, c = (mean_miou(results, n) for n in chain)
        holds = "yes" if a < b < c else "no"
        lines.append(f"ordering fcn32s<fcn16s<fcn8s: {holds} (mIoU {a:.3f} / {b:.3f} / {c:.3f})")
    if {"fcn8s", "fcn8s_atonce"} <= set(names):
        a, s = mean_miou(results, "fcn8s_atonce"), mean_miou(results, "fcn8s")
        lines.append(f"fcn8s_atonce - fcn8s (staged): {a - s:+.3f} (mIoU {a:.3f} / {s:.3f})")
    vgg = [n for n in names if n in VGG]
    if "fcn8s_resnet101" in names and vgg:
        best = max(vgg, key=lambda n: mean_miou(results, n))
        r, v = mean_miou(results, "fcn8s_resnet101"), mean_miou(results, best)
        lines.append(f"fcn8s_resnet101 - best VGG ({best}): {r - v:+.3f} (mIoU {r:.3f} / {v:.3f})")
    return lines


def class_iou_table(results: list[dict], names: list[str]) -> list[str]:
    """Per-class val IoU of each model, mean over seeds (``-``: class absent from val and never
    predicted)."""
    rows = []
    for name in names:
        rs = [r["iou"] for r in results if r["model"] == name]
        cells = []
        for c in CLASS_NAMES:
            v = [x[c] for x in rs if not math.isnan(x[c])]
            cells.append(_f(float(np.mean(v))) if v else "-")
        rows.append((name, *cells))
    return table(("per-class IoU (mean over seeds)", *CLASS_NAMES), rows)


# -- main -------------------------------------------------------------------------------------------
def parse_models(p: argparse.ArgumentParser, text: str) -> list[str]:
    """The requested models plus the stages they start from, in ``MODELS`` order."""
    asked = [m for m in text.split(",") if m]
    unknown = sorted(set(asked) - set(MODELS))
    if unknown or not asked:
        p.error(f"--models: choose from {', '.join(MODELS)} (got {text!r})")
    need = set(asked)
    for m in asked:
        while m in STAGED_FROM:
            m = STAGED_FROM[m]
            need.add(m)
    return [m for m in MODELS if m in need]


def load_weights(args, names: list[str]) -> tuple[dict, str]:
    """The backbone state_dicts given (checked against their model by ``load_backbone_weights``)
    and the caption's words for them."""
    weights, said = {}, []
    if args.vgg16_weights and set(names) & {"fcn32s", "fcn8s_atonce"}:
        weights["vgg16"] = load_backbone_weights(args.vgg16_weights, "fcn32s", N_CLASSES)
        said.append(f"VGG-16 {args.vgg16_weights}")
    if args.resnet101_weights and "fcn8s_resnet101" in names:
        weights["resnet101"] = load_backbone_weights(
            args.resnet101_weights, "fcn8s_resnet101", N_CLASSES
        )
        said.append(f"ResNet-101 {args.resnet101_weights}")
    return weights, "backbone: " + (", ".join(said) if said else "scratch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--size", type=parse_size, default=(64, 32), help="model input WxH")
    p.add_argument("--frame-size", type=parse_size, default=(846, 428), help="source frames WxH")
    p.add_argument("--crop-top", type=int, default=172, help="sky rows cut from each frame")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--steps", type=int, default=6, help="training steps per model (per stage)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--recipe", choices=("default", "reference"), default="default")
    p.add_argument("--lr", type=float, default=None, help="every model's (default: the recipe's)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--band", type=int, default=3, help="boundary band radius, px")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument(
        "--vgg16-weights", help="VGG-16 ImageNet state_dict (path, s3:// or torchvision)"
    )
    p.add_argument(
        "--resnet101-weights", help="ResNet-101 ImageNet state_dict (path, s3://, torchvision)"
    )
    p.add_argument("--out", type=Path)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the table; returns every (model, seed) result (what the rows show)."""
    p = build_parser()
    args = p.parse_args(argv)
    device = parse_device(p, args)
    names = parse_models(p, args.models)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if args.steps < 1 or args.batch_size < 1 or args.band < 1:
        p.error("--steps, --batch-size and --band must be >= 1")
    weights, backbone = load_weights(args, names)

    transform = FrameTransform(width=args.size[0], height=args.size[1], crop_top=args.crop_top)
    torch.set_flush_denormal(True)  # as the training loop does (10x on CPU)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        demo_data(Path(tmp), args.frames, args.frame_size)
        data = ingest_in_memory(Path(tmp), transform, 0.25, 0)  # one split for every seed
    print(f"data: {len(data[0])} train, {len(data[1])} val frames "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if len(data[0]) < args.batch_size or not data[1]:
        p.error(f"--frames {args.frames}: too few frames for a batch and a validation split")
    results = []
    for seed in seeds:
        results += run_seed(names, seed, data, args, transform, device, weights)

    w, h = args.size
    recipe = args.recipe + ("" if args.lr is None else f", lr {args.lr:g}")
    caption = (
        f"The FCN table on the lane task: {w}x{h}, batch {args.batch_size}, {args.steps} steps "
        f"per model and stage (total: with the stages before), recipe {recipe}; {backbone}; "
        f"{len(data[0])} train / {len(data[1])} val frames (the demo's synthetic drives), seeds "
        f"{args.seeds}; band {args.band} px; {device.type} ({device_name(device)}), torch "
        f"{torch.__version__}{', bf16 autocast' if device.type == 'cuda' else ''}. "
        f"Lane IoU: mean over the lane classes present in val (how many); spread: half the range."
    )
    text = emit(caption, table_rows(results, names, args.steps), None, header=HEADER)
    extra = "\n".join(["", *class_iou_table(results, names), "", *verdict_lines(results, names)])
    print(extra)
    if args.out is not None:
        args.out.write_text(text + extra + "\n")
    return results


if __name__ == "__main__":
    main()
