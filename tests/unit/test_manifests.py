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
import base64
import binascii
import contextlib
import fnmatch
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = DOCKERFILE.with_name("Dockerfile.dockerignore")
K8S_README = K8S / "README.md"
CONFIG_FILE = K8S / "config.yaml"
JOBS_DIR = ROOT / "jobs"

# Kinds whose containers run the project image (the MLflow Deployment runs MLflow's own).
PROJECT_IMAGE_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService", "CronJob", "Job"}
# Where the arguments of a job end in a shell line: command separators and redirections.
SHELL_SEPARATORS = {"&&", "||", ";", "|", ">", ">>", "<", "2>", "2>&1", "&>"}
# The namespace the docs deploy into (NetworkPolicy peers without namespaceSelector mean it),
# and the KubeRay operator's namespace that networkpolicy.yaml admits.
NAMESPACE = "lanes"
OPERATOR_NAMESPACE = "kuberay-system"
# MLflow's registry URIs as the jobs accept them (pipelines/registry/versions.py): NAME@ALIAS,
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


def documented_secrets(text: str) -> dict[str, set[str]]:
    """Secret name -> keys of the `kubectl create secret generic` commands in ``text`` (shell
    or YAML comments, backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = {}
    for line in joined.splitlines():
        if m := re.search(r"create secret generic ([\w.-]+)(.*)", line):
            found[m[1]] = set(re.findall(r"--from-literal=([\w.-]+)=", m[2]))
    return found


def created_config() -> dict[tuple[str, str], set[str]]:
    """What exists once infra/k8s/README.md has been followed: the ConfigMaps of config.yaml and
    the Secrets of its `kubectl create secret generic` commands (no Secret is kept in YAML)."""
    config = parse_docs(CONFIG_FILE.read_text(), CONFIG_FILE.name)
    created = {k: v for k, v in defined_config(config).items() if k[0] == "ConfigMap"}
    for name, keys in documented_secrets(K8S_README.read_text()).items():
        created[("Secret", name)] = keys
    return created


def check_references(refs: Iterable[Ref], defined: dict[tuple[str, str], set[str]]) -> list[str]:
    problems = []
    for ref in refs:
        keys = defined.get((ref.kind, ref.name))
        if keys is None:
            if not ref.optional:
                how = (
                    "created by a documented `kubectl create secret generic`"
                    if ref.kind == "Secret"
                    else "defined in config.yaml"
                )
                problems.append(f"{ref.where}: {ref.kind} {ref.name!r} is not {how}")
        elif ref.key is not None and ref.key not in keys and not ref.optional:
            problems.append(f"{ref.where}: {ref.kind} {ref.name!r} has no key {ref.key!r}")
    return problems


# -- credentials ------------------------------------------------------------------------------
# Values that mean "fill me in" or are tried first by anyone guessing: never a credential.
PLACEHOLDER_VALUES = {
    "...",
    "<password>",
    "<secret>",
    "admin",
    "changeit",
    "example",
    "minioadmin",
    "my-secret-key",
    "passwd",
    "password",
    "password1234",
    "root",
    "secret",
    "test",
    "todo",
    "xxx",
}
PLACEHOLDER_MARKERS = ("change-me", "changeme", "change_me", "replace-me", "replaceme")
# Env vars whose value is a credential (…_PATH / …_FILE name a file, not the value).
SECRET_ENV_NAME = re.compile(r"PASSWORD|SECRET|TOKEN(?!_PATH)|_KEY$", re.IGNORECASE)
MLFLOW_CLIENT_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def is_placeholder(value: object) -> bool:
    text = str(value).strip().strip("'\"").lower()
    return text in PLACEHOLDER_VALUES or any(m in text for m in PLACEHOLDER_MARKERS)


def env_entries(docs: Iterable[Doc]) -> Iterator[tuple[dict, str]]:
    """Every item of a container's `env` list, with where it is."""
    for doc in docs:
        for path, value in walk(doc.body):
            if len(path) >= 2 and path[-2] == "env" and isinstance(value, dict) and "name" in value:
                yield value, f"{doc.where} .{'.'.join(path)} {value['name']}"


def secret_ref(entry: dict | None) -> tuple[str, str] | None:
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def yaml_blocks(text: str) -> list[Doc]:
    """The ```yaml blocks of a Markdown text, as documents (unparsable ones are skipped)."""
    docs = []
    for i, block in enumerate(re.findall(r"(?ms)^\s*```ya?ml\s*$(.*?)^\s*```\s*$", text)):
        with contextlib.suppress(yaml.YAMLError, AssertionError):
            docs += parse_docs(block, f"yaml block {i}")
    return docs


def check_placeholders(docs: Iterable[Doc], texts: dict[str, str]) -> list[str]:
    """Placeholder values in Secret data, in env `value:`s and in the `--from-literal=` values of
    documented kubectl commands (a `$VAR` or `$(command)` value is generated: fine)."""
    docs = list(docs)
    for name, text in texts.items():
        if name.endswith(".md"):
            docs += yaml_blocks(text)
    problems = []
    for doc in docs:
        if doc.kind == "Secret":
            for field in ("stringData", "data"):
                for key, value in (doc.body.get(field) or {}).items():
                    if field == "data":
                        with contextlib.suppress(binascii.Error, ValueError):
                            value = base64.b64decode(str(value)).decode(errors="replace")
                    if is_placeholder(value):
                        problems.append(f"{doc.where} {field}.{key}: placeholder {value!r}")
    for entry, where in env_entries(docs):
        if "value" in entry and is_placeholder(entry["value"]):
            problems.append(f"{where}: placeholder value {entry['value']!r}")
    for name, text in texts.items():
        joined = re.sub(r"\\\n\s*#?\s*", " ", text)
        for key, value in re.findall(r"--from-literal=([\w.-]+)=(\"[^\"]*\"|'[^']*'|\S*)", joined):
            value = value.strip("'\"")
            if not value.startswith("$") and is_placeholder(value):
                problems.append(f"{name}: --from-literal={key}= placeholder {value!r}")
    return problems


