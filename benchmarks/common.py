"""What every benchmark shares: the ``--device`` flag, waiting for the device before reading a
clock, the device's name for the caption, and the markdown table (printed, and written to
``--out`` for RESULTS.md)."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence
from pathlib import Path

import torch


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def parse_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """``args.device`` as a torch device; a usage error (exit 2) where CUDA is asked for but
    absent, before any work starts."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return torch.device(args.device)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work: without it a timer measures only the kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.machine() or "unknown CPU"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Markdown table lines: the first column left-aligned (names), the rest right (figures)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def emit(caption: str, rows: Sequence[Sequence[object]], out: Path | None,
         header: Sequence[str] = ("measure", "value")) -> str:  # fmt: skip
    """Caption, blank line, table: printed, and written to ``out`` when given."""
    text = "\n".join([caption, "", *table(header, rows)]) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
    return text
