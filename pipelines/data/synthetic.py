"""Synthetic drive data in the ApolloScape lane-segmentation layout, so the demo and the tests
run without any download.

Each frame is a road seen from a forward camera: sky, asphalt converging to a vanishing point,
and painted markings of several classes (solid/dashed white and yellow lines, stop lines,
zebra crossings, arrows, parking and "other" markings), with the matching Apollo-id label as a
palette PNG, exactly as the real label files are stored::

    {out}/ColorImage_road02/ColorImage/Record001/Camera 5/{timestamp}_Camera_5.jpg
    {out}/Labels_road02/Label/Record001/Camera 5/{timestamp}_Camera_5_bin.png

Usage: ``python -m pipelines.data.synthetic --out DIR --n N [--records R] [--size 3384x1710]``
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipelines.core.frames import parse_size

# Apollo ids drawn (see pipelines/core/labels.py for their training classes).
SOLID_WHITE, SOLID_YELLOW, DASHED_WHITE, DASHED_YELLOW = 200, 204, 201, 203
STOP, PARKING, ZEBRA, THRU_ARROW, TURN_ARROW, OTHER = 217, 210, 214, 221, 222, 205
HOOD = 255

WHITE = (235, 235, 228)
YELLOW = (225, 190, 50)


def apollo_palette() -> list[int]:
    """A 256-entry palette (flattened RGB) for label PNGs; index = Apollo id, as in the
    real files. Colours are arbitrary but distinct for the ids drawn here."""
    rng = np.random.default_rng(0)
    pal = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    pal[0] = (0, 0, 0)
    pal[255] = (255, 255, 255)
    return pal.ravel().tolist()


@dataclass(frozen=True)
class FramePaths:
    image: Path
    label: Path | None


def frame_paths(out: Path, road: str, record: int, camera: int, timestamp: str) -> FramePaths:
    cam = f"Camera {camera}"
    name = f"{timestamp}_Camera_{camera}"
    return FramePaths(
        image=out
        / f"ColorImage_{road}"
        / "ColorImage"
        / f"Record{record:03d}"
        / cam
        / f"{name}.jpg",
        label=out / f"Labels_{road}" / "Label" / f"Record{record:03d}" / cam / f"{name}_bin.png",
    )


class _Painter:
    """Draws a marking on the frame and its id on the label with the same geometry."""

    def __init__(self, image: Image.Image, label: Image.Image) -> None:
        self.img = ImageDraw.Draw(image)
        self.lbl = ImageDraw.Draw(label)

    def polygon(self, pts: list[tuple[float, float]], colour, apollo_id: int) -> None:
        self.img.polygon(pts, fill=colour)
        self.lbl.polygon(pts, fill=apollo_id)


@dataclass(frozen=True)
class _Road:
    """A straight road's perspective: lines converge from the bottom row to (vx, horizon)."""

    width: int
    height: int
    horizon: int
    vx: float

    def depth(self, y: float) -> float:
        """0 at the horizon, 1 at the bottom row (proportional to 1/distance on the ground)."""
        return (y - self.horizon) / (self.height - self.horizon)

    def row(self, t: float) -> float:
        """The row at depth ``t``."""
        return self.horizon + t * (self.height - self.horizon)

    def x_at(self, x_bottom: float, y: float) -> float:
        """x of a line through (x_bottom, height) and the vanishing point, at row y."""
        return self.vx + (x_bottom - self.vx) * self.depth(y)

    def strip(self, x_bottom: float, y0: float, y1: float, w_bottom: float) -> list:
        """A painted strip of a line between rows y0 < y1 (width shrinks with distance)."""
        a, b = self.x_at(x_bottom, y0), self.x_at(x_bottom, y1)
        h0, h1 = w_bottom * self.depth(y0) / 2, w_bottom * self.depth(y1) / 2
        return [(a - h0, y0), (a + h0, y0), (b + h1, y1), (b - h1, y1)]


