"""The shipped provider price catalog and operator overrides."""

import json
from datetime import date
from decimal import Decimal
from importlib import resources

import pytest

from ledger.catalog import CatalogError, PriceCatalog, load_catalog, parse_catalog
from ledger.plans import CostRate

D = Decimal
SHIPPED = resources.files("ledger").joinpath("data", "provider_prices.json")


def test_the_catalog_ships_as_package_data_with_decimal_strings():
    raw = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert raw["as_of"] == "2026-11-01" and "override" in raw["source_note"]
    for model, rate in raw["models"].items():
        assert set(rate) == {"input", "output"}, model
        assert all(isinstance(v, str) for v in rate.values()), model  # strings, never JSON numbers


# Published list prices in USD per million tokens (input, output); the catalog is per 1,000.
@pytest.mark.parametrize("model, per_million_in, per_million_out", [
    ("gpt-4o", "2.50", "10.00"),
    ("gpt-4o-mini", "0.15", "0.60"),
    ("gpt-4.1", "2.00", "8.00"),
    ("gpt-4.1-mini", "0.40", "1.60"),
    ("o3", "2.00", "8.00"),
    ("o4-mini", "1.10", "4.40"),
    ("claude-opus-4-5", "5", "25"),
    ("claude-sonnet-4-5", "3", "15"),
    ("claude-haiku-4-5", "1", "5"),
    ("claude-opus-4-1", "15", "75"),
    ("claude-sonnet-4-0", "3", "15"),
    ("claude-3-5-haiku-latest", "0.80", "4"),
    ("gemini-2.5-pro", "1.25", "10"),
    ("gemini-2.5-flash", "0.30", "2.50"),
])
def test_shipped_rates(model, per_million_in, per_million_out):
    rate = load_catalog().rate(model)
    assert rate is not None
    assert (rate.input * 1000, rate.output * 1000) == (D(per_million_in), D(per_million_out))
    assert type(rate.input) is Decimal and type(rate.output) is Decimal


def test_the_shipped_catalog_is_dated_and_unknown_models_have_no_rate():
    catalog = load_catalog()
    assert catalog.as_of == date(2026, 11, 1) and catalog.overridden == () and catalog.overrides_as_of is None
    assert catalog.rate("gpt-9-imaginary") is None and "gpt-9-imaginary" not in catalog and "gpt-4o" in catalog
    assert list(catalog.models) == sorted(catalog.models)


@pytest.mark.parametrize("overrides, model, expected", [
    ({"models": {"gpt-4o": {"input": "0.002", "output": "0.008"}}}, "gpt-4o", CostRate(input=D("0.002"), output=D("0.008"))),
    ({"models": {"my-finetune": {"input": "0.01", "output": 2}}}, "my-finetune", CostRate(input=D("0.01"), output=D(2))),
    ({"models": {"gpt-4o": {"input": D("0"), "output": D("0")}}}, "gpt-4o", CostRate(input=D(0), output=D(0))),
    ({"models": {"gpt-4o": CostRate(input=D(1), output=D(2))}}, "gpt-4o", CostRate(input=D(1), output=D(2))),
    ({"as_of": "2026-12-01", "models": {}}, "gpt-4o", CostRate(input=D("0.0025"), output=D("0.01"))),
], ids=["replace", "add", "decimal", "cost-rate", "empty"])
def test_overrides_win_model_by_model(overrides, model, expected):
    catalog = load_catalog(overrides=overrides)
    assert catalog.rate(model) == expected
    assert catalog.overridden == tuple(sorted(overrides["models"]))
    assert catalog.rate("claude-sonnet-4-5") == CostRate(input=D("0.003"), output=D("0.015"))  # the rest untouched


def test_overrides_and_catalogs_from_json_files(tmp_path):
    overrides = tmp_path / "prices.json"
    # A JSON number is read as an exact decimal, never through a float.
    overrides.write_text('{"as_of": "2026-12-15", "models": {"gpt-4o": {"input": 0.1, "output": "0.3"}}}')
    catalog = load_catalog(overrides=overrides)
    assert catalog.rate("gpt-4o") == CostRate(input=D("0.1"), output=D("0.3"))
    assert catalog.overrides_as_of == date(2026, 12, 15) and catalog.as_of == date(2026, 11, 1)

    own = tmp_path / "own.json"
    own.write_text(json.dumps({"as_of": "2027-01-01", "source_note": "ours", "models": {"m": {"input": "1", "output": "2"}}}))
    mine = load_catalog(own, overrides=str(overrides))
    assert (mine.as_of, mine.source_note, mine.models) == (date(2027, 1, 1), "ours", ("gpt-4o", "m"))


@pytest.mark.parametrize("overrides, message", [
    ({"models": {"gpt-4o": {"input": 0.0025, "output": "0.01"}}}, "models.gpt-4o.input must be a decimal string, never a float"),
    ({"models": {"gpt-4o": {"input": "-1", "output": "0.01"}}}, "models.gpt-4o.input must be between 0"),
    ({"models": {"gpt-4o": {"input": "cheap", "output": "0.01"}}}, "models.gpt-4o.input must be a decimal string"),
    ({"models": {"gpt-4o": {"input": "NaN", "output": "0.01"}}}, "models.gpt-4o.input must be between 0"),
    ({"models": {"gpt-4o": {"input": "5000", "output": "0.01"}}}, "models.gpt-4o.input must be between 0"),
    ({"models": {"gpt-4o": {"input": True, "output": "0.01"}}}, "models.gpt-4o.input must be a decimal string"),
    ({"models": {"gpt-4o": {"input": "0.01"}}}, "models.gpt-4o.output is missing"),
    ({"models": {"gpt-4o": {"input": "0", "output": "0", "cached": "0"}}}, "unknown field 'cached'"),
    ({"models": {"gpt-4o": "0.01"}}, "models.gpt-4o must be an object"),
    ({"models": {"gpt 4o": {"input": "0", "output": "0"}}}, "model name"),
    ({"models": []}, "models must be an object"),
    ({"as_of": "last tuesday", "models": {}}, "as_of must be a date"),
    ({"prices": {}}, "unknown field 'prices'"),
    ({}, "missing field models"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_overrides_name_the_field(overrides, message):
    with pytest.raises(CatalogError, match=message):
        load_catalog(overrides=overrides)


@pytest.mark.parametrize("text, message", [
    ('{"as_of": "2026-11-01", "source_note": "", "models": {"m": {"input": NaN, "output": "1"}}}', "NaN is not a price"),
    ("{not json", "not valid JSON"),
    ("[]", "expected an object"),
    ('{"as_of": "2026-11-01", "models": {}}', "missing field source_note"),
])
def test_invalid_catalog_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)


def test_a_missing_catalog_file_is_a_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "absent.json")


def test_parse_catalog_builds_an_immutable_catalog():
    catalog = parse_catalog({"as_of": "2026-11-01", "source_note": "n", "models": {"m": {"input": "1", "output": "2"}}})
    assert isinstance(catalog, PriceCatalog) and catalog.rate("m") == CostRate(input=D(1), output=D(2))
    with pytest.raises(AttributeError):
        catalog.as_of = date(2000, 1, 1)  # type: ignore[misc]
