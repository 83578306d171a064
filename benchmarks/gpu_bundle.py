"""Ray and MLflow for a lent GPU machine that has neither: one ``bundle.tar.xz`` of a
site-packages tree that fits the 64 MiB a device call carries.

    python -m benchmarks.gpu_bundle [--out benchmarks/gpu-bundle] [--python-version 3.12]

Resolves Ray (Data, Train, the dashboard whose state API Ray Train queries), mlflow-skinny and
the sqlite store's SQLAlchemy + Alembic for the GPU image's Python at constraints.txt's
versions; installs what the image lacks (``gpu_image_packages.txt``) into one tree; strips
what no job loads; writes ``OUT/bundle.tar.xz`` and ``OUT/MANIFEST.txt``, or refuses a bundle
over 60 MiB. ``benchmarks/gpu_jobs.sh`` unpacks it there and runs the jobs through
``PYTHONPATH``. ``--python-version 3.11`` builds one for this machine, to check it here.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 60

# What the jobs need beyond the image; mlflow-skinny lacks the sqlite store's SQLAlchemy/Alembic.
REQUIREMENTS = ["ray[default,data,train]", "mlflow-skinny", "sqlalchemy", "alembic"]

# Python packages of the device's 'cuda' image (its KINDS.md, "Python packages already there",
# read on 2026-11-17; canonical names, one a line): not bundled.
IMAGE_HAS = set((ROOT / "benchmarks" / "gpu_image_packages.txt").read_text().split())

# In the image, but bundled all the same: googleapis-common-protos, proto-plus and google-api-core
# (the dashboard's metrics agent, via opencensus) need protobuf >= 6.33.5, newer than the image
# may have; the bundled one shadows the image's for the jobs alone (PYTHONPATH), and Ray's own
# generated code runs on any protobuf >= 3.20. ``--also NAME`` adds others.
ALSO_BUNDLE = {"protobuf"}

# Resolved but never loaded by a Python job (one binary the dashboard's profiler runs): left out.
SKIP_PACKAGES = {"py-spy"}

PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64",
]  # fmt: skip

# Paths (relative to site-packages) that no Python job loads.
STRIP_DIRS = [
    "ray/jars",  # the Java workers' jar (34.5 MB)
    "ray/rllib",  # reinforcement learning: not imported by Data, Train or the dashboard
    "ray/cpp",  # the C++ API's headers and library
    "bin",  # console scripts: the jobs run as python -m
    "include",  # C headers
]
STRIP_DIR_NAMES = {"tests", "__pycache__"}
STRIP_SUFFIXES = (".map", ".pyc", ".pyi")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run_pip(cmd: list[str]) -> None:
    """pip, with this machine's notes about missing local index folders left out."""
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    noise = "is ignored: it is neither a file nor a directory"
    sys.stderr.write("".join(x for x in proc.stderr.splitlines(True) if noise not in x))
    if proc.returncode != 0:
        raise SystemExit(f"error: pip failed (status {proc.returncode}): {' '.join(cmd[3:6])} ...")


def pip_platform_args(python_version: str) -> list[str]:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            *platforms]  # fmt: skip


def pinned_constraints(path: Path, tmp: Path, image: set[str]) -> Path:
    """constraints.txt without the pins of what the image has: the bundle's packages must work
    with the image's versions, which the resolution cannot see, so it does not fix them."""
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip()
        and canonical(re.split(r"[=<>!~\[ ]", line.strip(), maxsplit=1)[0]) not in image
    ]
    out = tmp / "constraints.txt"
    out.write_text("\n".join(keep) + "\n")
    return out


def resolve(python_version: str, constraints: Path, tmp: Path) -> list[tuple[str, str]]:
    """(name, version) of every wheel the requirements need, from pip's dry-run report (PyPI's
    metadata files: nothing large is downloaded)."""
    report = tmp / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--report", str(report), "--target", str(tmp / "never"), "-c", str(constraints),
        *pip_platform_args(python_version), *REQUIREMENTS,
    ]  # fmt: skip
    run_pip(cmd)
    items = json.loads(report.read_text())["install"]
    return sorted((canonical(i["metadata"]["name"]), i["metadata"]["version"]) for i in items)


