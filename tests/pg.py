"""A throwaway PostgreSQL server for tests: initdb in a temp folder, start on 127.0.0.1, stop and delete.

Used when ``LEDGER_TEST_DATABASE_URL`` is not set. Needs the server binaries (Debian's
``postgresql`` package, which `make test` installs as root), not a running cluster. PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` OS user (or an
unprivileged user created for it). Authentication is ``trust``, on localhost only.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import URL, make_url

SUPERUSER = "postgres"
DATABASE = "ledger_test"
FALLBACK_OS_USER = "ledger-pg"  # created only when we are root and there is no `postgres` OS user
START_TIMEOUT_S = 60
# A test server: nothing needs to survive a crash, so skip every fsync.
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "timezone": "'UTC'",
    "max_connections": "100",
}


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing or the server would not start."""


def find_server_bin() -> Path:
    """The folder with initdb and pg_ctl: from PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        folder = Path(os.path.realpath(on_path)).parent
        if (folder / "pg_ctl").exists():
            return folder

    def version(folder: str) -> tuple[int, ...]:
        name = Path(folder).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(Path(folder) / "pg_ctl", os.X_OK):
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
        "run `apt-get install postgresql` (`make test` does as root), or set LEDGER_TEST_DATABASE_URL "
        "to a postgresql+psycopg:// URL of an existing server"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _os_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as, or None when we are not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_OS_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_OS_USER],
                   check=True, capture_output=True)
    return pwd.getpwnam(FALLBACK_OS_USER)


def connect_kwargs(url: str | URL, database: str | None = None) -> dict[str, object]:
    """psycopg.connect keyword arguments for a SQLAlchemy URL (optionally another database on the same server)."""
    u = make_url(url)
    kwargs: dict[str, object] = {"host": u.host, "port": u.port, "user": u.username, "password": u.password,
                                 "dbname": database or u.database}
    kwargs.update({k: v for k, v in u.query.items() if isinstance(v, str)})
    return {k: v for k, v in kwargs.items() if v is not None}


class TempPostgres:
    """``start()`` returns the URL of a fresh database on a new server; ``stop()`` removes everything."""

    def __init__(self) -> None:
        self.bin = find_server_bin()
        self.user = _os_user()
        self.base: Path | None = None
        self.port = 0
        self.url = ""

    @property
    def data(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def log(self) -> Path:
        assert self.base is not None
        return self.base / "server.log"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        # cwd: the server's user may not be allowed into ours.
        return subprocess.run(command, cwd=self.base, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30,
                              stdin=subprocess.DEVNULL)

    def _check(self, done: subprocess.CompletedProcess[str], what: str) -> None:
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{log}")

    def start(self) -> str:
        # Not pytest's tmp_path: it is private to root, and the server runs as another user.
        self.base = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        try:
            if self.user is not None:
                os.chown(self.base, self.user.pw_uid, self.user.pw_gid)
            self._check(self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                                  "--encoding=UTF8", "--locale=C", "--no-sync"), "initdb")
            # Trust, but only over the socket in our private folder and from this machine's loopback.
            (self.data / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n")
            settings = {**SERVER_SETTINGS, "unix_socket_directories": f"'{self.base}'"}
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("\n# tests/pg.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
            self._start_on_free_port()
            self._create_database()
        except BaseException:
            self.stop()
            raise
        self.url = URL.create("postgresql+psycopg", username=SUPERUSER, host="127.0.0.1", port=self.port,
                              database=DATABASE).render_as_string(hide_password=False)
        return self.url

    def _start_on_free_port(self) -> None:
        for attempt in range(3):  # another process may take the port between our probe and the server's bind
            self.port = free_port()
            done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                             "-t", str(START_TIMEOUT_S), "-o", f"-p {self.port}", "start")
            if done.returncode == 0:
                return
            if attempt == 2 or "could not bind" not in self.log.read_text(errors="replace"):
                self._check(done, "pg_ctl start")

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                                     autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.base is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
