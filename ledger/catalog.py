"""Provider prices: what each model costs the operator before markup, in USD per 1,000 tokens.

The shipped table (``ledger/data/provider_prices.json``) is dated list prices; operators override or
extend it with a mapping or a JSON file in the same format, and the override wins per model.
Prices are decimal strings (or JSON numbers read as exact decimals), never floats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from ledger.plans import MODEL_NAME_LENGTH_MAX, CostRate

__all__ = ["CatalogError", "PriceCatalog", "load_catalog", "parse_catalog"]

CATALOG_BYTES_MAX = 1_000_000
CATALOG_MODELS_MAX = 10_000
# Per 1,000 tokens: $1,000 is a million dollars per million tokens, far above any list price.
RATE_USD_MAX = Decimal(1000)
SOURCE_NOTE_LENGTH_MAX = 2000
SHIPPED = ("data", "provider_prices.json")
FILE_FIELDS = frozenset({"as_of", "source_note", "models"})
RATE_FIELDS = ("input", "output")


class CatalogError(ValueError):
    """A price catalog that cannot be accepted; the message names the field."""


class PriceCatalog(msgspec.Struct, frozen=True, kw_only=True):
    """Provider rates by model; ``overridden`` lists the models whose rate came from an override."""

    as_of: date
    source_note: str
    rates: dict[str, CostRate]
    overridden: tuple[str, ...] = ()
    overrides_as_of: date | None = None

    def rate(self, model: str) -> CostRate | None:
        return self.rates.get(model)

    def __contains__(self, model: object) -> bool:
        return model in self.rates

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self.rates))


Source = str | os.PathLike[str] | Mapping[str, Any]


def load_catalog(path: str | os.PathLike[str] | None = None, overrides: Source | None = None) -> PriceCatalog:
    """The shipped catalog (or the one at ``path``), with ``overrides`` winning model by model."""
    if path is None:
        where = "the shipped catalog"
        raw = _decode(resources.files("ledger").joinpath(*SHIPPED).read_text(encoding="utf-8"), where)
    else:
        where, raw = str(path), _read(path)
    base = parse_catalog(raw, where=where)
    if overrides is None:
        return base
    if isinstance(overrides, Mapping):
        extra = _document(overrides, where="overrides", partial=True)
    else:
        extra = _document(_read(overrides), where=str(overrides), partial=True)
    rates = {**base.rates, **extra.rates}
    if len(rates) > CATALOG_MODELS_MAX:
        raise CatalogError(f"more than {CATALOG_MODELS_MAX} models with the overrides")
    return PriceCatalog(as_of=base.as_of, source_note=base.source_note, rates=rates,
                        overridden=tuple(sorted(extra.rates)), overrides_as_of=extra.as_of)


def parse_catalog(raw: object, *, where: str = "catalog") -> PriceCatalog:
    """Validate one full catalog document (as_of, source_note and models)."""
    document = _document(raw, where=where, partial=False)
    if document.as_of is None:  # unreachable: as_of is required when not partial
        raise CatalogError(f"{where}: missing field as_of")
    return PriceCatalog(as_of=document.as_of, source_note=document.source_note, rates=document.rates)


class _Document(NamedTuple):
    as_of: date | None
    source_note: str
    rates: dict[str, CostRate]


def _document(raw: object, *, where: str, partial: bool) -> _Document:
    """One catalog document; overrides (``partial``) need only ``models``."""
    if not isinstance(raw, Mapping):
        raise CatalogError(f"{where}: expected an object with as_of, source_note and models")
    unknown = sorted(str(key) for key in raw if key not in FILE_FIELDS)
    if unknown:
        raise CatalogError(f"{where}: unknown field {', '.join(map(repr, unknown))}")
    required = ("models",) if partial else ("as_of", "source_note", "models")
    missing = [field for field in required if field not in raw]
    if missing:
        raise CatalogError(f"{where}: missing field {', '.join(missing)}")
    as_of = _date(where, raw["as_of"]) if "as_of" in raw else None
    note = raw.get("source_note", "")
    if not isinstance(note, str) or len(note) > SOURCE_NOTE_LENGTH_MAX:
        raise CatalogError(f"{where}: source_note must be a string of at most {SOURCE_NOTE_LENGTH_MAX} characters")
    models = raw["models"]
    if not isinstance(models, Mapping):
        raise CatalogError(f"{where}: models must be an object of model name to {{input, output}}")
    if len(models) > CATALOG_MODELS_MAX:
        raise CatalogError(f"{where}: more than {CATALOG_MODELS_MAX} models")
    rates = {_model_name(where, name): _rate(where, name, entry) for name, entry in models.items()}
    return _Document(as_of, note, rates)


def _read(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    file = Path(path)
    try:
        if file.stat().st_size > CATALOG_BYTES_MAX:
            raise CatalogError(f"{file}: larger than {CATALOG_BYTES_MAX} bytes")
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{file}: cannot read: {exc.strerror or exc}") from None
    return _decode(text, str(file))


def _decode(text: str, where: str) -> Mapping[str, Any]:
    def refuse(constant: str) -> None:
        raise CatalogError(f"{where}: {constant} is not a price")

    try:
        decoded = json.loads(text, parse_float=Decimal, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(decoded, Mapping):
        raise CatalogError(f"{where}: expected an object with as_of, source_note and models")
    return decoded


def _date(where: str, value: object) -> date:
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise CatalogError(f"{where}: as_of must be a date (YYYY-MM-DD), got {value!r}")


def _model_name(where: str, name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > MODEL_NAME_LENGTH_MAX or any(c.isspace() for c in name):
        raise CatalogError(f"{where}: model name must be 1 to {MODEL_NAME_LENGTH_MAX} characters without spaces, got {name!r}")
    return name


def _rate(where: str, model: str, entry: object) -> CostRate:
    if isinstance(entry, CostRate):
        entry = {"input": entry.input, "output": entry.output}
    if not isinstance(entry, Mapping):
        raise CatalogError(f"{where}: models.{model} must be an object with input and output")
    unknown = sorted(str(key) for key in entry if key not in RATE_FIELDS)
    if unknown:
        raise CatalogError(f"{where}: models.{model}: unknown field {', '.join(map(repr, unknown))}")
    prices = [_price(f"{where}: models.{model}.{field}", entry.get(field)) for field in RATE_FIELDS]
    return CostRate(input=prices[0], output=prices[1])


def _price(field: str, value: object) -> Decimal:
    if isinstance(value, float):
        raise CatalogError(f"{field} must be a decimal string, never a float: got {value!r}")
    if value is None:
        raise CatalogError(f"{field} is missing")
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise CatalogError(f"{field} must be a decimal string, got {value!r}")
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise CatalogError(f"{field} must be a decimal string, got {value!r}") from None
    if not price.is_finite() or not 0 <= price <= RATE_USD_MAX:
        raise CatalogError(f"{field} must be between 0 and {RATE_USD_MAX} USD per 1K tokens, got {value!r}")
    return price