def render_frame(
    rng: np.random.Generator, width: int = 3384, height: int = 1710, hood: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic frame: (H, W, 3) uint8 RGB and (H, W) uint8 Apollo ids."""
    road = _Road(
        width, height, int(height * rng.uniform(0.40, 0.46)), width * rng.uniform(0.45, 0.55)
    )
    horizon = road.horizon

    # Sky gradient above the horizon, asphalt below; the label starts as background 0.
    rows = np.linspace(0.0, 1.0, horizon)[:, None]
    sky = (np.array([150, 180, 215]) * (1 - 0.3 * rows)).astype(np.uint8)
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:horizon] = sky[:, None, :]
    frame[horizon:] = np.uint8(rng.uniform(70, 110))
    image = Image.fromarray(frame)
    label = Image.new("P", (width, height), 0)
    paint = _Painter(image, label)

    lane_w = width * rng.uniform(0.32, 0.40)
    centre = road.vx + rng.uniform(-0.1, 0.1) * lane_w
    _paint_lane_lines(paint, road, rng, centre, lane_w)
    _paint_road_markings(paint, road, rng, centre, lane_w)
    if hood:  # the ego hood, ignored in the real labels
        hood_top = int(height * 0.85)
        paint.polygon(
            [(0, hood_top), (width, hood_top), (width, height), (0, height)], (20,) * 3, HOOD
        )

    # Camera noise and a little blur on the picture only; the label stays exact.
    image = image.filter(ImageFilter.GaussianBlur(radius=max(width / 2000, 0.5)))
    pixels = np.asarray(image).astype(np.int16)
    pixels += rng.normal(0, 6, size=pixels.shape).astype(np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8), np.asarray(label)


def _paint_lane_lines(
    paint: _Painter, road: _Road, rng: np.random.Generator, centre: float, lane_w: float
) -> None:
    """Five lines: the ego lane's two, and one more lane each side."""
    line_w = road.width * 0.012
    for k in range(-2, 3):
        xb = centre + (k - 0.5) * lane_w
        if k == 0:
            kind = int(rng.choice([SOLID_YELLOW, SOLID_WHITE, DASHED_YELLOW]))
        elif abs(k) == 2:
            kind = SOLID_WHITE
        else:
            kind = int(rng.choice([DASHED_WHITE, SOLID_WHITE]))
        colour = YELLOW if kind in (SOLID_YELLOW, DASHED_YELLOW) else WHITE
        if kind not in (DASHED_WHITE, DASHED_YELLOW):
            paint.polygon(road.strip(xb, road.row(0.02), road.height, line_w), colour, kind)
            continue
        # Dashes equally long on the ground: equal steps in 1/depth, i.e. in t.
        phase, n = rng.uniform(0, 1), 6
        for i in range(n):
            t0 = (i + phase) / n
            if t0 >= 1:
                break
            y0, y1 = road.row(max(t0, 0.02)), road.row(min(t0 + 0.45 / n, 1.0))
            paint.polygon(road.strip(xb, y0, y1, line_w), colour, kind)


def _paint_road_markings(
    paint: _Painter, road: _Road, rng: np.random.Generator, centre: float, lane_w: float
) -> None:
    """Each with its own chance: stop line, zebra crossing, arrow, parking box, "other"."""
    span, x_at = road.height - road.horizon, road.x_at
    ego_left, ego_right = centre - 0.5 * lane_w, centre + 0.5 * lane_w
    if rng.random() < 0.5:  # stop line across the ego lane
        y = road.row(rng.uniform(0.35, 0.6))
        band = 0.02 * span
        pts = [(x_at(ego_left, y), y), (x_at(ego_right, y), y),
               (x_at(ego_right, y + band), y + band), (x_at(ego_left, y + band), y + band)]  # fmt: skip
        paint.polygon(pts, WHITE, STOP)
    if rng.random() < 0.5:  # zebra crossing: stripes along the road, across all lanes
        y0 = road.row(rng.uniform(0.15, 0.3))
        for j in range(12):
            xb = centre - 2 * lane_w + j * (4 * lane_w / 12)
            paint.polygon(road.strip(xb, y0, y0 + 0.08 * span, lane_w / 20), WHITE, ZEBRA)
    if rng.random() < 0.7:  # arrow in the ego lane: a shaft and a head
        kind = THRU_ARROW if rng.random() < 0.6 else TURN_ARROW
        y0 = road.row(rng.uniform(0.55, 0.7))
        shaft = road.strip(centre, y0 + 0.05 * span, y0 + 0.18 * span, lane_w / 10)
        paint.polygon(shaft, WHITE, kind)
        xa, ym = x_at(centre, y0), y0 + 0.06 * span
        half = lane_w * road.depth(ym) / 6
        dx = half if kind == TURN_ARROW else 0.0
        paint.polygon([(xa + dx, y0), (xa - half, ym), (xa + half, ym)], WHITE, kind)
    if rng.random() < 0.3:  # parking box at the right road side
        y0 = road.row(rng.uniform(0.5, 0.7))
        line_w = road.width * 0.012
        paint.polygon(road.strip(centre + 1.9 * lane_w, y0, y0 + 0.1 * road.height, line_w),
                      WHITE, PARKING)  # fmt: skip
    if rng.random() < 0.3:  # an "other" marking (e.g. a reduction chevron) in the left lane
        y0 = road.row(rng.uniform(0.5, 0.7))
        paint.polygon(road.strip(centre - lane_w, y0, y0 + 0.05 * road.height, lane_w / 6),
                      WHITE, OTHER)  # fmt: skip


def label_png(label: np.ndarray) -> bytes:
    """Apollo-style palette PNG: the pixel indices are the ids."""
    img = Image.fromarray(label, mode="P")
    img.putpalette(apollo_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_tree(
    out: str | Path,
    n: int,
    *,
    records: int = 4,
    width: int = 3384,
    height: int = 1710,
    seed: int = 0,
    road: str = "road02",
    with_labels: bool = True,
    hood: bool = False,
) -> list[FramePaths]:
    """Write ``n`` frames spread over ``records`` drives (records) and two cameras."""
    if n < 1 or records < 1:
        raise ValueError("n and records must be >= 1")
    out = Path(out)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(n):
        record = 1 + i % records
        camera = 5 + (i // records) % 2
        timestamp = f"171206_{25742 + seed * 100000 + i:06d}{i % 1000:03d}"
        paths = frame_paths(out, road, record, camera, timestamp)
        frame, label = render_frame(rng, width, height, hood=hood)
        paths.image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(paths.image, format="JPEG", quality=92)
        if with_labels:
            paths.label.parent.mkdir(parents=True, exist_ok=True)
            paths.label.write_bytes(label_png(label))
        written.append(FramePaths(paths.image, paths.label if with_labels else None))
    return written


def size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.data.synthetic", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True, help="output directory (Apollo layout is created in it)")
    p.add_argument("--n", type=int, required=True, help="number of frames")
    p.add_argument("--records", type=int, default=4, help="number of drives (Record%%03d folders)")
    p.add_argument("--size", type=size_arg, default=(3384, 1710), help="frame WIDTHxHEIGHT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--road", default="road02")
    p.add_argument("--no-labels", action="store_true", help="frames only (new drives to label)")
    args = p.parse_args(argv)
    paths = write_tree(
        args.out,
        args.n,
        records=args.records,
        width=args.size[0],
        height=args.size[1],
        seed=args.seed,
        road=args.road,
        with_labels=not args.no_labels,
    )
    print(f"wrote {len(paths)} frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def write_drive(
    out: str | Path, n: int, *, width: int, height: int, seed: int = 0, road: str = "road02",
    with_labels: bool = True, on_written: Callable[[int], None] | None = None,
) -> None:  # fmt: skip
    """``n`` frames of one road in chunks of a quarter, each chunk its own four records (a
    drive that spans records and cameras, as a delivery does); ``on_written(frames so far)``
    after each chunk (the demo's progress)."""
    step = max(1, n // 4)
    for start in range(0, n, step):
        count = min(step, n - start)
        write_tree(out, count, records=4, width=width, height=height, seed=seed + start,
                   road=road, with_labels=with_labels)  # fmt: skip
        if on_written is not None:
            on_written(start + count)
