"""Ray and MLflow for a lent GPU machine that has neither: one ``bundle.tar.xz`` of a
site-packages tree that fits the 64 MiB a device call carries.

    python -m benchmarks.gpu_bundle [--out benchmarks/gpu-bundle] [--wheels DIR]
        [--python-version 3.12]

The GPU image (python3.12, PyTorch, torchvision, numpy, pandas, pyarrow, aiohttp, grpcio,
protobuf, ... : ``IMAGE_HAS`` below, from the device tool's KINDS.md) lacks Ray and MLflow, and
nothing can be installed there. This resolves ``ray[default,data,train]`` (the dashboard serves
the state API Ray Train queries), ``mlflow-skinny`` and SQLAlchemy + Alembic (the jobs' sqlite
tracking store; the skinny package lacks both) for that Python, at the versions pinned in
constraints.txt, for manylinux x86_64 wheels only; downloads the wheels of what the image lacks
(``--wheels`` is the cache: a wheel already there is not fetched again); unpacks them into one
tree; strips what no Python job loads (Ray's Java jar, the dashboard's JavaScript source maps,
RLlib, tests folders, the wheels' console scripts); and writes ``OUT/bundle.tar.xz`` (xz preset
9) and ``OUT/MANIFEST.txt`` (each package and version, what was stripped, sizes). Refuses, in
one line, a bundle over 60 MiB.

On the GPU machine (``benchmarks/gpu_jobs.sh`` does this)::

    mkdir -p /tmp/gpu-bundle && tar -xJf benchmarks/gpu-bundle/bundle.tar.xz -C /tmp/gpu-bundle
    PYTHONPATH=/tmp/gpu-bundle/site python3 -m jobs.train ...

The project's own source is not in the bundle: the device tool carries the working tree.
``--python-version 3.11`` builds the same bundle for this machine's Python, to check it here.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "gpu-bundle"
LIMIT_MIB = 60

# What the jobs need beyond the image. The sqlite store (``sqlite:///...``, what the demo and
# the benchmarks use) needs SQLAlchemy and Alembic, which mlflow-skinny does not pull in.
REQUIREMENTS = ["ray[default,data,train]", "mlflow-skinny", "sqlalchemy", "alembic"]

# Python packages of the device's 'cuda' image (KINDS.md, "Python packages already there", read
# on 2026-11-17): not bundled. Canonical names (PEP 503).
_IMAGE_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
    sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
IMAGE_HAS = set(_IMAGE_PACKAGES.split())

# In the image, but bundled all the same: googleapis-common-protos, proto-plus and google-api-core
# (the dashboard's metrics agent, via opencensus) need protobuf >= 6.33.5, newer than the image
# may have; the bundled one shadows the image's for the jobs alone (PYTHONPATH), and Ray's own
# generated code runs on any protobuf >= 3.20. ``--also NAME`` adds others.
ALSO_BUNDLE = {"protobuf"}

# Needed by the resolution but never loaded by a Python job: not bundled at all. py-spy is
# one binary the dashboard's profiler runs on request.
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
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


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


def wheel_for(wheels: Path, name: str, version: str) -> Path | None:
    for f in wheels.glob("*.whl"):
        parts = f.name.split("-")
        if canonical(parts[0]) == name and parts[1] == version:
            return f
    return None


def fetch(wanted: list[tuple[str, str]], wheels: Path, python_version: str) -> list[Path]:
    """The wheels of ``wanted``, downloaded into ``wheels`` where not there already."""
    missing = [f"{n}=={v}" for n, v in wanted if wheel_for(wheels, n, v) is None]
    if missing:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
            *pip_platform_args(python_version), *missing,
        ]  # fmt: skip
        run_pip(cmd)
    found = [wheel_for(wheels, n, v) for n, v in wanted]
    lost = [f"{n}=={v}" for (n, v), f in zip(wanted, found, strict=True) if f is None]
    if lost:
        raise SystemExit(f"error: no wheel downloaded for {', '.join(lost)}")
    return [f for f in found if f is not None]


def unpack(wheel: Path, site: Path) -> None:
    """A wheel's files into ``site``: its ``.data/purelib`` and ``platlib`` merged in, its
    scripts and headers left out (the jobs run as ``python -m``)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            top, _, rest = name.partition("/")
            if top.endswith(".data"):
                kind, _, rest = rest.partition("/")
                if kind not in ("purelib", "platlib") or not rest:
                    continue
                name = rest
            if name.endswith("/"):
                continue
            dest = site / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode | 0o600)


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def strip(site: Path) -> list[tuple[str, int]]:
    """Remove what no Python job loads; (path, bytes) of each removal."""
    removed: list[tuple[str, int]] = []

    def drop(p: Path) -> None:
        size = tree_size(p) if p.is_dir() else p.stat().st_size
        removed.append((str(p.relative_to(site)) + ("/" if p.is_dir() else ""), size))
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    for rel in STRIP_DIRS:
        if (site / rel).exists():
            drop(site / rel)
    for p in sorted(site.rglob("*"), key=lambda p: len(p.parts)):
        if not p.exists():  # inside a folder dropped already
            continue
        if (p.is_dir() and p.name in STRIP_DIR_NAMES) or (
            p.is_file() and p.name.endswith(STRIP_SUFFIXES)
        ):
            drop(p)
    return removed


