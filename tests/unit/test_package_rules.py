"""The layout's rules, read from the source (imports by AST, function lengths) and checked by
importing in a fresh interpreter: what each folder may import, that the jobs are doors, that
nothing imports ``jobs``. Each checker is also run on a planted violation, so a rule that
stopped seeing its violations fails here too."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ROOT

#: pipelines/__init__.py's order: each sub-package may import the ones before it, never after.
LAYERS = ("core", "storage", "runtime", "data", "inference", "registry", "training", "labeling")
TORCH = ("torch", "torchvision", "fcn_models")
#: The doors and the modules each may import from the project (besides jobs._cli).
DOORS = {
    "jobs/ingest.py": {"pipelines.data.workflow"},
    "jobs/train.py": {"pipelines.training.workflow"},
    "jobs/label.py": {"pipelines.labeling.workflow"},
    "jobs/promote.py": {"pipelines.registry.workflow"},
    # The demo runs the other jobs as a user would, on data it makes, and shows the result.
    "jobs/demo.py": {
        "jobs.ingest",
        "jobs.train",
        "jobs.promote",
        "jobs.label",
        "pipelines.data.synthetic",
        "pipelines.labeling.output",
        "pipelines.runtime.cluster",
    },  # fmt: skip
}
MAX_FUNCTION_LINES = 80
MAX_DOOR_LINES = 150
MAX_BENCHMARK_LINES = 1800
#: The one training step and the one evaluation (and the plain peer scripts the benchmarks
#: compare against, which stand for what a user would write instead).
ENGINE = {"pipelines/training/engine.py", "pipelines/inference/evaluate.py",
          "benchmarks/plain_scripts.py"}  # fmt: skip


# -- reading imports -------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, source: str, top_level: bool = False) -> Iterator[tuple[str, int]]:
    """``(module, line)`` for each import in ``source`` (relative ones resolved). With
    ``top_level``, only what runs when the module is imported: not inside functions, not under
    ``if TYPE_CHECKING:``."""
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]

    def visit(node: ast.AST) -> Iterator[tuple[str, int]]:
        if top_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if top_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (i for child in node.orelse for i in visit(child))
            return
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = (".".join(base + [node.module]) if node.level else node.module) or ".".join(
                base
            )
            # ``from jobs import _cli`` imports the module jobs._cli; ``from x import name``, x.
            for alias in node.names:
                sub = ROOT.joinpath(*module.split("."), alias.name)
                submodule = sub.with_suffix(".py").exists() or sub.is_dir()
                yield (f"{module}.{alias.name}" if submodule else module), node.lineno
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(ast.parse(source))


def sources(folder: str) -> dict[Path, str]:
    return {p: p.read_text() for p in sorted((ROOT / folder).rglob("*.py"))}


def is_under(module: str, *roots: str) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


# -- the rules, as checkers returning their violations ---------------------------------------------
def layer_violations(files: dict[Path, str]) -> list[str]:
    found = []
    for path, source in files.items():
        parts = path.relative_to(ROOT).parts
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        own = LAYERS.index(parts[1])
        for module, line in imports(path, source):
            target = module.split(".")
            layered = target[0] == "pipelines" and len(target) > 1 and target[1] in LAYERS
            if layered and LAYERS.index(target[1]) > own:
                found.append(f"{where(path, line)}: {parts[1]} imports {module}")
    return found


def forbidden_imports(
    files: dict[Path, str], banned: tuple[str, ...], *, top_level: bool = False,
    folders: tuple[str, ...] | None = None,
) -> list[str]:  # fmt: skip
    """Imports of ``banned`` in ``files`` (only those under ``pipelines/<folders>`` if given)."""
    found = []
    for path, source in files.items():
        if folders is not None and path.relative_to(ROOT).parts[1] not in folders:
            continue
        for module, line in imports(path, source, top_level):
            if is_under(module, *banned):
                found.append(f"{where(path, line)}: imports {module}")
    return found


def jobs_importers(files: dict[Path, str]) -> list[str]:
    return forbidden_imports(files, ("jobs",))


def door_violations(files: dict[Path, str]) -> list[str]:
    found = []
    for path, source in files.items():
        rel = str(path.relative_to(ROOT))
        if rel not in DOORS:
            continue
        allowed = DOORS[rel] | {"jobs._cli"}
        for module, line in imports(path, source):
            project = is_under(module, "pipelines", "jobs", "fcn_models")
            if project and module not in allowed:
                found.append(f"{where(path, line)}: a door imports {module}")
        if len(source.splitlines()) > MAX_DOOR_LINES:
            found.append(f"{rel}: {len(source.splitlines())} lines (a door is a page)")
    return found


def long_functions(files: dict[Path, str]) -> list[str]:
    return [
        f"{where(path, node.lineno)}: {node.name} is {node.end_lineno - node.lineno + 1} lines"
        for path, source in files.items()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def loops_outside_the_engine(files: dict[Path, str]) -> list[str]:
    """A backward pass (a training step) or a confusion matrix summed (an evaluation) anywhere
    but in the engine."""
    found = []
    for path, source in files.items():
        if str(path.relative_to(ROOT)) in ENGINE:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.endswith(".backward") or name.split(".")[-1] == "confusion_matrix":
                    found.append(f"{where(path, node.lineno)}: calls {name}")
    return found


def oversized(files: dict[Path, str], limit: int) -> list[str]:
    total = sum(len(source.splitlines()) for source in files.values())
    return (
        [f"{where(min(files), 1)}: {total} lines in all (at most {limit})"] if total > limit else []
    )


PIPELINES, JOBS, MODELS = sources("pipelines"), sources("jobs"), sources("fcn_models")
BENCHMARKS = sources("benchmarks")


def test_each_sub_package_imports_only_the_ones_before_it():
    assert layer_violations(PIPELINES) == []


def test_labeling_and_data_import_no_torch_anywhere():
    assert forbidden_imports(PIPELINES, TORCH, folders=("labeling", "data")) == []


def test_core_and_inference_import_no_ray_at_module_level():
    assert (
        forbidden_imports(PIPELINES, ("ray",), top_level=True, folders=("core", "inference")) == []
    )


def test_fcn_models_is_pure_pytorch():
    banned = ("ray", "mlflow", "pyarrow", "s3fs", "fsspec", "boto3", "pipelines", "jobs")
    assert forbidden_imports(MODELS, banned) == []


def test_nothing_imports_jobs():
    assert jobs_importers({**PIPELINES, **MODELS, **sources("benchmarks")}) == []


def test_each_job_is_a_door_onto_one_workflow():
    assert set(DOORS) | {"jobs/__init__.py", "jobs/_cli.py"} == {
        str(p.relative_to(ROOT)) for p in JOBS
    }, "a new job needs its row in DOORS"
    assert door_violations(JOBS) == []


def test_no_function_is_longer_than_a_screen():
    assert long_functions({**PIPELINES, **JOBS, **BENCHMARKS}) == []


def test_one_training_step_and_one_evaluation():
    assert loops_outside_the_engine({**PIPELINES, **JOBS, **BENCHMARKS}) == []


def test_the_benchmarks_stay_a_set_worth_rerunning():
    assert oversized(BENCHMARKS, MAX_BENCHMARK_LINES) == []


@pytest.mark.parametrize(
    ("check", "rel", "planted"),
    [
        (layer_violations, "pipelines/core/labels.py", "from pipelines.training import loop\n"),
        (layer_violations, "pipelines/data/shards.py", "from ..registry import versions\n"),
        (lambda f: forbidden_imports(f, TORCH, folders=("labeling",)),
         "pipelines/labeling/stages.py", "def f():\n    import torch.nn\n"),
        (lambda f: forbidden_imports(f, ("ray",), top_level=True, folders=("inference",)),
         "pipelines/inference/actors.py", "try:\n    import ray.data\nexcept ImportError:\n    pass\n"),
        (jobs_importers, "pipelines/runtime/cluster.py", "from jobs._cli import load_config\n"),
        (door_violations, "jobs/train.py", "from pipelines.training.loop import start\n"),
        (long_functions, "pipelines/core/frames.py",
         "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES),
        (loops_outside_the_engine, "pipelines/training/loop.py", "def f(loss):\n    loss.backward()\n"),
        (loops_outside_the_engine, "benchmarks/bench_models.py",
         "def f(p, y):\n    return metrics.confusion_matrix(p, y, 8)\n"),
        (lambda f: oversized(f, len((ROOT / "benchmarks/bench_models.py").read_text().splitlines()) + 1),
         "benchmarks/bench_models.py", "x = 1\n"),
    ],
)  # fmt: skip
def test_each_rule_reports_a_planted_violation(check, rel, planted):
    path = ROOT / rel
    files = {path: path.read_text() + "\n" + planted}
    assert check({path: path.read_text()}) == []
    [violation] = check(files)
    assert violation.startswith(rel + ":")


def test_lazy_imports_are_ignored_at_module_level_only():
    path = ROOT / "pipelines/inference/x.py"
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\ndef f():\n    import ray.data\n"
    assert [m for m, _ in imports(path, source, top_level=True)] == ["typing"]
    assert [m for m, _ in imports(path, source)] == ["typing", "ray", "ray.data"]


def loaded_after(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after ``statement``, beyond Python's."""
    code = f"import sys; before = set(sys.modules); {statement}; " \
           "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_the_labeling_driver_and_ingest_load_no_torch():
    """The labeling job's driver runs on a CPU head, and its load and encode tasks import
    pipelines.labeling.stages in their worker processes: PyTorch would add 1-3 s to each one's
    start on a busy node (benchmarks/RESULTS.md). The model stage imports inference inside
    its actor."""
    loaded = loaded_after("import jobs.label, jobs.ingest, pipelines.labeling.stages")
    assert "pyarrow" in loaded and "torch" not in loaded
    assert "torch" in loaded_after("import pipelines.inference.actors")


def test_core_and_inference_load_no_ray():
    loaded = loaded_after(
        "import pipelines.core.frames, pipelines.core.metrics, pipelines.inference.predictor, "
        "pipelines.inference.model_dir, pipelines.inference.evaluate"
    )
    assert "torch" in loaded and "ray" not in loaded