def check_credential_literals(docs: Iterable[Doc], texts: dict[str, str]) -> list[str]:
    """Credentials written into manifests or docs: a literal `value:` for an env var named like
    a secret, an `admin_password = ...` that is not a `$VARIABLE`, MLflow's old default
    password, and the MLflow client credentials on a command line."""
    docs = list(docs)
    problems = []
    for entry, where in env_entries(docs):
        if "value" in entry and SECRET_ENV_NAME.search(entry["name"]):
            problems.append(f"{where}: literal value; take it from a secretKeyRef")
    strings = [(f"{d.where} .{'.'.join(p)}", v) for d in docs for p, v in walk(d.body)]
    for where, text in [*((w, v) for w, v in strings if isinstance(v, str)), *texts.items()]:
        for value in re.findall(r"(?m)^[\s#]*admin_password\s*=\s*(\S*)", text):
            if not value.startswith("$"):
                problems.append(f"{where}: admin_password = {value!r} is a literal")
        if "password1234" in text:
            problems.append(f"{where}: MLflow's former default admin password")
    for argv, where in argvs_in(docs):
        for token in argv:
            if any(var in token for var in MLFLOW_CLIENT_VARS) or token.startswith("--password"):
                problems.append(f"{where}: MLflow credentials on a command line ({token!r})")
    return problems


def ray_pod_containers(docs: Iterable[Doc]) -> list[tuple[str, dict]]:
    """(where, container) of every Ray head and worker container template."""
    found = []
    for where, spec in ray_cluster_specs(docs):
        groups = [("head", spec["headGroupSpec"])]
        groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs") or []]
        for group, body in groups:
            for c in body["template"]["spec"]["containers"]:
                found.append((f"{where} {group}/{c['name']}", c))
    return found


def check_mlflow_client_credentials(
    containers: Iterable[tuple[str, dict]], documented: dict[str, set[str]]
) -> list[str]:
    """Every Ray container gets MLFLOW_TRACKING_USERNAME / _PASSWORD from a documented Secret."""
    problems = []
    for where, container in containers:
        env = {e["name"]: e for e in container.get("env") or []}
        for var in MLFLOW_CLIENT_VARS:
            ref = secret_ref(env.get(var))
            if var not in env:
                problems.append(f"{where}: no {var} (the MLflow server requires a login)")
            elif "value" in env[var] or ref is None:
                problems.append(f"{where}: {var} must come from a secretKeyRef")
            elif ref[1] not in documented.get(ref[0], set()):
                problems.append(f"{where}: {var} reads {ref}, which no kubectl command creates")
    return problems


