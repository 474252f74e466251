"""`ledger tiers` on the command line: margin, target and show, with the tiers guide's figures."""

import pytest
from click.testing import CliRunner

from ledger.cli.tiers import tiers
from tests.unit.test_tiers import FREE_YAML, GUIDE_BLOCKS, PRO_YAML, STARTER_YAML


def run(*args: str):
    return CliRunner().invoke(tiers, list(args))


@pytest.mark.parametrize("args, lines", [
    (["--price", "99", "--budget", "60"],
     ["price   $99.00", "budget  $60.00", "cost    $62.70  (budget x 1.045)", "profit  $36.30", "margin  37%"]),
    (["--price", "29", "--budget", "15"], ["cost    $15.68  (budget x 1.045)", "profit  $13.32", "margin  46%"]),
    (["--price", "$29", "--budget", "50"], ["profit  -$23.25", "margin  -80%"]),
    (["--price", "0", "--budget", "5"], ["cost    $5.23  (budget x 1.045)", "margin  n/a (no price)"]),
    (["--price", "1,299.99", "--budget", "0.10", "--markup", "1"], ["price   $1,299.99", "profit  $1,299.89", "margin  100%"]),
], ids=["pro", "starter", "subsidized", "free", "no-markup"])
def test_margin(args, lines):
    result = run("margin", *args)
    assert result.exit_code == 0, result.output
    for line in lines:
        assert line in result.output.splitlines()


@pytest.mark.parametrize("margin, shown, budget, cents", [
    ("0.5", "50%", "$47.37", "4736"),  # Budget = $99 x 0.50 / 1.045 = $47.37 (47.368...)
    ("50%", "50%", "$47.37", "4736"),
    ("0.3", "30%", "$66.32", "6631"),  # 69.3 / 1.045 = 66.315...
])
def test_target(margin, shown, budget, cents):
    result = run("target", "--price", "99", "--margin", margin)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == ["price   $99.00", f"margin  {shown}", f"budget  {budget}"]
    assert lines[3].startswith(f"spend_limit_cents  {cents}  (rounded down")


@pytest.mark.parametrize("args, message", [
    (["margin", "--price", "abc", "--budget", "1"], "'abc' is not a number"),
    (["margin", "--price", "inf", "--budget", "1"], "not a finite number"),
    (["margin", "--price", "-1", "--budget", "1"], "price_usd must be between 0"),
    (["margin", "--price", "10", "--budget", "1", "--markup", "0"], "markup must be above 0"),
    (["target", "--price", "99", "--margin", "1"], "target_margin must be below 1"),
    (["target", "--price", "0", "--margin", "0.5"], "price_usd must be above 0"),
    (["margin", "--price", "99"], "Missing option '--budget'"),
])
def test_bad_arguments_are_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_show_prints_every_tier_of_the_guide_with_its_margin(tmp_path):
    path = tmp_path / "tiers.yaml"
    path.write_text("---\n".join(GUIDE_BLOCKS))
    result = run("show", str(path))
    assert result.exit_code == 0, result.output
    blocks = result.output.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [
        "starter: Starter ($29.00/month, 7-day trial)",
        "pro: Pro ($99.00/month, 14-day trial)",
        "business: Business ($299.00/month)",
        "free: Free (free)",
        "paygo: Pay As You Go (pay as you go)",
    ]
    starter, pro, business, free, paygo = blocks
    assert "  profit  $13.32" in starter and "  margin  46%" in starter
    assert "  profit  $36.30" in pro and "  margin  37%" in pro
    assert "  profit  $90.00" in business and "  margin  30%" in business
    assert "  models  claude-sonnet-4-5 (default), claude-opus-4-5" in business
    assert "  cost    $5.23  (budget x 1.045)" in free and "  margin  n/a (no price)" in free
    assert "  margin  none fixed (paygo" in paygo


@pytest.mark.parametrize("text, message", [
    (STARTER_YAML + 'billing_mode: "monthly"\n', "billing_mode must be one of"),
    (STARTER_YAML + "---\n" + STARTER_YAML, "tier_code must be unique"),
    (PRO_YAML.replace("6000", "-6000"), "spend_limit_cents"),
])
def test_show_reports_an_invalid_file(tmp_path, text, message):
    path = tmp_path / "tiers.yaml"
    path.write_text(text)
    result = run("show", str(path))
    assert result.exit_code == 1
    assert message in result.output and str(path) in result.output


def test_show_needs_an_existing_file(tmp_path):
    assert run("show", str(tmp_path / "absent.yaml")).exit_code == 2


def test_show_a_single_tier(tmp_path):
    path = tmp_path / "free.yaml"
    path.write_text(FREE_YAML)
    result = run("show", str(path))
    assert result.exit_code == 0 and result.output.startswith("free: Free (free)\n")