def install(wanted: list[tuple[str, str]], site: Path, python_version: str) -> None:
    """The wheels of ``wanted`` (exact versions, no dependencies: the resolution chose them)
    installed into ``site`` as pip installs them, for the GPU image's Python and platform."""
    run_pip([
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
        "--target", str(site), *pip_platform_args(python_version), *(f"{n}=={v}" for n, v in wanted),
    ])  # fmt: skip


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def strip(site: Path) -> None:
    """Remove what no Python job loads: ``STRIP_DIRS``, every folder named in
    ``STRIP_DIR_NAMES`` and every file ending in ``STRIP_SUFFIXES``."""
    for rel in STRIP_DIRS:
        shutil.rmtree(site / rel, ignore_errors=True)
    for p in sorted(site.rglob("*"), key=lambda p: len(p.parts)):  # folders before their files
        if p.is_dir() and p.name in STRIP_DIR_NAMES:
            shutil.rmtree(p)
        elif p.is_file() and p.name.endswith(STRIP_SUFFIXES):  # False when gone with its folder
            p.unlink()


def write_tar(src: Path, dest: Path) -> None:
    with tarfile.open(dest, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        tar.add(src, arcname=src.name)


def build(args: argparse.Namespace) -> dict:
    """Resolves, installs, strips and packs the bundle into ``args.out``; what MANIFEST says."""
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = IMAGE_HAS - ALSO_BUNDLE - {canonical(n) for n in args.also}
        constraints = pinned_constraints(args.constraints, tmp, image)
        resolved = resolve(args.python_version, constraints, tmp)
        wanted = [(n, v) for n, v in resolved if n not in image | SKIP_PACKAGES]
        site = tmp / "gpu-bundle" / "site"
        install(wanted, site, args.python_version)
        unpacked = tree_size(site)
        strip(site)
        kept = tree_size(site)
        write_tar(site.parent, args.out / "bundle.tar.xz")
    return {"resolved": resolved, "wanted": wanted, "image": image, "unpacked": unpacked,
            "kept": kept, "seconds": time.time() - t0}  # fmt: skip


def manifest(args: argparse.Namespace, built: dict, size: int) -> list[str]:
    """MANIFEST.txt: the bundle's size, its packages and versions, and what was left out."""
    return [
        f"# benchmarks/gpu_bundle.py for Python {args.python_version}, manylinux x86_64",
        f"# bundle.tar.xz: {size / 2**20:.1f} MiB (xz -9e); unpacks to gpu-bundle/site/, "
        f"{built['kept'] / 2**20:.1f} MiB ({built['unpacked'] / 2**20:.1f} MiB before stripping "
        f"{', '.join(STRIP_DIRS + sorted(STRIP_DIR_NAMES))}, *{', *'.join(STRIP_SUFFIXES)})",
        f"# built in {built['seconds']:.0f}s",
        "# use: tar -xJf bundle.tar.xz -C /tmp && PYTHONPATH=/tmp/gpu-bundle/site python3 ...",
        "",
        "## bundled (name version)",
        *(f"{n} {v}" for n, v in built["wanted"]),
        "",
        "## required but taken from the GPU image (version resolved here; the image's own is used)",
        *(f"{n} {v}" for n, v in built["resolved"] if n in built["image"]),
        "",
        "## required but left out (never loaded by a Python job)",
        *(f"{n} {v}" for n, v in built["resolved"] if n in SKIP_PACKAGES),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu-bundle")
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    p.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    p.add_argument("--also", action="append", default=[], metavar="NAME",
                   help="bundle this package even though the image has it (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    built = build(args)
    bundle = args.out / "bundle.tar.xz"
    size = bundle.stat().st_size
    lines = manifest(args, built, size)
    (args.out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4]))
    if size > LIMIT_MIB * 2**20:
        bundle.unlink()
        print(f"error: the bundle is {size / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB limit "
              f"(a device call carries 64 MiB); see {args.out / 'MANIFEST.txt'}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
