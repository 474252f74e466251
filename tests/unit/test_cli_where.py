"""`ledger report` and `ledger status` say which namespace and home they read, and when those are defaults."""

import os

from click.testing import CliRunner

from ledger.cli.main import cli
from ledger.cli.where import reading_line
from ledger.settings import Settings


def _without_ledger_env() -> dict[str, str | None]:
    return {name: None for name in os.environ if name.startswith("LEDGER_")}


def test_report_without_the_environment_says_it_reads_the_defaults(tmp_path):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(cli, ["report"], env=_without_ledger_env())
    assert "reading namespace ledger (the default: LEDGER_NAMESPACE is not set)" in result.stderr
    assert "(the default: LEDGER_HOME is not set)" in result.stderr
    assert "no history file" in result.stderr  # and then why there is nothing to report
    assert "reading namespace" not in result.stdout  # standard output stays the report's (CSV, JSON)


def test_report_with_the_environment_names_what_it_reads(tmp_path):
    env = {**_without_ledger_env(), "LEDGER_NAMESPACE": "shop", "LEDGER_HOME": str(tmp_path)}
    result = CliRunner().invoke(cli, ["report", "daily", "--format", "csv"], env=env)
    assert f"reading namespace shop, home {tmp_path.resolve()}; history {tmp_path / 'shop.duckdb'}" in result.stderr
    assert "default" not in result.stderr


def test_the_line_names_each_default_on_its_own(tmp_path):
    settings = Settings(home=tmp_path, namespace="ledger")
    assert reading_line(settings, {"LEDGER_HOME": str(tmp_path)}) == \
        f"reading namespace ledger (the default: LEDGER_NAMESPACE is not set), home {tmp_path.resolve()}"
