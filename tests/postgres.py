"""A throwaway PostgreSQL cluster on a loopback port, for tests of shared study stores."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Yields a `postgresql+psycopg://` URL; the cluster and its files are gone afterwards."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found under /usr/lib/postgresql")
    # The server refuses to run as root: run it as the `postgres` user when we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="search-pg-")
    os.chmod(root, 0o777)
    if as_user:
        shutil.chown(root, "postgres")
    data, port = os.path.join(root, "data"), _free_port()

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, f"{bin_dir}/{tool}", *args], check=True, capture_output=True, timeout=60)

    pg("initdb", "-D", data, "-U", "search", "--auth=trust", "-E", "UTF8", "--no-sync")
    pg(
        "pg_ctl",
        "-D",
        data,
        "-l",
        os.path.join(root, "log"),
        "-w",
        "-o",
        f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off",
        "start",
    )
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "search", "search")
        yield f"postgresql+psycopg://search@127.0.0.1:{port}/search"
    finally:
        pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