def write_tar(src: Path, dest: Path) -> None:
    with (
        lzma.open(dest, "wb", preset=9 | lzma.PRESET_EXTREME) as xz,
        tarfile.open(fileobj=xz, mode="w") as tar,
    ):
        tar.add(src, arcname=src.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the bundle")
    p.add_argument("--wheels", type=Path, help="wheel cache (default OUT/wheels-PYVER)")
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    p.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME",
        help="bundle this package even though the image has it (repeatable)",
    )
    args = p.parse_args(argv)

    t0 = time.time()
    out: Path = args.out.resolve()
    wheels: Path = (args.wheels or out / f"wheels-{args.python_version}").resolve()
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image = IMAGE_HAS - ALSO_BUNDLE - {canonical(n) for n in args.also}
        constraints = pinned_constraints(args.constraints, tmp, image)
        resolved = resolve(args.python_version, constraints, tmp)
        wanted = [(n, v) for n, v in resolved if n not in image | SKIP_PACKAGES]
        from_image = [(n, v) for n, v in resolved if n in image]
        files = fetch(wanted, wheels, args.python_version)
        t_fetch = time.time() - t0

        site = tmp / "gpu-bundle" / "site"
        site.mkdir(parents=True)
        for f in files:
            unpack(f, site)
        unpacked = tree_size(site)
        removed = strip(site)
        kept = tree_size(site)
        bundle = out / "bundle.tar.xz"
        write_tar(site.parent, bundle)
    size = bundle.stat().st_size
    seconds = time.time() - t0

    manifest = [
        f"# benchmarks/gpu_bundle.py for Python {args.python_version}, manylinux x86_64",
        f"# bundle.tar.xz: {size / 2**20:.1f} MiB (xz -9e); unpacks to gpu-bundle/site/, "
        f"{kept / 2**20:.1f} MiB ({unpacked / 2**20:.1f} MiB before stripping)",
        f"# built in {seconds:.0f}s ({t_fetch:.0f}s resolving and fetching wheels)",
        "# use: tar -xJf bundle.tar.xz -C /tmp && PYTHONPATH=/tmp/gpu-bundle/site python3 ...",
        "",
        "## bundled (name version wheel)",
        *(f"{n} {v} {f.name}" for (n, v), f in zip(wanted, files, strict=True)),
        "",
        "## required but taken from the GPU image (version resolved here; the image's own is used)",
        *(f"{n} {v}" for n, v in from_image),
        "",
        "## required but left out (never loaded by a Python job)",
        *(f"{n} {v}" for n, v in resolved if n in SKIP_PACKAGES),
        "",
        "## stripped (path bytes)",
        *(f"{path} {b}" for path, b in removed if b >= 100_000 or path.endswith("/")),
        f"# and {sum(1 for path, b in removed if b < 100_000 and not path.endswith('/'))} "
        f"smaller files ({', '.join(STRIP_SUFFIXES)})",
    ]
    (out / "MANIFEST.txt").write_text("\n".join(manifest) + "\n")
    print("\n".join(manifest[:4]))
    if size > LIMIT_MIB * 2**20:
        bundle.unlink()
        print(
            f"error: the bundle is {size / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB limit "
            f"(a device call carries 64 MiB); see {out / 'MANIFEST.txt'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
