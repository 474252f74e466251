"""The domain core imports no Kafka, Faust, DuckDB or SQLAlchemy, directly or not."""

import subprocess
import sys
from pathlib import Path

LEDGER = Path(__file__).resolve().parents[2] / "ledger"
FORBIDDEN = ("faust", "aiokafka", "kafka", "duckdb", "sqlalchemy", "mode", "streams", "projections", "pyarrow")


def core_modules() -> list[str]:
    # The core is the modules directly in ledger/; adapters live in its subpackages.
    return sorted(f"ledger.{p.stem}" for p in LEDGER.glob("*.py") if p.stem != "__init__")


def test_the_core_has_modules_to_check():
    assert {"ledger.account", "ledger.events", "ledger.money", "ledger.plans", "ledger.pricing"} <= set(core_modules())


def test_importing_the_core_loads_no_infrastructure_module():
    code = (
        "import sys\n"
        f"for m in {core_modules()!r}: __import__(m)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    offenders = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_the_check_would_catch_an_offender():
    code = "import sys, duckdb\nprint('\\n'.join(sorted(sys.modules)))\n"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert any(m.split(".")[0] in FORBIDDEN for m in loaded)
