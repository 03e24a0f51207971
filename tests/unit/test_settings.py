"""The settings table (rango/settings.py) against what it drives: Config, --help, README.

No broker, no process: each test reads the table and the text it generated.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rango import cli, settings
from rango.config import Config, ConfigError, EnvReader
from rango.settings import FLAGS, SETTINGS

README = Path(__file__).resolve().parents[2] / "README.md"


def configuration_section() -> str:
    """README's "## Configuration" section, up to the next heading."""
    text = README.read_text()
    start = text.index("\n## Configuration\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def readme_variables() -> dict[str, str]:
    """Variable -> default, as README's configuration table documents them.

    A row may name several variables (``A``, ``B``) with one default each, or one
    default for them all; a default in backticks is shown without them.
    """
    rows = [line for line in configuration_section().splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        names = re.findall(r"`([A-Z][A-Z0-9_<>]*)`", cells[0])
        if not names:
            continue  # the flags table
        defaults = [part.strip().strip("`") for part in cells[1].split(", ")]
        if len(defaults) == 1:
            defaults *= len(names)
        assert len(defaults) == len(names), f"README row {row!r}: one default per variable"
        documented.update(zip(names, defaults, strict=True))
    return documented


def test_every_setting_is_in_readme_with_its_default() -> None:
    documented = readme_variables()
    for row in SETTINGS:
        assert row.name in documented, f"{row.name} is missing from README's configuration"
        assert documented[row.name] == row.shown_default(), row.name


def test_every_readme_row_names_a_setting() -> None:
    names = {row.name for row in SETTINGS}
    unknown = sorted(set(readme_variables()) - names)
    assert not unknown, f"README documents variables the table has not: {unknown}"


def test_readme_tables_are_the_generated_ones() -> None:
    assert settings.markdown() in configuration_section(), (
        "README's configuration tables differ from rango/settings.py: paste the output of "
        "`python -m rango.settings --markdown`"
    )


def test_every_config_field_has_one_row_and_its_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    filled = [row.field for row in SETTINGS if row.field]
    assert sorted(filled) == sorted(fields), "each Config field is filled by exactly one row"
    default = Config()
    for row in SETTINGS:
        if row.field and not row.builds_default:
            assert getattr(default, row.field) == row.default, row.name
    assert default.amqp_urls == ("amqp://guest:guest@localhost:5672/",)


def test_names_are_unique_and_grouped() -> None:
    names = [row.name for row in SETTINGS]
    assert len(names) == len(set(names))
    groups = [row.group for row in SETTINGS]
    # Ranger's and Go Rango's names first, then Rango's own: --help and README read so.
    assert groups == sorted(groups, key=["ranger", "rango"].index)
    assert all(row.name.startswith(("RANGO_", "PROMETHEUS_")) for row in SETTINGS
               if row.group == "rango")  # fmt: skip


def test_help_lists_every_variable_and_flag() -> None:
    text = cli.build_parser().format_help()
    for row in SETTINGS:
        assert f"\n  {row.name} " in text, row.name
    for flag in FLAGS:
        assert flag.name in text
        for row in (row for row in SETTINGS if row.flag is flag):
            assert row.name in settings.flag_help(flag), (flag.name, row.name)
    assert "the only algorithm" not in text
    assert all(algorithm in text for algorithm in settings.JWT_ALGORITHMS)


def test_workers_flag_and_variable_share_bounds_and_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = settings.setting("RANGO_WORKERS")
    assert (row.minimum, row.maximum) == (0, 256)
    for bad in ("257", "-1", "many"):
        with pytest.raises(ConfigError) as info:
            Config.from_env({"RANGO_WORKERS": bad})
        env_message = str(info.value).removeprefix("RANGO_WORKERS: ")
        with pytest.raises(SystemExit):
            cli.parse_args(["--workers", bad])
        assert capsys.readouterr().err.strip().endswith(f"--workers/-workers: {env_message}")
    # The bounds are the same both ways: 0 (the CPUs usable) and 256 are accepted.
    assert cli.parse_args(["--workers", "0"]).workers == 0
    assert cli.parse_args(["--workers", "256"]).workers == 256


def test_flags_reach_from_env_by_their_dest() -> None:
    args = cli.parse_args(["--exchange", "x.y", "--workers", "3"])
    assert {flag.dest for flag in FLAGS} <= set(vars(args))
    with pytest.raises(TypeError):
        Config.from_env({}, no_such_flag=1)


def test_exchange_errors_name_where_it_came_from() -> None:
    from rango.config import exchange_from_env

    with pytest.raises(ConfigError, match=r"^RANGO_EXCHANGE: must be 1 to 255 bytes"):
        exchange_from_env({"RANGO_EXCHANGE": "x" * 256})
    with pytest.raises(ConfigError, match=r"^--exchange: must be 1 to 255 bytes"):
        exchange_from_env({}, "x" * 256)
    assert exchange_from_env({}, None) == settings.DEFAULT_EXCHANGE


def test_env_reader_keeps_its_api() -> None:
    env = {"P": "99", "N": "1.5", "L": "a, b,,", "RANGO_METRICS_PORT": "9100", "T": " t "}
    reader = EnvReader(env)
    assert reader.str("T", "d") == "t" and reader.str("U", "d") == "d"
    assert reader.port("P", 1) == 99 and reader.port("Q", 4242) == 4242
    assert reader.int("P", 0, maximum=100) == 99 and reader.opt_int("Q") is None
    assert reader.float("N", 2.0) == 1.5
    assert reader.csv("L") == ("a", "b") and reader.csv("Q") is None
    assert reader.setting("RANGO_METRICS_PORT") == 9100
    assert reader.setting("RANGO_METRICS_HOST") == "0.0.0.0"
    with pytest.raises(ConfigError, match=r"^P: 99 is out of range \(0 to 50\)$"):
        reader.int("P", 0, maximum=50)
    with pytest.raises(ConfigError, match=r"^X: 'y' is not a number of seconds$"):
        EnvReader({"X": "y"}).float("X", 1.0)


@pytest.mark.parametrize(
    ("env", "enabled"),
    [({}, True), ({"RANGO_TCP_MIGRATE_REQ": "1"}, True), ({"RANGO_TCP_MIGRATE_REQ": "0"}, False),
     ({"RANGO_TCP_MIGRATE_REQ": ""}, True), ({"RANGO_TCP_MIGRATE_REQ": "yes"}, True)],
)  # fmt: skip
def test_tcp_migrate_req(env: dict[str, str], enabled: bool) -> None:
    # As the supervisor reads it today: only "0" turns it off.
    assert settings.tcp_migrate_req(env) is enabled


def test_a_row_is_all_a_setting_needs() -> None:
    # A row added to the table is parsed, bounded and documented with nothing else.
    row = settings.Setting(
        name="RANGO_EXAMPLE", group="rango", parse=settings.whole, minimum=1, maximum=9,
        default=5, help="an example",
    )  # fmt: skip
    source = settings.Source({"RANGO_EXAMPLE": "7"})
    assert row.read(source) == 7 and row.read(settings.Source({})) == 5
    with pytest.raises(ConfigError, match=r"^RANGO_EXAMPLE: 10 is out of range \(1 to 9\)$"):
        row.read(settings.Source({"RANGO_EXAMPLE": "10"}))
    assert (row.shown_default(), row.bounds()) == ("5", "1 to 9")


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("P=plain", "plain"),
        ('P="a\\\\b\\$c\\"d\\`e"', 'a\\b$c"d`e'),  # systemd unescapes these in "…"
        ('P="a\\qb"', "a\\qb"),  # and keeps a backslash before anything else
        ("P='a\\\\b \"c\"'", 'a\\\\b "c"'),  # nothing is special in '…'
        ("P=a\\\\b\\ c", "a\\b c"),  # unquoted: a backslash takes the next character
        ('P="x" "y"z', "xyz"),  # quoted parts join, blanks between them dropped
        ("P = 'spaced' ", "spaced"),
    ],
)
def test_env_file_values_read_as_systemd_reads_them(
    tmp_path: Path, line: str, value: str
) -> None:
    path = tmp_path / "rango.env"
    path.write_text(f"# comment\n\n{line}\n")
    assert settings.read_env_file(str(path)) == {"P": value}


@pytest.mark.parametrize("line", ['P="open', "P='open", "P=x\\", 'P="x\\'])
def test_env_file_values_over_several_lines_are_refused(tmp_path: Path, line: str) -> None:
    path = tmp_path / "rango.env"
    path.write_text(f"{line}\nQ=1\n")
    with pytest.raises(settings.ConfigError, match=r"line 1: P: ") as caught:
        settings.read_env_file(str(path))
    assert "open" not in str(caught.value).replace("unclosed", "")