# -- network policies -------------------------------------------------------------------------
# Labels KubeRay puts on the pods it creates.
KUBERAY_LABELS = {
    "head": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head"},
    "worker": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"},
}
# The operator's pod labels: app.kubernetes.io/name differs between the Helm chart and kustomize.
OPERATOR_POD_LABELS = (
    {
        "app.kubernetes.io/name": "kuberay-operator",
        "app.kubernetes.io/component": "kuberay-operator",
    },
    {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
)
ALL_PORTS = None
# Ports tried for every (source, target) pair, besides the expected ones.
PROBE_PORTS = (22, 5000, 6379, 8080, 8265, 10001, 10002, 52365)
# Target role -> source role -> ports it must reach (ALL_PORTS: any). Everything else is refused.
INGRESS_EXPECTED: dict[str, dict[str, set[int] | None]] = {
    "mlflow": {"ray-head": {5000}, "ray-worker": {5000}},
    "ray-head": {
        "ray-head": ALL_PORTS,
        "ray-worker": ALL_PORTS,
        "operator": {8265},
        "submitter": {8265},
    },
    "ray-worker": {"ray-head": ALL_PORTS, "ray-worker": ALL_PORTS},
}


@dataclass(frozen=True)
class Pod:
    """Pods that exist once the manifests run (or that must be kept out), by their labels."""

    role: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    where: str

    @classmethod
    def of(cls, role: str, namespace: str, labels: dict[str, str], where: str) -> Pod:
        return cls(role, namespace, tuple(sorted(labels.items())), where)


def template_labels(template: dict) -> dict[str, str]:
    return dict((template.get("metadata") or {}).get("labels") or {})


def known_pods(docs: Iterable[Doc]) -> list[Pod]:
    docs = list(docs)
    pods = []
    for doc in docs:
        if doc.kind == "Deployment":
            labels = template_labels(doc.body["spec"]["template"])
            pods.append(Pod.of(doc.name, NAMESPACE, labels, doc.where))
        elif doc.kind == "CronJob":
            submits = any(
                argv[i : i + 3] == ["ray", "job", "submit"]
                for argv, _ in argvs_in([doc])
                for i in range(len(argv))
            )
            labels = template_labels(doc.body["spec"]["jobTemplate"]["spec"]["template"])
            pods.append(Pod.of("submitter" if submits else doc.name, NAMESPACE, labels, doc.where))
        for path, value in walk(doc.body):
            where = f"{doc.where} .{'.'.join(path)}"
            if path[-1:] == ("submitterPodTemplate",):
                pods.append(Pod.of("submitter", NAMESPACE, template_labels(value), where))
            if isinstance(value, dict) and "headGroupSpec" in value:
                head = value["headGroupSpec"]["template"]
                labels = template_labels(head) | KUBERAY_LABELS["head"]
                pods.append(Pod.of("ray-head", NAMESPACE, labels, f"{where} head"))
                for group in value.get("workerGroupSpecs") or []:
                    labels = template_labels(group["template"]) | KUBERAY_LABELS["worker"]
                    pods.append(
                        Pod.of("ray-worker", NAMESPACE, labels, f"{where} {group['groupName']}")
                    )
    for labels in OPERATOR_POD_LABELS:
        pods.append(Pod.of("operator", OPERATOR_NAMESPACE, labels, "KubeRay operator"))
    # Must never get in: another pod of the namespace, a pod posing as the operator inside it,
    # and pods of another namespace wearing the labels of admitted ones.
    pods.append(Pod.of("intruder", NAMESPACE, {"app": "debug"}, "a debug pod"))
    pods.append(Pod.of("intruder", NAMESPACE, OPERATOR_POD_LABELS[0], "a fake operator"))
    for role, labels in (
        ("ray", KUBERAY_LABELS["head"]),
        ("submitter", {"app.kubernetes.io/component": "ray-job-submitter"}),
        ("operator", OPERATOR_POD_LABELS[0]),
    ):
        pods.append(Pod.of("intruder", "elsewhere", labels, f"a fake {role} in another namespace"))
    return pods


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector; an empty one matches everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, values = expr["key"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expr["operator"]]
        if not ok:
            return False
    return True


def peer_admits(peer: dict, pod: Pod) -> bool:
    if "ipBlock" in peer:  # pod addresses are not known here: assume it covers them
        return True
    namespace_selector = peer.get("namespaceSelector")
    if namespace_selector is None:
        if pod.namespace != NAMESPACE:
            return False
    elif not selector_matches(namespace_selector, {"kubernetes.io/metadata.name": pod.namespace}):
        return False
    return selector_matches(peer.get("podSelector") or {}, dict(pod.labels))


def port_admitted(rule: dict, port: int) -> bool:
    if not rule.get("ports"):
        return True
    for entry in rule["ports"]:
        number = entry.get("port")
        if entry.get("protocol", "TCP") != "TCP" or isinstance(number, str):
            continue  # named ports cannot be resolved here: use numbers
        if number is None or number <= port <= entry.get("endPort", number):
            return True
    return False


def policy_selects(policy: Doc, pod: Pod) -> bool:
    namespace = (policy.body.get("metadata") or {}).get("namespace", NAMESPACE)
    selector = policy.body["spec"].get("podSelector") or {}
    return pod.namespace == namespace and selector_matches(selector, dict(pod.labels))


def ingress_allowed(policies: list[Doc], source: Pod, target: Pod, port: int) -> bool:
    """Kubernetes semantics: a pod no policy selects accepts everything; otherwise a connection
    passes if any rule of any selecting policy admits it."""
    selecting = [
        p
        for p in policies
        if policy_selects(p, target)
        and "Ingress" in (p.body["spec"].get("policyTypes") or ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy.body["spec"].get("ingress") or []:
            peers = rule.get("from")
            if port_admitted(rule, port) and (
                not peers or any(peer_admits(p, source) for p in peers)
            ):
                return True
    return False


def check_ingress(docs: Iterable[Doc], target_role: str) -> list[str]:
    """Which known pods reach the pods of ``target_role``, on which ports, against
    INGRESS_EXPECTED: a refused expected source or an admitted other one is a problem."""
    docs = list(docs)
    policies = [d for d in docs if d.kind == "NetworkPolicy"]
    pods = known_pods(docs)
    expected = INGRESS_EXPECTED[target_role]
    problems = []
    targets = [p for p in pods if p.role == target_role]
    if not targets:
        return [f"no {target_role} pods in the manifests"]
    for target in targets:
        if not any(policy_selects(p, target) for p in policies):
            problems.append(f"{target.where}: no NetworkPolicy selects {dict(target.labels)}")
            continue
        for source in pods:
            allowed = expected.get(source.role, set())
            for port in sorted({*PROBE_PORTS, *(allowed or ())}):
                should = allowed is ALL_PORTS or port in allowed
                if ingress_allowed(policies, source, target, port) != should:
                    verdict = "refused" if should else "admitted"
                    problems.append(
                        f"{target.where}: port {port} from {source.role} ({source.where}) {verdict}"
                    )
    return problems


def check_policy_targets(docs: Iterable[Doc]) -> list[str]:
    """Each policy selects the pods of exactly one kind (its podSelector matches their labels)."""
    docs = list(docs)
    pods = known_pods(docs)
    problems = []
    for policy in (d for d in docs if d.kind == "NetworkPolicy"):
        roles = sorted({p.role for p in pods if policy_selects(policy, p)})
        if len(roles) != 1:
            problems.append(f"{policy.where}: selects {roles or 'no known pod'}, not one kind")
    return problems


def check_no_allow_all(docs: Iterable[Doc]) -> list[str]:
    """Ingress rules that admit every source, or every pod of some namespace(s)."""
    problems = []
    for policy in (d for d in docs if d.kind == "NetworkPolicy"):
        for i, rule in enumerate(policy.body["spec"].get("ingress") or []):
            where = f"{policy.where} .spec.ingress.{i}"
            if not rule.get("from"):
                problems.append(f"{where}: no `from` admits every source")
            for j, peer in enumerate(rule.get("from") or []):
                namespaces = peer.get("namespaceSelector")
                if "ipBlock" in peer:
                    if peer["ipBlock"].get("cidr") in ("0.0.0.0/0", "::/0"):
                        problems.append(f"{where}.from.{j}: ipBlock admits every address")
                elif not selector_is_set(peer.get("podSelector")):
                    problems.append(f"{where}.from.{j}: empty podSelector admits every pod")
                elif namespaces is not None and not selector_is_set(namespaces):
                    problems.append(f"{where}.from.{j}: empty namespaceSelector: any namespace")
    return problems


def selector_is_set(selector: dict | None) -> bool:
    return bool(selector and (selector.get("matchLabels") or selector.get("matchExpressions")))


# -- pods, image -------------------------------------------------------------------------------
def pod_specs(docs: Iterable[Doc]) -> list[tuple[str, dict]]:
    """Every pod spec of the manifests (Deployment, CronJob, Ray groups, submitter templates)."""
    return [
        (f"{d.where} .{'.'.join(p)}", v)
        for d in docs
        for p, v in walk(d.body)
        if isinstance(v, dict) and isinstance(v.get("containers"), list)
    ]


def check_non_root(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for where, spec in pod_specs(docs):
        pod_context = spec.get("securityContext") or {}
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
            own = c.get("securityContext") or {}
            context = {**pod_context, **own}  # the container's settings override the pod's
            if context.get("runAsNonRoot") is not True:
                problems.append(f"{where} {c['name']}: runAsNonRoot is not true")
            if context.get("runAsUser") == 0:
                problems.append(f"{where} {c['name']}: runAsUser 0")
            if own.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where} {c['name']}: allowPrivilegeEscalation is not false")
    return problems


def docker_ignored(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves ``path`` out: a pattern excludes what it matches and
    everything below; the last matching pattern wins (`!` re-includes)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}  # `**` also matches no directory
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# -- helpers over the real manifests ----------------------------------------------------------
def docs_of(kind: str) -> list[Doc]:
    return [d for d in manifest_docs() if d.kind == kind]


def ray_cluster_specs(docs: Iterable[Doc] | None = None) -> list[tuple[str, dict]]:
    """RayCluster specs wherever they appear (RayCluster, RayJob, RayCronJob templates)."""
    return [
        (f"{d.where} .{'.'.join(p)}", v)
        for d in (manifest_docs() if docs is None else docs)
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
    assert {
        "RayCluster",
        "RayJob",
        "RayCronJob",
        "CronJob",
        "Deployment",
        "Service",
        "NetworkPolicy",
    } <= kinds
    for doc in docs:
        assert doc.body.get("apiVersion"), f"{doc.where}: no apiVersion"
        assert doc.kind, f"{doc.where}: no kind"
        assert doc.name, f"{doc.where}: no metadata.name"
        labels = doc.body["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "lane-fcn", f"{doc.where}: part-of"
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
    """The user's manual (README and docs/) and the plain-cluster schedule run the jobs too:
    their concrete commands (```bash blocks; synopses are ```text) must name real jobs and
    flags."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    calls = [
        c
        for page in pages
        for argv in readme_commands(page.read_text())
        for c in calls_in_argv(argv, str(page.relative_to(ROOT)))
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


def test_referenced_secrets_and_configmaps_are_created() -> None:
    # No Secret in the repository, not even an example: a committed placeholder gets deployed.
    assert not docs_of("Secret"), "create Secrets with a documented kubectl command instead"
    problems = check_references(references(manifest_docs()), created_config())
    assert not problems, "\n".join(problems)


def test_documented_kubectl_secrets_agree_and_are_used() -> None:
    readme = documented_secrets(K8S_README.read_text())
    assert readme, "infra/k8s/README.md: no kubectl create secret command documented"
    # config.yaml's comment repeats the commands: both must create the same Secrets and keys.
    assert documented_secrets(CONFIG_FILE.read_text()) == readme
    # And every documented Secret is one the manifests read (no stale instructions).
    referenced = {r.name for r in references(manifest_docs()) if r.kind == "Secret"}
    assert set(readme) == referenced, (set(readme), referenced)


def test_no_placeholder_credentials_in_manifests_or_docs() -> None:
    texts = {f.name: f.read_text() for f in (K8S_README, *sorted(K8S.glob("*.yaml")))}
    problems = check_placeholders(manifest_docs(), texts)
    assert not problems, "\n".join(problems)


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


def deadline_problems(docs: Iterable[Doc]) -> list[str]:
    """Every RayJob spec (a RayJob's, a RayCronJob's template) fails early when its cluster
    never starts: ``preRunningDeadlineSeconds`` set, positive and shorter than
    ``activeDeadlineSeconds`` (a job that never gets GPUs must not wait out the long one)."""
    problems = []
    for doc in docs:
        for _, spec in walk(doc.body):
            if not (isinstance(spec, dict) and "entrypoint" in spec and "rayClusterSpec" in spec):
                continue
            pre, active = spec.get("preRunningDeadlineSeconds"), spec.get("activeDeadlineSeconds")
            if not isinstance(pre, int) or pre <= 0:
                problems.append(f"{doc.where}: no positive preRunningDeadlineSeconds ({pre!r})")
            elif isinstance(active, int) and pre >= active:
                problems.append(
                    f"{doc.where}: preRunningDeadlineSeconds {pre} >= activeDeadlineSeconds {active}"
                )
    return problems


def dependency_layer_problems(dockerfile: str) -> list[str]:
    """The dependencies are installed from pyproject.toml alone, in a layer before the code
    is copied, so a code change does not rebuild them; the code's own install adds none."""
    lines = re.sub(r"\\\n", " ", dockerfile).splitlines()
    copies = [(i, ln) for i, ln in enumerate(lines) if re.match(r"\s*COPY\s", ln)]
    installs = [(i, ln) for i, ln in enumerate(lines) if "pip install" in ln]
    full = next((i for i, ln in copies if re.search(r"COPY\s+\.\s", ln)), None)
    if full is None:
        return ["no `COPY . /app`"]
    problems = []
    if not any(i < full and "pyproject.toml" in ln and " . " not in ln for i, ln in copies):
        problems.append("pyproject.toml is not copied on its own before the code")
    if not any(i < full and "-r " in ln for i, ln in installs):
        problems.append("no dependency install (pip install -r) before `COPY . /app`")
    for i, ln in installs:
        if i > full and "--no-deps" not in ln:
            problems.append(f"the install after `COPY . /app` resolves dependencies: {ln.strip()}")
    return problems


def test_dockerfile_installs_dependencies_before_the_code() -> None:
    assert dependency_layer_problems(DOCKERFILE.read_text()) == []


def test_dependency_layer_check_reports_a_code_copy_first() -> None:
    old = (
        "WORKDIR /app\nCOPY . /app\nRUN python -m pip install -c /tmp/c.txt /app \\\n    && true\n"
    )
    problems = dependency_layer_problems(old)
    assert any("pyproject.toml is not copied" in p for p in problems)
    assert any("no dependency install" in p for p in problems)
    assert any("resolves dependencies" in p for p in problems)


def test_ray_jobs_fail_early_when_their_cluster_never_starts() -> None:
    specs = [d for d in manifest_docs() if d.kind in ("RayJob", "RayCronJob")]
    assert {d.kind for d in specs} == {"RayJob", "RayCronJob"}
    assert deadline_problems(specs) == []


def cron_period_s(schedule: str) -> int:
    """The period of the simple cron schedules the project ships: every N minutes, hourly at
    minute M, daily at H:M."""
    minute, hour, dom, month, dow = schedule.split()
    assert dom == month == dow == "*", f"unsupported schedule {schedule!r}"
    if hour == "*" and minute.startswith("*/"):
        return int(minute[2:]) * 60
    if hour == "*" and minute.isdigit():
        return 3600
    assert hour.isdigit() and minute.isdigit(), f"unsupported schedule {schedule!r}"
    return 86400


def schedule_problems(docs: Iterable[Doc]) -> list[str]:
    """Each scheduled labeling run must end itself (--time-limit) before the next tick, and
    its deadline must lie between the two: overlapping ticks would each bring up a cluster."""
    problems = []
    for doc in docs:
        if doc.kind not in ("RayCronJob", "CronJob"):
            continue
        period = cron_period_s(doc.body["spec"]["schedule"])
        template = doc.body["spec"]["jobTemplate"]
        deadline = (template.get("spec") or template).get("activeDeadlineSeconds")
        for call in job_calls([doc]):
            if call.module != "jobs.label":
                continue
            limit = parse_job_args(call).time_limit
            if limit is None or limit >= period:
                problems.append(
                    f"{doc.where}: --time-limit {limit} is not below the {period}s period"
                )
            if deadline is None or not (limit or 0) < deadline < period:
                problems.append(
                    f"{doc.where}: activeDeadlineSeconds {deadline} is not between --time-limit "
                    f"{limit} and the {period}s period"
                )
    return problems


def test_scheduled_labeling_ends_before_the_next_tick() -> None:
    scheduled = [d for d in manifest_docs() if d.kind in ("RayCronJob", "CronJob")]
    assert {d.kind for d in scheduled} == {"RayCronJob", "CronJob"}
    assert schedule_problems(scheduled) == []
    crontab = (ROOT / "infra/cron/label.crontab").read_text().splitlines()
    for line in (x for x in crontab if x.strip() and x[0] != "#" and "jobs.label" in x):
        [call] = calls_in_argv(shlex.split(" ".join(line.split()[5:])), "label.crontab")
        assert parse_job_args(call).time_limit < cron_period_s(" ".join(line.split()[:5]))


def test_schedule_check_reports_a_run_longer_than_its_period() -> None:
    text = (
        (K8S / "raycronjob-label.yaml")
        .read_text()
        .replace("--time-limit 3000", "--time-limit 19800")
    )
    [problem, *_] = schedule_problems(parse_docs(text, "broken.yaml"))
    assert "--time-limit 19800.0 is not below the 3600s period" in problem


def test_the_scheduled_gpu_group_starts_from_zero_under_autoscaler_v2() -> None:
    [cron] = [d for d in manifest_docs() if d.kind == "RayCronJob"]
    cluster = cron.body["spec"]["jobTemplate"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert all(g["minReplicas"] == g["replicas"] == 0 for g in cluster["workerGroupSpecs"])


@pytest.mark.parametrize(
    "fragment, problem",
    [("", "no positive preRunningDeadlineSeconds"),
     ("preRunningDeadlineSeconds: 0", "no positive preRunningDeadlineSeconds"),
     ("preRunningDeadlineSeconds: 7200", ">= activeDeadlineSeconds 3600")],
)  # fmt: skip
def test_deadline_check_reports_missing_and_too_long_deadlines(fragment: str, problem: str) -> None:
    text = f"""
apiVersion: ray.io/v1
kind: RayJob
metadata: {{name: broken}}
spec:
  entrypoint: python -m jobs.train --help
  activeDeadlineSeconds: 3600
  {fragment}
  rayClusterSpec: {{headGroupSpec: {{}}}}
"""
    problems = deadline_problems(parse_docs(text, "broken.yaml"))
    assert len(problems) == 1 and problem in problems[0], problems


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
    # Exact names only: `mlflow.*` would also accept mlflow.attacker.tld (DNS rebinding).
    assert not [a for a in allowed if "*" in a], f"wildcard in --allowed-hosts: {allowed}"
    names = [
        uri.hostname,
        f"{uri.hostname}.{NAMESPACE}",
        f"{uri.hostname}.{NAMESPACE}.svc",
        f"{uri.hostname}.{NAMESPACE}.svc.cluster.local",
    ]
    for host in (*names, *(f"{n}:{uri.port}" for n in names), "localhost:5000", "127.0.0.1:5000"):
        assert allowed_host(allowed, host), f"Host {host!r} would be rejected by MLflow"
    for host in (
        "attacker.example:5000",
        "mlflow.attacker.tld",
        "mlflow.attacker.tld:5000",
        "mlflow:5000.attacker.tld",
    ):
        assert not allowed_host(allowed, host), f"Host {host!r} would be accepted by MLflow"


def mlflow_pod_spec() -> dict:
    [deployment] = [d for d in docs_of("Deployment") if d.name == "mlflow"]
    return deployment.body["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def volume_at(spec: dict, container: dict, path: str) -> tuple[dict, str]:
    """The volume (and its mount path) that holds ``path`` in ``container``."""
    for mount in container.get("volumeMounts") or []:
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            [volume] = [v for v in spec.get("volumes") or [] if v["name"] == mount["name"]]
            return volume, mount["mountPath"]
    raise AssertionError(f"{container['name']}: nothing mounted at {path}")


def test_mlflow_server_requires_basic_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs MLflow's basic-auth app with the admin of Secret lane-mlflow-auth: the
    init container's script is run here with stand-in Secret values and its output read by
    MLflow's own config reader."""
    from mlflow.server.auth.config import DEFAULT_AUTHORIZATION_FUNCTION, read_auth_config

    spec = mlflow_pod_spec()
    [server] = [c for c in spec["containers"] if c.get("command", [])[:2] == ["mlflow", "server"]]
    assert option_value(server["args"], "--app-name") == "basic-auth"
    documented = documented_secrets(K8S_README.read_text())
    env = env_of(server)
    # The CSRF key is generated, from a documented Secret.
    key = secret_ref(env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"))
    assert key and key[1] in documented.get(key[0], set()), key
    # /health is exempt from the login: the probes need no credentials.
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health", probe

    # An init container renders the ini into a memory volume the server reads it from.
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    [renderer] = [
        c
        for c in spec.get("initContainers") or []
        if env_of(c).get("MLFLOW_AUTH_CONFIG_PATH", {}).get("value") == config_path
    ]
    volume, _ = volume_at(spec, server, config_path)
    assert volume_at(spec, renderer, config_path)[0] is volume
    assert (volume.get("emptyDir") or {}).get("medium") == "Memory", volume
    if not shutil.which("sh"):
        pytest.skip("no sh to run the init container's script")
    ini = tmp_path / "basic_auth.ini"
    run_env = {"PATH": os.environ["PATH"], "MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    stand_ins = {}
    for name, entry in env_of(renderer).items():
        if ref := secret_ref(entry):
            assert ref[1] in documented.get(ref[0], set()), f"{name}: {ref} is not documented"
            run_env[name] = stand_ins[ref[1]] = f"{ref[1]}-{os.urandom(16).hex()}"
    argv = [*renderer["command"], *renderer.get("args", [])]
    subprocess.run(argv, env=run_env, check=True, timeout=30)
    assert ini.stat().st_mode & 0o077 == 0, "the ini holds the admin password: owner-only"

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    config = read_auth_config()
    assert config.admin_username == stand_ins["admin_username"]
    assert config.admin_password == stand_ins["admin_password"]
    assert config.default_permission in {"NO_PERMISSIONS", "READ"}
    assert config.authorization_function == DEFAULT_AUTHORIZATION_FUNCTION
    # Runs, registry and users live in PostgreSQL, whose URIs (with the database password)
    # come from a documented Secret: never a sqlite file, a literal or a command-line flag.
    assert config.database_uri == stand_ins["auth_uri"], config.database_uri
    assert "--backend-store-uri" not in server["args"]
    store = secret_ref(env.get("MLFLOW_BACKEND_STORE_URI"))
    assert store and store[1] in documented.get(store[0], set()), store
    assert "postgresql+psycopg2://" in K8S_README.read_text()
    assert not [v for v in spec.get("volumes") or [] if "persistentVolumeClaim" in v]


def test_no_credential_literals() -> None:
    texts = {f.name: f.read_text() for f in (K8S_README, *sorted(K8S.glob("*.yaml")))}
    problems = check_credential_literals(manifest_docs(), texts)
    assert not problems, "\n".join(problems)


def test_ray_pods_log_in_to_mlflow_with_a_documented_secret() -> None:
    containers = ray_pod_containers(manifest_docs())
    assert len(containers) >= 7  # heads and worker groups of the three cluster specs
    documented = documented_secrets(K8S_README.read_text())
    problems = check_mlflow_client_credentials(containers, documented)
    assert not problems, "\n".join(problems)


def test_network_policies_select_the_pods_they_protect() -> None:
    assert docs_of("NetworkPolicy"), "no NetworkPolicy: every pod of the cluster reaches MLflow"
    problems = check_policy_targets(manifest_docs())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", sorted(INGRESS_EXPECTED))
def test_network_policies_admit_exactly_the_expected_sources(target: str) -> None:
    # mlflow: Ray pods on 5000; Ray heads: Ray pods, the operator and the submitters (8265);
    # Ray workers: Ray pods.
    problems = check_ingress(manifest_docs(), target)
    assert not problems, "\n".join(problems)


def test_network_policies_have_no_allow_all_rule() -> None:
    problems = check_no_allow_all(manifest_docs())
    assert not problems, "\n".join(problems)


def test_image_runs_as_a_non_root_uid() -> None:
    users = re.findall(r"(?m)^USER\s+(\S+)", DOCKERFILE.read_text())
    assert users, "infra/docker/Dockerfile has no USER: the image runs as root"
    uid = users[-1].split(":")[0]
    # Numeric: Kubernetes' runAsNonRoot can verify a uid, not a user name.
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"
    # The manifests run the project image as that same uid.
    project = [d for d in manifest_docs() if d.kind in PROJECT_IMAGE_KINDS]
    uids = {(v.get("securityContext") or {}).get("runAsUser") for _, v in pod_specs(project)}
    assert uids <= {int(uid), None}, uids


def test_every_pod_runs_as_non_root() -> None:
    assert len(pod_specs(manifest_docs())) >= 10
    problems = check_non_root(manifest_docs())
    assert not problems, "\n".join(problems)


def test_build_context_leaves_out_local_state() -> None:
    patterns = dockerignore_patterns()
    # Local MLflow stores, demo outputs and the local S3 / Ray stack hold data and credentials.
    for path in ("mlruns", "mlruns/0/meta.yaml", "mlflow.db", ".local-stack", ".local-stack/x"):
        assert docker_ignored(patterns, path), path
    for path in ("demo", "demo/out/frame.png", ".venv", ".git/config"):
        assert docker_ignored(patterns, path), path
    # ... but keeps what the image installs.
    for path in ("pyproject.toml", "jobs/train.py", "pipelines/training/loop.py"):
        assert not docker_ignored(patterns, path), path


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
            "has no option --crash-at",
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
        "fake: Secret 'nope' is not created by a documented `kubectl create secret generic`"
    ]


FAKE_CREDENTIALS = """
apiVersion: v1
kind: Secret
metadata:
  name: lane-s3
stringData:
  AWS_SECRET_ACCESS_KEY: CHANGE-ME
data:
  backup: Y2hhbmdlbWU=
---
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: fake
spec:
  entrypoint: MLFLOW_TRACKING_PASSWORD=s3cr3t python -m jobs.train
  rayClusterSpec:
    headGroupSpec:
      template:
        spec:
          containers:
            - name: ray-head
              image: lane-fcn:latest
              env:
                - {name: RAY_AUTH_MODE, value: token}
                - {name: MLFLOW_TRACKING_USERNAME, value: admin}
                - name: MLFLOW_TRACKING_PASSWORD
                  valueFrom:
                    secretKeyRef: {name: undocumented, key: password}
              args:
                - |
                  admin_password = hunter2hunter2
                  admin_password = $ADMIN_PASSWORD
"""
FAKE_README = """
kubectl -n lanes create secret generic lane-mlflow-client \\
    --from-literal=username=lane-pipelines --from-literal=password=changeme
kubectl -n lanes create secret generic lane-ray-token --from-literal=auth_token="$(openssl rand -hex 32)"
"""


def test_placeholder_check_reports_committed_and_documented_placeholders() -> None:
    problems = check_placeholders(parse_docs(FAKE_CREDENTIALS, "fake.yaml"), {"x.md": FAKE_README})
    text = "\n".join(problems)
    assert "stringData.AWS_SECRET_ACCESS_KEY: placeholder 'CHANGE-ME'" in text
    assert "data.backup: placeholder 'changeme'" in text  # base64 is decoded
    assert "MLFLOW_TRACKING_USERNAME: placeholder value 'admin'" in text
    assert "--from-literal=password= placeholder 'changeme'" in text
    # RAY_AUTH_MODE=token is a setting and a generated value is fine.
    assert len(problems) == 4, text


def test_credential_checks_report_literals_and_command_lines() -> None:
    docs = parse_docs(FAKE_CREDENTIALS, "fake.yaml")
    text = "\n".join(check_credential_literals(docs, {"x.md": "admin_password = password1234"}))
    assert "MLFLOW_TRACKING_PASSWORD=s3cr3t" in text  # in the entrypoint
    assert "admin_password = 'hunter2hunter2' is a literal" in text
    assert "'$ADMIN_PASSWORD'" not in text
    assert "x.md: MLflow's former default admin password" in text
    documented = documented_secrets(FAKE_README)
    problems = check_mlflow_client_credentials(ray_pod_containers(docs), documented)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "MLFLOW_TRACKING_USERNAME must come from a secretKeyRef",
        "MLFLOW_TRACKING_PASSWORD reads ('undocumented', 'password'), which no kubectl "
        "command creates",
    ]


FAKE_OPEN_POLICIES = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: no-from}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
  ingress:
    - ports: [{port: 5000}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: empty-from}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
  ingress:
    - from: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: any-pod}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
  ingress:
    - from: [{podSelector: {}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: any-namespace}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
  ingress:
    - from: [{namespaceSelector: {}, podSelector: {matchLabels: {ray.io/is-ray-node: "yes"}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: any-address}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
  ingress:
    - from: [{ipBlock: {cidr: 0.0.0.0/0}}]
"""


def test_allow_all_check_reports_open_rules() -> None:
    problems = check_no_allow_all(parse_docs(FAKE_OPEN_POLICIES, "fake.yaml"))
    for name, message in (
        ("no-from", "no `from` admits every source"),
        ("empty-from", "no `from` admits every source"),
        ("any-pod", "empty podSelector admits every pod"),
        ("any-namespace", "empty namespaceSelector"),
        ("any-address", "ipBlock admits every address"),
    ):
        assert any(f"NetworkPolicy/{name} " in p and message in p for p in problems), name
    assert len(problems) == 5, problems


def replacing_policy(name: str, replacement: str) -> list[Doc]:
    """The real manifests with NetworkPolicy ``name`` swapped for ``replacement``."""
    kept = [d for d in manifest_docs() if (d.kind, d.name) != ("NetworkPolicy", name)]
    return [*kept, *parse_docs(replacement, "fake.yaml")]


def test_ingress_check_reports_wrong_sources_and_targets() -> None:
    # MLflow open to the project's label: the submitters get in, the Ray pods (which KubeRay
    # does not give that label) do not.
    docs = replacing_policy(
        "lane-mlflow",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lane-mlflow}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlflow}}
  ingress:
    - from: [{podSelector: {matchLabels: {app.kubernetes.io/part-of: lane-fcn}}}]
      ports: [{port: 5000}]
""",
    )
    text = "\n".join(check_ingress(docs, "mlflow"))
    assert "port 5000 from submitter" in text and "admitted" in text
    assert "port 5000 from ray-worker" in text and "refused" in text
    # The operator matched by label alone: a look-alike in the namespace gets in, the real
    # operator (another namespace) does not.
    docs = replacing_policy(
        "lane-ray-head",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lane-ray-head}
spec:
  podSelector: {matchLabels: {ray.io/node-type: head}}
  ingress:
    - from: [{podSelector: {matchLabels: {ray.io/is-ray-node: "yes"}}}]
    - from: [{podSelector: {matchLabels: {app.kubernetes.io/component: kuberay-operator}}}]
      ports: [{port: 8265}]
""",
    )
    text = "\n".join(check_ingress(docs, "ray-head"))
    assert "port 8265 from intruder (a fake operator) admitted" in text
    assert "port 8265 from operator (KubeRay operator) refused" in text
    assert "port 8265 from submitter" in text
    # A typo in the podSelector: the policy protects nothing and MLflow is open.
    docs = replacing_policy(
        "lane-mlflow",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lane-mlflow}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: mlfow}}
  ingress:
    - from: [{podSelector: {matchLabels: {ray.io/is-ray-node: "yes"}}}]
""",
    )
    assert "selects no known pod" in "\n".join(check_policy_targets(docs))
    assert "no NetworkPolicy selects" in "\n".join(check_ingress(docs, "mlflow"))
    # A policy for "everything" mixes kinds of pods.
    docs = replacing_policy(
        "lane-ray-worker",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lane-ray-worker}
spec:
  podSelector: {}
  ingress:
    - from: [{podSelector: {matchLabels: {ray.io/is-ray-node: "yes"}}}]
""",
    )
    assert "not one kind" in "\n".join(check_policy_targets(docs))


def test_non_root_check_reports_root_pods() -> None:
    # FAKE_RAYJOB's CronJob sets no securityContext at all.
    problems = check_non_root(parse_docs(FAKE_RAYJOB, "fake.yaml"))
    assert any("runAsNonRoot is not true" in p for p in problems), problems
    assert any("allowPrivilegeEscalation is not false" in p for p in problems), problems


def test_dockerignore_matching() -> None:
    patterns = ["demo", "**/__pycache__", "/build/", "*.egg-info", "docs", "!docs/keep.md"]
    assert docker_ignored(patterns, "demo/a.png")
    assert docker_ignored(patterns, "pipelines/__pycache__/x.pyc")
    assert docker_ignored(patterns, "__pycache__")
    assert docker_ignored(patterns, "build/lib")
    assert docker_ignored(patterns, "lane_fcn.egg-info/PKG-INFO")
    assert not docker_ignored(patterns, "docs/keep.md")
    assert not docker_ignored(patterns, "demonstration.py")
