"""`ledger demo` ends with the console's URL and a read key of the demo tenant, kept between runs."""

from ledger.cli.main import _demo_read_key, _demo_tenant
from ledger.control.keys import Scope
from ledger.control.store import ControlStore
from ledger.settings import Settings


def test_the_demo_read_key_has_the_read_scope_only_and_is_the_same_on_a_second_run(tmp_path):
    settings = Settings(home=tmp_path)
    tenant_id, _admin = _demo_tenant(settings, "demo")
    key = _demo_read_key(settings, tenant_id)
    assert _demo_read_key(settings, tenant_id) == key
    assert (tmp_path / "demo-read.key").stat().st_mode & 0o777 == 0o600
    store = ControlStore(settings.control_url)
    with store.session() as session:
        who = session.authenticate(key)
    store.dispose()
    assert who is not None and who.tenant_id == tenant_id and who.scopes == frozenset({Scope.read})
