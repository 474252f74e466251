#!/bin/sh
# What the tests need besides Python and the broker: docker-compose (test_compose.py validates the Compose file
# offline, no engine), PostgreSQL's server binaries (tests/pg.py starts a throwaway cluster) and Debian's chromium
# with its chromedriver (tests/integration/test_console_browser.py drives the console headless). Installed with
# apt-get when missing and we are root; otherwise one line each says how to get them, and only the tests that
# need them fail, each with a one-line message. Never fails itself: the test run decides.
set -u

APT_LOCK_WAIT_S=300  # another apt-get (e.g. a parallel CI job) may hold the lock this long
missing=""
have_compose() { command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; }
have_postgres() {
  [ -n "${LEDGER_TEST_DATABASE_URL:-}" ] || command -v initdb >/dev/null 2>&1 \
    || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
have_chromium() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
have_compose || missing="$missing docker-compose"
have_postgres || missing="$missing postgresql"
have_chromium || missing="$missing chromium chromium-driver"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "make test: installing$missing (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  { apt-get -o DPkg::Lock::Timeout=$APT_LOCK_WAIT_S update -qq \
    && apt-get -o DPkg::Lock::Timeout=$APT_LOCK_WAIT_S install -y -qq --no-install-recommends $missing; } >"$log" 2>&1 \
    || echo "make test: apt-get failed: $(tail -n 1 "$log")"
  rm -f "$log"
fi
have_compose || echo "make test: no docker-compose: the tests of tests/integration/test_compose.py will fail; get it with \`sudo apt-get install docker-compose\` (or \`sudo make test-deps\`)"
have_postgres || echo "make test: no PostgreSQL server binaries: the control-plane store's postgresql tests will fail; get them with \`sudo apt-get install postgresql\` (or \`sudo make test-deps\`), or set LEDGER_TEST_DATABASE_URL"
have_chromium || echo "make test: no /usr/bin/chromium or /usr/bin/chromedriver: the console's browser tests will fail; get them with \`sudo apt-get install chromium chromium-driver\` (or \`sudo make test-deps\`)"
exit 0
