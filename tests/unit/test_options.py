"""Options declared once (pipelines.core.options): the parser, the config-file keys and the
checks all come from one field, whichever way a config is made."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest

from jobs import _cli, ingest, label, promote, train
from pipelines.core.options import ConfigError, as_dict, check_options, declared, option


@dataclass(frozen=True)
class Shared:
    verbose: bool = option(False, help="say more")


@dataclass(frozen=True, kw_only=True)
class Demo(Shared):
    data: str = option(help="where the data is")
    workers: int = option(2, help="workers", min=1, group="cluster")
    fraction: float = option(0.5, help="a share", above=0, max=1)
    mode: str = option("fast", help="how", choices=("fast", "exact"))
    pin: bool = option(True, help="pin memory")
    size: tuple = option((4, 2), help="WxH", parse=lambda t: tuple(map(int, t.split("x"))))
    limit: int | None = option(None, help="at most", min=0)

    def __post_init__(self) -> None:
        check_options(self)


def load(*argv: str) -> Demo:
    return _cli.load_config(Demo, list(argv), "demo", "A demo.")


def test_own_options_come_first_then_the_shared_ones():
    assert [d.name for d in declared(Demo)] == [
        "data", "workers", "fraction", "mode", "pin", "size", "limit", "verbose",
    ]  # fmt: skip


def test_flags_defaults_and_parsers_come_from_the_declaration():
    cfg = load("--data", "d", "--size", "8x3", "--no-pin", "--verbose")
    assert cfg == Demo(data="d", size=(8, 3), pin=False, verbose=True)
    assert as_dict(cfg)["workers"] == 2


def test_a_declaration_without_default_is_a_required_flag(capsys):
    with pytest.raises(SystemExit):
        load()
    assert "the following arguments are required: --data" in capsys.readouterr().err


def test_help_lists_groups_and_defaults():
    text = _cli.build_parser(Demo, "demo", "A demo.").format_help()
    assert re.search(r"\ncluster:\n +--workers WORKERS +workers \(default: 2\)\n", text)


@pytest.mark.parametrize("job", [ingest, train, promote, label], ids=lambda m: m.__name__)
def test_help_states_each_default_once(job):
    """No "(default: None)" (required flags, defaults the help explains), and no option whose
    own help already says its default gets a second one."""
    text = job.build_parser().format_help()
    entries = re.split(r"\n  (?=-)", text)
    assert "(default: None)" not in text
    assert not [e for e in entries if e.lower().count("default:") > 1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--workers", "0"), "--workers must be >= 1, got 0"),
        (("--fraction", "0"), "--fraction must be in (0, 1], got 0"),
        (("--limit", "-1"), "--limit must be >= 0, got -1"),
    ],
)
def test_range_checks_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load("--data", "d", *argv)


def test_python_callers_get_the_same_checks():
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        Demo(data="d", workers=0)
    with pytest.raises(ConfigError, match="--workers must be int, got '2'"):
        Demo(data="d", workers="2")
    with pytest.raises(ConfigError, match="unknown --mode 'slow'; choose one of fast, exact"):
        Demo(data="d", mode="slow")


def test_a_config_file_uses_flag_or_field_names_and_flags_override_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: from-file\nworkers: 3\nmode: exact\n")
    assert load("--config", str(path), "--workers", "4") == Demo(
        data="from-file", workers=4, mode="exact"
    )
    path.write_text("data: d\nnum-gpus: 3\n")
    with pytest.raises(ConfigError, match=f"--config {path}: unknown option 'num-gpus'"):
        load("--config", str(path))


@pytest.mark.parametrize("job", [ingest, train, label, promote])
def test_every_job_flag_defaults_to_its_declaration(job):
    config = {ingest: "IngestConfig", train: "TrainConfig", label: "LabelConfig",
              promote: "PromoteConfig"}[job]  # fmt: skip
    actions = {a.dest: a for a in job.build_parser()._actions}
    for d in declared(getattr(job, config)):
        assert d.flag in actions[d.name].option_strings, d.name
        if d.default is not dataclasses.MISSING:
            assert actions[d.name].default == d.default, d.name
        else:
            assert actions[d.name].required, d.name


def test_a_user_error_is_one_line_and_status_2(capsys):
    @_cli.cli
    def main(argv):
        return load(*argv) and 0

    assert main(["--data", "d", "--workers", "0"]) == 2
    assert capsys.readouterr().err == "error: --workers must be >= 1, got 0\n"
