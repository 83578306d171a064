"""The FCN paper's comparison on the lane task (issue 26): FCN-32s, FCN-16s and FCN-8s trained
in stages, FCN-8s at once, and the production FCN-8s ResNet-101, on the same frames, split and
step budget, from two seeds.

    python -m benchmarks.bench_fcn_table [--device cpu|cuda] [--size 64x32] [--frames 24]
        [--frame-size 846x428] [--crop-top 172] [--steps 6] [--batch-size 2] [--lr LR]
        [--recipe default|reference] [--seeds 0,1] [--band 3] [--models ...]
        [--vgg16-weights FILE] [--resnet101-weights FILE] [--out FILE]

The defaults are a CPU size (~6 minutes on 2 cores); the comparison needs the GPU size
(``FCN_TABLE=1 bash benchmarks/gpu_check.sh``). Data, training and scoring are bench_learning's
(the training engine, the job's recipe and augmentation), ``--steps`` per model and stage; a
staged model starts from the trained stage before, so ``steps (total)`` counts those too.
Besides the scores, mIoU within ``--band`` px of a label edge (the FCN/DeepLab trimap), and the
lines a script reads::

    ordering fcn32s<fcn16s<fcn8s: yes|no (mIoU a / b / c)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_learning import Frames, demo_parser, fit, load_demo, val_conf
from benchmarks.common import device_name, emit, parse_device, synchronize, table
from fcn_models import MODEL_NAMES
from pipelines.core.frames import FrameTransform
from pipelines.core.labels import CLASS_NAMES, IGNORE_INDEX, N_CLASSES
from pipelines.core.metrics import scores
from pipelines.training import engine
from pipelines.training.recipe import make_recipe
from pipelines.training.weights import load_backbone_weights

# The paper's FCNs and the production model (fcn8s_resnet18, its light variant, is not in the
# comparison the table exists for).
MODELS = tuple(n for n in MODEL_NAMES if n != "fcn8s_resnet18")
STAGED_FROM = {"fcn16s": "fcn32s", "fcn8s": "fcn16s"}  # each initialised from the trained one
STAGE = {"fcn32s": 1, "fcn16s": 2, "fcn8s": 3}  # stages trained up to and including this one
VGG = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")


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


# -- models: how each starts, how it trains, how it scores -----------------------------------------
def init_model(name: str, seed: int, trained: Mapping[str, nn.Module],
               weights: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[nn.Module, str]:  # fmt: skip
    """(model, how it starts) for ``name``: staged models from the trained model of the stage
    before, the others from the backbone weights given for their family (``weights["vgg16"]``
    / ``weights["resnet101"]``) or from scratch, drawn from ``seed``."""
    before = STAGED_FROM.get(name)
    family = "resnet101" if name == "fcn8s_resnet101" else "vgg16"
    backbone = None if before else weights.get(family)
    model = engine.build_model(name, N_CLASSES, seed=seed, backbone_weights=backbone)
    if before == "fcn32s":
        model.copy_params_from_fcn32s(trained[before])
    elif before == "fcn16s":
        model.copy_params_from_fcn16s(trained[before])
    if before:
        return model, f"trained {before}"
    return model, family if backbone else "scratch"


def train(model: nn.Module, name: str, frames: Frames, args, transform: FrameTransform,
          seed: int) -> tuple[engine.TrainState, dict]:  # fmt: skip
    """``args.steps`` engine steps with the model's recipe; the state, and the training's
    images/s (after the first step, which warms up: allocations, cuDNN), peak memory, last loss."""
    device = frames["label"].device
    recipe = make_recipe(args.recipe if name in VGG else "default", name, lr=args.lr)
    state = engine.build_train_state(model, recipe, total_steps=args.steps, device=device,
                                     amp=device.type == "cuda")  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm, last = [], {"loss": torch.tensor(float("nan"))}

    def on_step(step: int, images: int, loss: torch.Tensor) -> None:
        if not warm:  # the clock starts when the first step is done
            synchronize(device)
            warm.append(time.perf_counter())
        last["loss"] = loss

    fit(state, frames, args.steps, args, transform, seed, on_step=on_step)
    synchronize(device)
    timed = (args.steps - 1) * args.batch_size
    rate = timed / (time.perf_counter() - warm[0]) if timed else float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return state, {"images_per_s": rate, "peak_mib": peak, "loss": float(last["loss"])}


def evaluate(state: engine.TrainState, frames: Frames, args, transform: FrameTransform) -> dict:
    """Scores of the validation split: everywhere, and within the label-edge band (the same
    evaluation of labels ignored outside the band)."""
    off = ~boundary_band(frames["label"], args.band)
    band = {**frames, "label": frames["label"].masked_fill(off, IGNORE_INDEX)}
    conf = val_conf(state, frames, args, transform)
    s, band_s = scores(conf), scores(val_conf(state, band, args, transform))
    lane = [s["iou"][CLASS_NAMES[c]] for c in range(1, N_CLASSES) if conf[c].sum() > 0]  # in val
    return {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "background_iou": s["iou"][CLASS_NAMES[0]],
            "lane_iou": float(np.mean(lane)) if lane else float("nan"), "lane_classes": len(lane),
            "band_miou": band_s["miou"], "iou": s["iou"]}  # fmt: skip


def run_seed(names: list[str], seed: int, data: tuple[Frames, Frames], args,
             transform: FrameTransform, weights: Mapping) -> list[dict]:  # fmt: skip
    """Every model of ``names`` (in ``MODELS`` order, so each stage follows the one it starts
    from) trained and scored from ``seed``."""
    trained: dict[str, nn.Module] = {}
    results = []
    for name in names:
        t = time.perf_counter()
        model, start = init_model(name, seed, trained, weights)
        if name in STAGED_FROM:  # nothing later starts from the stage before: free it
            trained.pop(STAGED_FROM[name], None)
        state, timing = train(model, name, data[0], args, transform, seed)
        scored = evaluate(state, data[1], args, transform)
        if name in STAGED_FROM.values():
            trained[name] = state.model
        results.append({"model": name, "seed": seed, "init": start, **timing, **scored})
        print(f"  {name:16s} seed {seed}: val mIoU {scored['miou']:.3f}, loss {timing['loss']:.3f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
        del model, state
        if data[0]["label"].is_cuda:
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
MEASURES = ("miou", "background_iou", "lane_iou", "pixel_acc", "band_miou")


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
        peak = [r["peak_mib"] for r in rs if r["peak_mib"] is not None]
        rows.append((f"**{name}** (mean ± spread)", ",".join(str(r["seed"]) for r in rs), "",
                     steps_cell(name, steps), *(_mean_spread([r[k] for r in rs]) for k in MEASURES),
                     _mean_spread([r["images_per_s"] for r in rs], ".1f"),
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
        r101 = args.resnet101_weights
        weights["resnet101"] = load_backbone_weights(r101, "fcn8s_resnet101", N_CLASSES)
        said.append(f"ResNet-101 {r101}")
    return weights, "backbone: " + (", ".join(said) if said else "scratch")


def build_parser() -> argparse.ArgumentParser:
    p = demo_parser(__doc__, size=(64, 32), frames=24, batch_size=2, seeds="0,1")
    p.add_argument("--steps", type=int, default=6, help="training steps per model (per stage)")
    p.add_argument("--recipe", choices=("default", "reference"), default="default")
    p.add_argument("--lr", type=float, default=None, help="every model's (default: the recipe's)")
    p.add_argument("--band", type=int, default=3, help="boundary band radius, px")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--vgg16-weights", help="VGG-16 ImageNet state_dict (path, s3://, torchvision)")
    p.add_argument("--resnet101-weights", help="ResNet-101 ImageNet state_dict (the same)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the table; returns every (model, seed) result (what the rows show)."""
    p = build_parser()
    args = p.parse_args(argv)
    device = parse_device(p, args)
    names = parse_models(p, args.models)
    if args.steps < 1 or args.batch_size < 1 or args.band < 1:
        p.error("--steps, --batch-size and --band must be >= 1")
    weights, backbone = load_weights(args, names)
    transform = FrameTransform(width=args.size[0], height=args.size[1], crop_top=args.crop_top)
    torch.set_flush_denormal(True)  # as the training loop does (10x on CPU)
    data = load_demo(args, transform, device)  # one split for every seed
    results = [
        r for seed in args.seeds for r in run_seed(names, seed, data, args, transform, weights)
    ]

    (w, h), n_train, n_val = args.size, len(data[0]["label"]), len(data[1]["label"])
    recipe = args.recipe + ("" if args.lr is None else f", lr {args.lr:g}")
    caption = (
        f"The FCN table on the lane task: {w}x{h}, batch {args.batch_size}, {args.steps} steps "
        f"per model and stage (total: with the stages before), recipe {recipe}; {backbone}; "
        f"{n_train} train / {n_val} val frames (the demo's synthetic drives), seeds "
        f"{','.join(map(str, args.seeds))}; band {args.band} px; {device.type} "
        f"({device_name(device)}), torch {torch.__version__}"
        f"{', bf16 autocast' if device.type == 'cuda' else ''}. "
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
