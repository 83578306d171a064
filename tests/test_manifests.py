"""The deployment files (infra/k8s/*.yaml, infra/docker/Dockerfile) must agree with the code.

Nothing here talks to a cluster or the network: the manifests are parsed as YAML and checked
against what the code and the installed tools really accept. Every `python -m jobs.X ...`
command is validated against that job's own `build_parser()`, so renaming or removing a flag
in a job fails here instead of in the first scheduled run on Kubernetes. The checker
functions return lists of problems (rather than asserting) so that the negative tests below
can feed them broken input and see the problem reported.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import io
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
K8S_README = K8S / "README.md"
CONFIG_FILE = K8S / "config.yaml"
JOBS_DIR = ROOT / "jobs"

# Kinds whose containers run the project image (the MLflow Deployment runs MLflow's own).
PROJECT_IMAGE_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService", "CronJob", "Job"}
# Where the arguments of a job end in a shell line: command separators and redirections.
SHELL_SEPARATORS = {"&&", "||", ";", "|", ">", ">>", "<", "2>", "2>&1", "&>"}
PLACEHOLDER = "CHANGE-ME"
# MLflow's registry URIs as the jobs accept them (pipelines/registry.py): NAME@ALIAS,
# NAME/VERSION or NAME/latest; names and aliases restricted to what MLflow allows.
MODEL_URI = re.compile(
    r"^models:/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<alias>[A-Za-z_][\w-]*)|/(?P<version>[1-9]\d*|latest))$"
)


# -- loading --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Doc:
    """One YAML document of a manifest file."""

    source: str
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name", ""))

    @property
    def where(self) -> str:
        return f"{self.source}#{self.index} {self.kind}/{self.name}"


def parse_docs(text: str, source: str) -> list[Doc]:
    # safe_load_all: multi-document files; empty documents (a trailing ---) are skipped.
    docs = []
    for index, body in enumerate(yaml.safe_load_all(text)):
        if body is None:
            continue
        assert isinstance(body, dict), f"{source}#{index}: a manifest must be a mapping"
        docs.append(Doc(source, index, body))
    return docs


@cache
def manifest_docs() -> tuple[Doc, ...]:
    files = sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])
    return tuple(d for f in files for d in parse_docs(f.read_text(), f.name))


def walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) below ``node``, the node itself first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, str(i)))


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"(?m)^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text()))


def dockerfile_workdir() -> str:
    workdirs = re.findall(r"(?m)^WORKDIR\s+(\S+)", DOCKERFILE.read_text())
    assert workdirs, "infra/docker/Dockerfile has no WORKDIR"
    return workdirs[-1]


def readme_commands(text: str) -> list[list[str]]:
    """Shell commands of the fenced code blocks (```bash, ```sh, ```shell or no language),
    with backslash continuations joined. Fences are paired line by line: a regex over the
    whole text would take a closing fence for an opening one and read prose as shell."""
    commands, block, language = [], [], None
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and language is None:
            language, block = fence[1], []
        elif fence:
            if language in ("", "bash", "sh", "shell"):
                for command in "\n".join(block).replace("\\\n", " ").splitlines():
                    with contextlib.suppress(ValueError):  # not shell (e.g. a table): ignore
                        argv = shlex.split(command, comments=True)
                        if argv:
                            commands.append(argv)
            language = None
        elif language is not None:
            block.append(line)
    return commands


# -- job commands -----------------------------------------------------------------------------
@dataclass(frozen=True)
class JobCall:
    module: str
    args: tuple[str, ...]
    where: str


def calls_in_argv(argv: list[str], where: str) -> list[JobCall]:
    """`python -m jobs.X ARGS` inside one argv; ARGS end at a shell separator."""
    calls = []
    for i in range(len(argv) - 2):
        if (
            Path(argv[i]).name.startswith("python")
            and argv[i + 1] == "-m"
            and argv[i + 2].startswith("jobs.")
        ):
            args: list[str] = []
            for token in argv[i + 3 :]:
                if token in SHELL_SEPARATORS:
                    break
                args.append(token)
            calls.append(JobCall(argv[i + 2], tuple(args), where))
    return calls


def argvs_in(docs: Iterable[Doc]) -> Iterator[tuple[list[str], str]]:
    """Every command line of the manifests: container command + args, RayJob entrypoints (a
    shell string), and any other string that mentions a job."""
    for doc in docs:
        for path, value in walk(doc.body):
            where = f"{doc.where} .{'.'.join(path)}"
            if isinstance(value, dict) and ("command" in value or "args" in value):
                argv = [*(value.get("command") or []), *(value.get("args") or [])]
                if all(isinstance(x, str) for x in argv):
                    yield argv, where
            elif isinstance(value, str) and ("jobs." in value or "ray job" in value):
                try:
                    yield shlex.split(value), where
                except ValueError as e:
                    yield [f"<unparsable shell: {e}>"], where


def job_calls(docs: Iterable[Doc]) -> list[JobCall]:
    found: dict[tuple[str, tuple[str, ...], str], JobCall] = {}
    for argv, where in argvs_in(docs):
        for call in calls_in_argv(argv, where):
            found.setdefault((call.module, call.args, call.where.split(" .")[0]), call)
    return list(found.values())


@cache
def job_parser(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def parse_job_args(call: JobCall) -> argparse.Namespace:
    """The job's options as it will see them; a command it rejects fails the calling test
    with the checker's message (instead of argparse's bare SystemExit)."""
    problems = check_job_call(call)
    assert not problems, "\n".join(problems)
    return job_parser(call.module).parse_args(list(call.args))


def check_job_call(call: JobCall) -> list[str]:
    """Problems with one `python -m jobs.X ...` command; empty when the job accepts it."""
    name = call.module.removeprefix("jobs.")
    if "." in name or name.startswith("_") or not (JOBS_DIR / f"{name}.py").is_file():
        return [f"{call.where}: {call.module} is not a job module in jobs/"]
    if not hasattr(importlib.import_module(call.module), "build_parser"):
        return [f"{call.where}: {call.module} has no build_parser()"]
    parser = job_parser(call.module)
    options = parser._option_string_actions
    problems = []
    given: set[str] = set()
    for token in call.args:
        if token == "--":
            break
        if not token.startswith("-") or re.fullmatch(r"-\d+(\.\d*)?", token):
            continue
        flag = token.split("=", 1)[0]
        action = options.get(flag)
        # Exact names only: argparse would also accept an abbreviation, which silently
        # changes meaning the day a longer flag with the same prefix is added.
        if action is None:
            problems.append(f"{call.where}: {call.module} has no option {flag}")
        elif action.help == argparse.SUPPRESS:
            problems.append(f"{call.where}: {flag} is a hidden (testing) option of {call.module}")
        else:
            given.add(action.dest)
    if "config" not in given:  # with --config FILE the file may supply required options
        for action in parser._actions:
            if action.required and action.dest not in given:
                problems.append(
                    f"{call.where}: {call.module} requires {'/'.join(action.option_strings)}"
                )
    if not problems:
        # Let argparse check the values (types, choices) exactly as the job will.
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                parser.parse_args(list(call.args))
            except SystemExit:
                message = stderr.getvalue().strip().splitlines()[-1:] or ["rejected"]
                problems.append(f"{call.where}: {call.module}: {message[0]}")
    return problems


def check_model_uri(uri: str, where: str) -> list[str]:
    if MODEL_URI.match(uri):
        return []
    return [
        f"{where}: {uri!r} is not models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest"
    ]


def model_uris(docs: Iterable[Doc]) -> list[tuple[str, str]]:
    uris = []
    for doc in docs:
        for path, value in walk(doc.body):
            if isinstance(value, str) and "models:" in value:
                for token in shlex.split(value):
                    if token.startswith("models:"):
                        uris.append((token, f"{doc.where} .{'.'.join(path)}"))
    return uris


# -- Secrets and ConfigMaps -------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    kind: str  # "Secret" or "ConfigMap"
    name: str
    key: str | None  # None: the whole object (envFrom, volumes)
    optional: bool
    where: str


def references(docs: Iterable[Doc]) -> list[Ref]:
    refs = []
    for doc in docs:
        for path, value in walk(doc.body):
            if not isinstance(value, dict):
                continue
            where = f"{doc.where} .{'.'.join(path)}"
            for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if isinstance(value.get(field), dict):
                    ref = value[field]
                    refs.append(
                        Ref(kind, ref["name"], ref["key"], bool(ref.get("optional")), where)
                    )
            for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                if isinstance(value.get(field), dict):
                    ref = value[field]
                    refs.append(Ref(kind, ref["name"], None, bool(ref.get("optional")), where))
            if isinstance(value.get("secret"), dict) and "secretName" in value["secret"]:
                refs.append(Ref("Secret", value["secret"]["secretName"], None, False, where))
            if isinstance(value.get("configMap"), dict) and "name" in value["configMap"]:
                refs.append(Ref("ConfigMap", value["configMap"]["name"], None, False, where))
            # KubeRay reads a user-provided token Secret under the key `auth_token`.
            if path[-1:] == ("authOptions",) and value.get("secretName"):
                refs.append(Ref("Secret", value["secretName"], "auth_token", False, where))
    return refs


def defined_config(docs: Iterable[Doc]) -> dict[tuple[str, str], set[str]]:
    defined = {}
    for doc in docs:
        if doc.kind in ("Secret", "ConfigMap"):
            keys = {*(doc.body.get("data") or {}), *(doc.body.get("stringData") or {})}
            defined[(doc.kind, doc.name)] = keys
    return defined


def check_references(refs: Iterable[Ref], defined: dict[tuple[str, str], set[str]]) -> list[str]:
    problems = []
    for ref in refs:
        keys = defined.get((ref.kind, ref.name))
        if keys is None:
            if not ref.optional:
                problems.append(
                    f"{ref.where}: {ref.kind} {ref.name!r} is not defined in config.yaml"
                )
        elif ref.key is not None and ref.key not in keys and not ref.optional:
            problems.append(f"{ref.where}: {ref.kind} {ref.name!r} has no key {ref.key!r}")
    return problems


# -- helpers over the real manifests ----------------------------------------------------------
def docs_of(kind: str) -> list[Doc]:
    return [d for d in manifest_docs() if d.kind == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """RayCluster specs wherever they appear (RayCluster, RayJob, RayCronJob templates)."""
    return [
        (f"{d.where} .{'.'.join(p)}", v)
        for d in manifest_docs()
        for p, v in walk(d.body)
        if isinstance(v, dict) and "headGroupSpec" in v
    ]


def ray_job_submits() -> list[tuple[list[str], str]]:
    """`ray job submit` options (before `--`) of the manifests."""
    found = []
    for argv, where in argvs_in(manifest_docs()):
        for i in range(len(argv) - 2):
            if argv[i : i + 3] == ["ray", "job", "submit"]:
                rest = argv[i + 3 :]
                found.append((rest[: rest.index("--")] if "--" in rest else rest, where))
    return found


def option_value(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def gpus_of(cluster_spec: dict) -> int:
    total = 0
    for group in cluster_spec.get("workerGroupSpecs") or []:
        for container in group["template"]["spec"]["containers"]:
            limits = (container.get("resources") or {}).get("limits") or {}
            total += int(limits.get("nvidia.com/gpu", 0)) * int(group.get("replicas", 0))
    return total


# -- the real manifests -----------------------------------------------------------------------
def test_manifests_exist_and_have_identity() -> None:
    docs = manifest_docs()
    assert docs, "no manifests under infra/k8s"
    kinds = {d.kind for d in docs}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "Service"} <= kinds
    for doc in docs:
        assert doc.body.get("apiVersion"), f"{doc.where}: no apiVersion"
        assert doc.kind, f"{doc.where}: no kind"
        assert doc.name, f"{doc.where}: no metadata.name"
        if doc.kind.startswith("Ray"):
            assert doc.body["apiVersion"] == "ray.io/v1", f"{doc.where}: KubeRay 1.7 is ray.io/v1"
    names = [(d.kind, d.name) for d in docs]
    assert len(names) == len(set(names)), "two manifests define the same object"


def test_job_commands_are_found() -> None:
    # Guards the checks below against passing vacuously if extraction breaks.
    modules = {c.module for c in job_calls(manifest_docs())}
    assert {"jobs.train", "jobs.label"} <= modules


def test_job_commands_match_their_parsers() -> None:
    calls = job_calls(manifest_docs())
    calls += [
        c
        for argv in readme_commands(K8S_README.read_text())
        for c in calls_in_argv(argv, "infra/k8s/README.md")
    ]
    problems = [p for c in calls for p in check_job_call(c)]
    assert not problems, "\n".join(problems)


def test_readme_and_crontab_commands_match_their_parsers() -> None:
    """The user's manual and the plain-cluster schedule run the jobs too: their concrete
    commands (```bash blocks; synopses are ```text) must name real jobs and flags."""
    readme = ROOT / "README.md"
    calls = [
        c for argv in readme_commands(readme.read_text()) for c in calls_in_argv(argv, "README.md")
    ]
    assert {"jobs.ingest", "jobs.train", "jobs.promote", "jobs.label"} <= {c.module for c in calls}
    crontab = ROOT / "infra/cron/label.crontab"
    cron_lines = [
        line for line in crontab.read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    cron_calls = [c for line in cron_lines for c in calls_in_argv(shlex.split(line), crontab.name)]
    assert [c.module for c in cron_calls] == ["jobs.label"]
    problems = [p for c in calls + cron_calls for p in check_job_call(c)]
    assert not problems, "\n".join(problems)


def test_model_uris_are_well_formed_and_name_the_trained_model() -> None:
    uris = model_uris(manifest_docs())
    assert uris, "no models:/ URI in the manifests (the labeling schedule needs one)"
    problems = [p for uri, where in uris for p in check_model_uri(uri, where)]
    assert not problems, "\n".join(problems)
    # Labeling must use the registered model that training produces.
    calls = job_calls(manifest_docs())
    registered = {parse_job_args(c).register_as for c in calls if c.module == "jobs.train"}
    labeled = {
        MODEL_URI.match(parse_job_args(c).model)["name"] for c in calls if c.module == "jobs.label"
    }
    assert registered and labeled <= registered, (labeled, registered)


def test_referenced_secrets_and_configmaps_are_defined() -> None:
    config = parse_docs(CONFIG_FILE.read_text(), CONFIG_FILE.name)
    problems = check_references(references(manifest_docs()), defined_config(config))
    assert not problems, "\n".join(problems)


def documented_secrets(text: str) -> dict[str, set[str]]:
    """Secret name -> keys of the `kubectl create secret generic` commands in ``text`` (shell
    or YAML comments, backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = {}
    for line in joined.splitlines():
        if m := re.search(r"create secret generic ([\w.-]+)(.*)", line):
            found[m[1]] = set(re.findall(r"--from-literal=([\w.-]+)=", m[2]))
    return found


def test_documented_kubectl_secrets_match_config() -> None:
    # The `kubectl create secret` commands in the docs must create the keys the manifests read.
    defined = defined_config(parse_docs(CONFIG_FILE.read_text(), CONFIG_FILE.name))
    for source in (CONFIG_FILE, K8S_README):
        documented = documented_secrets(source.read_text())
        assert documented, f"{source.name}: no kubectl create secret command documented"
        for name, keys in documented.items():
            assert keys == defined.get(("Secret", name)), (source.name, name, keys)


def test_example_secrets_hold_placeholders_only() -> None:
    for doc in docs_of("Secret"):
        assert "data" not in doc.body, f"{doc.where}: example Secrets use stringData placeholders"
        values = set((doc.body.get("stringData") or {}).values())
        assert values == {PLACEHOLDER}, f"{doc.where}: real values must not be committed"


def test_one_project_image_everywhere() -> None:
    images = {
        v["image"]
        for d in manifest_docs()
        if d.kind in PROJECT_IMAGE_KINDS
        for _, v in walk(d.body)
        if isinstance(v, dict) and "image" in v and "name" in v
    }
    assert len(images) == 1, f"the Ray pods and job clients must share one image: {images}"
    # The README builds the image under the same name.
    tags = {
        option_value(a, "-t")
        for a in readme_commands(K8S_README.read_text())
        if a[:2] == ["docker", "build"]
    }
    assert tags == images, (tags, images)


def test_versions_match_the_image_and_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    args = dockerfile_args()
    ray_versions = {spec.get("rayVersion") for _, spec in ray_cluster_specs()}
    assert ray_versions == {args["RAY_VERSION"]}, (ray_versions, args["RAY_VERSION"])
    # The MLflow server speaks the same MLflow version as the clients in the image.
    mlflow_images = {
        v["image"]
        for d in docs_of("Deployment")
        for _, v in walk(d.body)
        if isinstance(v, dict) and "image" in v
    }
    assert all(
        re.search(rf":v{re.escape(args['MLFLOW_VERSION'])}(-full)?$", i) for i in mlflow_images
    ), (mlflow_images, args["MLFLOW_VERSION"])
    # The pins of the image must satisfy the project's own requirements.
    requirements = {
        r.name: r
        for r in map(
            Requirement,
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"],
        )
    }
    for package, arg in (
        ("torch", "TORCH_VERSION"),
        ("ray", "RAY_VERSION"),
        ("mlflow", "MLFLOW_VERSION"),
    ):
        assert requirements[package].specifier.contains(args[arg]), (package, args[arg])


def test_ray_clusters_use_token_auth() -> None:
    specs = ray_cluster_specs()
    assert len(specs) >= 3  # the RayCluster and the RayJob / RayCronJob templates
    for where, spec in specs:
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{where}: token auth off"


def test_training_cluster_has_a_gpu_per_worker() -> None:
    for doc in manifest_docs():
        for _, spec in walk(doc.body):
            if not (isinstance(spec, dict) and "entrypoint" in spec and "rayClusterSpec" in spec):
                continue
            for call in calls_in_argv(shlex.split(spec["entrypoint"]), doc.where):
                args = parse_job_args(call)
                if call.module == "jobs.train" and args.use_gpu:
                    gpus = gpus_of(spec["rayClusterSpec"])
                    assert gpus >= args.num_workers, (
                        f"{doc.where}: {gpus} GPUs for {args.num_workers} workers"
                    )


def test_ray_job_submit_targets_the_cluster_from_the_image_workdir() -> None:
    from ray.dashboard.modules.job.cli import submit

    known = {opt for param in submit.params for opt in param.opts}
    submits = ray_job_submits()
    assert submits, "cronjob-label.yaml should submit with `ray job submit`"
    clusters = {d.name: d.body["spec"] for d in docs_of("RayCluster")}
    for options, where in submits:
        unknown = [
            o.split("=")[0] for o in options if o.startswith("-") and o.split("=")[0] not in known
        ]
        assert not unknown, f"{where}: `ray job submit` has no {unknown}"
        # The uploaded working dir is the image's copy of the repository.
        working_dir = option_value(options, "--working-dir")
        if working_dir and working_dir.startswith("/"):
            assert working_dir == dockerfile_workdir(), (where, working_dir)
        # The address is a KubeRay head Service (NAME-head-svc) on its dashboard port.
        address = urlparse(option_value(options, "--address") or "")
        cluster = (address.hostname or "").removesuffix("-head-svc")
        assert cluster in clusters, f"{where}: {address.geturl()} is not a RayCluster head Service"
        head = clusters[cluster]["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert address.port == ports["dashboard"], (where, address.port, ports)


def allowed_host(allowed: list[str], host: str) -> bool:
    try:  # the server's own matcher, when this MLflow version has it
        from mlflow.server.security_utils import is_allowed_host_header
    except ImportError:
        return "*" in allowed or any(
            fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed
        )
    return is_allowed_host_header(allowed, host)


def test_mlflow_server_is_reachable_under_the_configured_uri() -> None:
    from mlflow.cli import server

    config = {d.name: d.body.get("data") or {} for d in docs_of("ConfigMap")}
    uri = urlparse(config["lane-config"]["MLFLOW_TRACKING_URI"])
    services = {d.name: d.body["spec"] for d in docs_of("Service")}
    assert uri.hostname in services, f"no Service {uri.hostname!r} for {uri.geturl()}"
    service_ports = {p["port"] for p in services[uri.hostname]["ports"]}
    assert uri.port in service_ports, (uri.port, service_ports)

    containers = [
        v
        for d in docs_of("Deployment")
        for _, v in walk(d.body)
        if isinstance(v, dict) and v.get("command", [])[:2] == ["mlflow", "server"]
    ]
    assert len(containers) == 1
    args = containers[0]["args"]
    known = {opt for param in server.params for opt in param.opts}
    unknown = [a for a in args if a.startswith("-") and a not in known]
    assert not unknown, f"`mlflow server` has no {unknown}"
    assert option_value(args, "--port") == str(uri.port)
    # MLflow 3 answers 403 to Host headers outside --allowed-hosts (default: localhost and
    # private IPs only), which would lock out the in-cluster clients.
    allowed = (option_value(args, "--allowed-hosts") or "").split(",")
    assert allowed != [""], "--allowed-hosts is needed for the in-cluster Service name"
    for host in (
        uri.netloc,
        f"{uri.hostname}.lanes.svc.cluster.local:{uri.port}",
        "localhost:5000",
    ):
        assert allowed_host(allowed, host), f"Host {host!r} would be rejected by MLflow"
    assert not allowed_host(allowed, "attacker.example:5000")


# -- the checkers catch real mistakes ---------------------------------------------------------
FAKE_RAYJOB = """
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: fake
spec:
  entrypoint: >-
    python -m jobs.train --data s3://b/d --experiment e --register-as m --storage s3://b/c
    --num-worker 4 --bogus-flag 1
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: fake-cron
spec:
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: submit
              image: lane-fcn:latest
              command: ["ray", "job", "submit"]
              args: ["--", "python", "-m", "jobs.label", "--input", "a", "--model", "models:/m@champion"]
              env:
                - name: RAY_AUTH_TOKEN
                  valueFrom:
                    secretKeyRef: {name: lane-ray-token, key: token}
"""


def test_checker_reports_renamed_and_unknown_flags() -> None:
    calls = job_calls(parse_docs(FAKE_RAYJOB, "fake.yaml"))
    problems = "\n".join(p for c in calls for p in check_job_call(c))
    assert "jobs.train has no option --bogus-flag" in problems
    # An abbreviation is not accepted even though argparse itself would take it.
    assert "jobs.train has no option --num-worker" in problems
    # Found inside a container's args list too, with its missing required option.
    assert "jobs.label requires --output" in problems


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("jobs.nope", (), "not a job module"),
        ("jobs._cli", (), "not a job module"),
        (
            "jobs.train",
            (
                "--data",
                "d",
                "--experiment",
                "e",
                "--register-as",
                "m",
                "--storage",
                "s",
                "--model",
                "fcn99",
            ),
            "invalid choice",
        ),
        (
            "jobs.label",
            ("--input", "a", "--output", "b", "--model", "m", "--batch-size", "many"),
            "invalid int value",
        ),
        (
            "jobs.label",
            ("--input", "a", "--output", "b", "--model", "m", "--crash-at", "mid-commit"),
            "hidden",
        ),
    ],
)
def test_checker_reports_bad_commands(module: str, args: tuple[str, ...], expected: str) -> None:
    problems = check_job_call(JobCall(module, args, "fake"))
    assert any(expected in p for p in problems), problems


def test_checker_accepts_a_good_command() -> None:
    call = JobCall(
        "jobs.label", ("--input", "a", "--output", "b", "--model", "models:/m@champion"), "ok"
    )
    assert check_job_call(call) == []


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("models:/lanes-fcn8s@champion", True),
        ("models:/lanes-fcn8s/3", True),
        ("models:/lanes-fcn8s/latest", True),
        ("models:/lanes-fcn8s", False),
        ("models:/lanes-fcn8s@", False),
        ("models:/lanes-fcn8s/0", False),
        ("models:/a@b/c", False),
        ("models:lanes@champion", False),
    ],
)
def test_model_uri_check(uri: str, ok: bool) -> None:
    assert (check_model_uri(uri, "fake") == []) is ok


def test_reference_check_reports_missing_objects_and_keys() -> None:
    defined = {("Secret", "lane-ray-token"): {"auth_token"}, ("ConfigMap", "lane-config"): {"a"}}
    problems = check_references(references(parse_docs(FAKE_RAYJOB, "fake.yaml")), defined)
    assert any("has no key 'token'" in p for p in problems), problems
    missing = [
        Ref("Secret", "nope", None, False, "fake"),
        Ref("ConfigMap", "nope", "k", True, "fake"),
    ]
    assert check_references(missing, defined) == [
        "fake: Secret 'nope' is not defined in config.yaml"
    ]
