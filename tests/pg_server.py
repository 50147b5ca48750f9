"""A throwaway PostgreSQL server (initdb + pg_ctl on a free port, under a temporary directory), for the
tests (tests/conftest.py's ``postgres_server``) and bench/store_backends.py.

As root, initdb and the server run as the ``postgres`` user (they refuse to run as root). The server
trusts ``postgres`` on 127.0.0.1 and asks one role, ``runner_secret``, for its password, so that
tests can give a wrong one.
"""

from __future__ import annotations

import functools
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PG_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
PG_PASSWORD_USER = ("runner_secret", "s3cret-pw")  # the one role that must give a password (scram)


@dataclass
class PostgresServer:
    """A PostgreSQL server on 127.0.0.1:``port``; ``postgres`` connects without a password (trust)."""

    port: int
    bin_dir: Path
    directory: Path

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None, host: str = "127.0.0.1",
            port: int | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql+psycopg://{auth}@{host}:{port or self.port}/{database}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Statements outside a transaction (CREATE DATABASE cannot run in one)."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(database), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def databases(self) -> set[str]:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url())
        try:
            with engine.connect() as conn:
                return set(conn.exec_driver_sql("SELECT datname FROM pg_database").scalars())
        finally:
            engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: as root, run them as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def why_no_server() -> str | None:
    """Why no throwaway server can start here, or None."""
    if not PG_BIN_DIRS:
        return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin; apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the PostgreSQL server as"
    return None


@contextmanager
def throwaway_server() -> Iterator[PostgresServer]:
    """A server for the block: its data under a temporary directory, fsync off; stopped and removed after."""
    bin_dir = Path(PG_BIN_DIRS[-1])
    directory = Path(tempfile.mkdtemp(prefix="runner-pg-"))
    directory.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    data, port = directory / "data", free_port()
    run = functools.partial(subprocess.run, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    user, password = PG_PASSWORD_USER
    try:
        run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]))
        (data / "pg_hba.conf").write_text(f"local all all trust\nhost all {user} 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n")
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w", "start"]))
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}") from None
    server = PostgresServer(port, bin_dir, directory)
    try:
        server.execute(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'")
        yield server
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(directory, ignore_errors=True)
