"""Tests for scheduler.py, in the order of its layers:

    Domain, Stores       plain calls, no HTTP
    PostgreSQL protocol  URIs and messages as tables of bytes; a PGConnection over a
                         socket pair, the test playing the server; then a real
                         server (PostgresCluster): logins, TLS, faults, the pool
    Routes               requests through Service.begin() and respond() with the
                         in-process Client
    Wire and connection  the grammar as tables of bytes (fed whole, byte by byte,
                         and with the next request behind); keep-alive; a
                         Connection over a socket pair; the fuzzer
    Over sockets         the real server on a free port: keep-alive, deadlines,
                         limits, races, a stuck log, descriptors; what browsers
                         (CORS), calendar apps and Prometheus do
    Command line         scheduler.py as a process: options, signals, --db
    Benchmark            make bench only: timings, never asserted

Run: make test  (in 5 processes: run_in_parallel()), or python3 -m unittest (in one)
"""

import ast
import atexit
import base64
import collections
import contextlib
import datetime as dt
import decimal
import errno
import fcntl
import functools
import gc
import hashlib
import http.client
import html.parser
import importlib.util
import inspect
import io
import itertools
import json
import multiprocessing
import os
import pwd
import py_compile
import queue
import random
import resource
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import tracemalloc
import types
import unicodedata
import unittest
import urllib.parse
import uuid
from http import HTTPStatus
from unittest import mock
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import scheduler

UTC = dt.timezone.utc
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scheduler.py")
README = os.path.join(HERE, "README.md")
THIS_FILE = os.path.abspath(__file__)
VALID_BODY = b'{"user_id": "alice", "date": "2026-11-25", "time": "09:30"}'
# The interpreter as tests start it: without site-packages (-S), which shows that the
# service needs only the standard library, and spares each start what site-packages
# add to it (a .pth file runs code at every start).
PYTHON = [sys.executable, "-S"]
# How the tests start the service, in HERE: scheduler.py run as __main__, as python3
# scheduler.py runs it, but found as a module, whose bytecode Python reads from its
# cache where make test has written it (compile_service()): a script is compiled at
# every start. The tests of --version and --help run python3 scheduler.py itself, as
# the README shows it; a supervisor started so starts a reload's processes so.
SERVICE = ["-m", "scheduler"]


# --- Helpers: one per recurring chore ---------------------------------------------------


def appointment(user_id="alice", date="2026-11-25", time="09:30") -> scheduler.Appointment:
    return scheduler.parse_appointment({"user_id": user_id, "date": date, "time": time})


ICALENDAR_INSTANT = "%Y%m%dT%H%M%SZ"  # RFC 5545 section 3.3.5, in UTC
LAST_START = f"23:{scheduler.START_MINUTES[-1]:02d}"  # the day's last slot


def ends(date: str, time: str, form: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    """When an appointment booked for date and time ends, by the rules
    (APPOINTMENT_LENGTH), as form writes it: RFC 3339 as the JSON shows it, or
    ICALENDAR_INSTANT as the feed does."""
    start = dt.datetime.strptime(f"{date} {time}", "%Y-%m-%d %H:%M")
    return (start + scheduler.APPOINTMENT_LENGTH).strftime(form)


@contextlib.contextmanager
def other_rules(**rules):
    """The domain's rules with these values (START_MINUTES=(0, 15, 30, 45), say), as
    if the module had been written so, until the block ends: what is made once from
    the rules (the API description) is made again under them, and again after."""
    made_once = (scheduler.openapi_document, scheduler._paths, scheduler._response_components,
                 scheduler._description, scheduler._start_strings, scheduler._stored_start,
                 scheduler._listed)
    try:
        with contextlib.ExitStack() as patches:
            for name, value in rules.items():
                patches.enter_context(mock.patch.object(scheduler, name, value))
            for cache in made_once:
                cache.cache_clear()
            yield
    finally:
        for cache in made_once:
            cache.cache_clear()


def temporary_database(testcase: unittest.TestCase) -> str:
    """A path for an SQLite file in a directory removed when the test ends."""
    directory = tempfile.TemporaryDirectory()
    testcase.addCleanup(directory.cleanup)
    return os.path.join(directory.name, "appointments.db")


_made_database: List[bytes] = []  # made_database()'s file, once made in this process


def made_database(testcase: unittest.TestCase) -> str:
    """A path (as temporary_database()'s) for an SQLite file as the service makes it
    anew, every schema step run and no row: a copy of one made once in this process,
    since running the steps is most of what opening a store costs, and the tests that
    open stores by the hundred test the store, not the steps (SchemaTest does)."""
    if not _made_database:
        path = temporary_database(testcase)
        scheduler.SQLiteStore(path).close()
        with open(path, "rb") as file:
            _made_database.append(file.read())
    path = temporary_database(testcase)
    with open(path, "wb") as file:
        file.write(_made_database[0])
    return path


@contextlib.contextmanager
def database_of_release(path: str, version: int):
    """path opened as the SQLite file that the release of schema version `version`
    left (its steps run, its user_version set), for a test to fill; closed after."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for step in scheduler.SCHEMA_STEPS[:version]:
            step(db)
        db.execute(f"PRAGMA user_version = {version}")
        yield db


def run_all(threads: List[threading.Thread]) -> None:
    """Start the threads, then wait for every one to end."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = ""):
    """Return predicate()'s first true value, as soon as there is one; fail if there
    is none within timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or predicate}")
        time.sleep(0.01)


class Response(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


class _BytesSocket:
    """Enough of a socket for http.client to read a response from bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def read_response(sock, method: str = "GET") -> Response:
    """Read one HTTP response from a socket (or a _BytesSocket), as a client would."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return Response(response.status, response.headers, response.read())


def post_json(conn: http.client.HTTPConnection, body, path: str = "/appointments",
              method: str = "POST") -> Response:
    """Send body as JSON on conn (a booking, by default) and read the response whole."""
    conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
    return response_of(conn)


def response_of(conn: http.client.HTTPConnection) -> Response:
    """The response to the request just sent on conn, read whole."""
    response = conn.getresponse()
    return Response(response.status, response.headers, response.read())


def post_head(length, extra: str = "") -> bytes:
    """The request line and headers of a JSON POST that announces a body of length."""
    return (f"POST /appointments HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


class ServerProcess(NamedTuple):
    process: subprocess.Popen
    host: str
    port: int
    log: "queue.Queue[str]"  # stderr, a line at a time (empty when not kept)
    reader: Optional[threading.Thread]  # puts the lines there; ends when the process does


def start_processes(testcase: unittest.TestCase, runs: List[Tuple[List[str], dict]],
                    keep_log: bool = True, preexec_fn=None, cwd: str = HERE
                    ) -> List[ServerProcess]:
    """Run Python programs that print "Listening on URL" first (scheduler.py, or a
    command of this file's), each with its arguments and environment, all at once,
    in cwd; wait for each one's URL, and kill them when the test ends."""
    started = []
    for args, env in runs:
        process = subprocess.Popen(
            [*PYTHON, *args], stdout=subprocess.PIPE, text=True, cwd=cwd,
            stderr=subprocess.PIPE if keep_log else subprocess.DEVNULL,
            env={**os.environ, **env}, preexec_fn=preexec_fn)
        testcase.addCleanup(process.stdout.close)
        log, reader = queue.Queue(), None
        if keep_log:
            reader = threading.Thread(target=lambda p=process, q=log: [q.put(line)
                                                                       for line in p.stderr])
            reader.start()
            testcase.addCleanup(process.stderr.close)
            testcase.addCleanup(reader.join)
        testcase.addCleanup(process.wait)
        testcase.addCleanup(lambda p=process: p.poll() is None and p.kill())  # first of all
        started.append((process, log, reader))
    servers = []
    for process, log, reader in started:
        line = process.stdout.readline()
        if "Listening on http://" not in line:  # say why: what it logged, how it ended
            if reader is not None:
                reader.join(timeout=10)
            logged = "".join(iter(lambda: log.get() if not log.empty() else "", ""))
            testcase.fail(f"the process printed {line!r}, exit status {process.wait(10)}, "
                          f"and logged: {logged!r}")
        host, port = line.split()[2][len("http://"):].rsplit(":", 1)
        servers.append(ServerProcess(process, host, int(port), log, reader))
    return servers


def read_log_until(server: ServerProcess, text: str) -> List[str]:
    """Read the server's stderr until a line contains text (10 s at most); the lines
    read, that one last."""
    deadline, lines = time.monotonic() + 10, []
    try:
        while not lines or text not in lines[-1]:
            lines.append(server.log.get(timeout=max(0.0, deadline - time.monotonic())))
        return lines
    except queue.Empty:
        raise AssertionError(f"the server never logged {text!r}") from None


def wait_for_log(server: ServerProcess, text: str) -> str:
    """Read the server's stderr until a line contains text (10 s at most); that line."""
    return read_log_until(server, text)[-1]


def http_status(server: ServerProcess, path: str) -> int:
    """The status of a GET of path, on a connection of its own."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def thread_affinities(pid: int) -> List[Set[int]]:
    """The CPU affinity of each thread of process pid. A thread that ends between
    listing and asking (a connection thread finishing) no longer exists, so it is
    left out: what is asserted is about every thread that does."""
    affinities = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            affinities.append(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            pass
    return affinities


_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_METRIC_LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\}'
_METRIC_SAMPLE = re.compile(rf"({_METRIC_NAME})({_METRIC_LABELS})? (\S+)")


def parse_metrics(text: str) -> Dict[Tuple[str, frozenset], float]:
    """The samples of a Prometheus text exposition (format 0.0.4), by name and
    labels, failing on any line that breaks the format: each family declared
    (# TYPE) once, before its samples; each sample well-formed."""
    samples, types = {}, {}
    assert text.endswith("\n"), "the last line must end with a line feed"
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert re.fullmatch(_METRIC_NAME, name) and name not in types, line
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
        elif line.startswith("# HELP "):
            assert re.fullmatch(_METRIC_NAME, line[7:].split(" ")[0]), line
        else:
            match = _METRIC_SAMPLE.fullmatch(line)
            assert match, f"not a sample: {line!r}"
            name, labels, value = match.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in types or types.get(family) == "histogram", f"undeclared: {line!r}"
            key = (name, frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"',
                                              labels or "")))
            assert key not in samples, f"twice: {line!r}"
            samples[key] = float(value)
    return samples


def open_sockets(pid: int) -> int:
    """How many sockets process pid holds open (from /proc). A descriptor closed
    between listing and reading (a connection ending) is not counted: it is not held."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


def accepted_connections(pid: int, port: int) -> int:
    """How many TCP connections process pid holds that clients made to its port (from
    /proc): not its listening socket, nor its own connections out (to PostgreSQL)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile: not held
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in itertools.islice(rows, 1, None):  # sl local rem st ... uid timeout inode
                fields = row.split()
                count += (fields[9] in inodes and fields[3] != "0A"  # 0A: listening
                          and int(fields[1].rsplit(":", 1)[1], 16) == port)
    return count


def start_process(testcase: unittest.TestCase, args: List[str], env=None,
                  keep_log: bool = True, preexec_fn=None, cwd: str = HERE) -> ServerProcess:
    return start_processes(testcase, [(args, env or {})], keep_log, preexec_fn, cwd)[0]


def hold_write_lock(testcase: unittest.TestCase, path: str) -> Callable[[], None]:
    """Take the database's write lock from another connection, as another process
    would; return what releases it (at the latest when the test ends)."""
    other = sqlite3.connect(path, isolation_level=None)
    testcase.addCleanup(other.close)
    other.execute("BEGIN IMMEDIATE")

    def release():
        if other.in_transaction:
            other.execute("ROLLBACK")

    testcase.addCleanup(release)
    return release


# --- Helpers: throwaway PostgreSQL clusters ---------------------------------------------
#
# Tests on PostgreSQL share one cluster per test process (PostgresCluster.shared()), each
# test in a schema of its own (fresh_schema(), or emptied_schema(): one that an earlier
# test gave back, emptied); a test that stops, kills or fails over a server it cannot put
# back as it was makes its own cluster. Where PostgreSQL's server binaries are not found
# those tests are skipped, saying why; under SCHEDULER_REQUIRE_POSTGRES=1 (.ci/run sets
# it) they fail instead.

REQUIRE_POSTGRES = os.environ.get("SCHEDULER_REQUIRE_POSTGRES") == "1"
POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql")
NO_POSTGRES = ("no PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) on PATH or in "
               "/usr/lib/postgresql/*/bin")
NO_OPENSSL = "no openssl command on PATH to make the test certificates with"
POSTGRES_ACCOUNT = "postgres"  # who runs initdb and the server when the tests run as root


@functools.lru_cache(maxsize=None)
def postgres_binaries() -> Optional[str]:
    """The folder of PostgreSQL's server binaries: that of initdb and pg_ctl on PATH
    (through symbolic links, so that psql and pg_basebackup come from the same
    release), else the newest of Debian's /usr/lib/postgresql/N/bin; None if none
    holds them all."""
    folders = []
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        folders.append(os.path.dirname(os.path.realpath(shutil.which("initdb"))))
    try:
        releases = [name for name in os.listdir("/usr/lib/postgresql")
                    if re.fullmatch(r"\d+(\.\d+)?", name)]
    except OSError:
        releases = []
    releases.sort(key=lambda name: tuple(map(int, name.split("."))), reverse=True)
    folders += [f"/usr/lib/postgresql/{release}/bin" for release in releases]
    for folder in folders:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in POSTGRES_PROGRAMS):
            return folder
    return None


@functools.lru_cache(maxsize=None)
def postgres_missing() -> Optional[str]:
    """Why PostgreSQL's tests cannot run here, or None if they can."""
    if postgres_binaries() is None:
        return NO_POSTGRES
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_ACCOUNT)
        except KeyError:
            return f"running as root (initdb refuses root), and no {POSTGRES_ACCOUNT!r} user"
        if not shutil.which("runuser"):
            return "running as root (initdb refuses root), and no runuser command"
    return None


def tls_missing() -> Optional[str]:
    """Why PostgreSQL's TLS tests cannot run here, or None if they can."""
    return postgres_missing() or (None if shutil.which("openssl") else NO_OPENSSL)


def postgres_unavailable(reason: str):
    """Skip the running test, saying why; or fail it where SCHEDULER_REQUIRE_POSTGRES=1."""
    if REQUIRE_POSTGRES:
        raise AssertionError(f"{reason}; SCHEDULER_REQUIRE_POSTGRES=1 says these tests must run")
    raise unittest.SkipTest(reason)


def requires_postgres(test):
    """Decorate a TestCase class or a test method that needs a PostgreSQL server."""
    return _requiring(test, postgres_missing())


def requires_tls(test):
    """Decorate a TestCase class or a test method that needs PostgreSQL with TLS."""
    return _requiring(test, tls_missing())


def _requiring(test, reason: Optional[str]):
    if reason is None:
        return test
    if not REQUIRE_POSTGRES:
        return unittest.skip(reason)(test)
    if isinstance(test, type):
        test.setUpClass = classmethod(lambda cls: postgres_unavailable(reason))
        return test

    @functools.wraps(test)
    def fail(*args, **kwargs):
        postgres_unavailable(reason)
    return fail


class ClusterError(Exception):
    """A PostgreSQL program failed; the message says which, and what it printed."""


def free_port() -> int:
    """A TCP port that nothing listens on at 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return not os.path.isdir("/proc")  # /proc is Linux's: elsewhere, trust kill()
    except (OSError, IndexError):
        return True


def process_children() -> Dict[int, List[int]]:
    """Every process's children, by its process ID: from /proc on Linux, else ps."""
    children = collections.defaultdict(list)
    if os.path.isdir("/proc/self"):
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{name}/stat") as stat:
                    parent = int(stat.read().rpartition(")")[2].split()[1])
            except (ValueError, OSError, IndexError):
                continue
            children[parent].append(int(name))
    else:
        listing = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True,
                                 text=True, timeout=10).stdout
        for line in listing.splitlines():
            pid, parent = map(int, line.split())
            children[parent].append(pid)
    return children


def stop_process_tree(root: int) -> List[int]:
    """SIGSTOP a process and every process under it, the parent before its children so
    that it starts none meanwhile; their IDs, the root's first."""
    stopped, pending = [], [root]
    while pending:
        for pid in pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        children = process_children()
        pending = [child for pid in stopped for child in children.get(pid, ())
                   if child not in stopped]
    return stopped


def read_lock_file(data: str) -> Tuple[Optional[int], Optional[str]]:
    """From a data folder's postmaster.pid: the postmaster's process ID and the ID of
    its System V shared memory segment (PostgreSQL's LOCK_FILE_LINE_SHMEM_KEY)."""
    try:
        with open(os.path.join(data, "postmaster.pid")) as lock_file:
            lines = lock_file.read().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None, None
    shared_memory = lines[6].split() if len(lines) > 6 else []  # its key, then its ID
    return pid, shared_memory[1] if len(shared_memory) == 2 else None


def remove_cluster(folder: str) -> None:
    """Stop at once the server of the data in folder/data, if it runs (an immediate
    shutdown, SIGQUIT; SIGKILL to every process of it after 10 s), remove the shared
    memory a killed server leaves, then the folder."""
    data = os.path.join(folder, "data")
    pid, _ = read_lock_file(data)
    if pid is not None and process_alive(pid):
        pids = stop_process_tree(pid)  # a frozen server must run to shut down
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        for each in pids if process_alive(pid) else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)
    pid, segment = read_lock_file(data)  # still there: the server did not end by itself
    if pid is not None and segment and not process_alive(pid) and shutil.which("ipcrm"):
        subprocess.run(["ipcrm", "-m", segment], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10)
    shutil.rmtree(folder, ignore_errors=True)


def remove_clusters(folder: str) -> None:
    """remove_cluster() for each cluster's folder in folder (scheduler-pg-*, as in a
    run's memory_folder()), then for folder itself."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith("scheduler-pg-"):
            remove_cluster(os.path.join(folder, name))
    remove_cluster(folder)


@functools.lru_cache(maxsize=None)
def watchdog_program() -> str:
    """The program of a watchdog: a process that waits until the test process that
    started it ends (its end of the watchdog's stdin closes, however it ends: even
    by SIGKILL, as a pool's worker does), then removes its folder, a cluster's or a
    run's (remove_clusters()). It is remove_clusters() and what that calls, from
    this file's source: importing the whole file would take longer."""
    functions = (process_alive, process_children, stop_process_tree, read_lock_file,
                 remove_cluster, remove_clusters)
    return ("import collections, contextlib, os, shutil, signal, subprocess, sys, time\n"
            "from typing import Dict, List, Optional, Tuple\n\n"
            + "".join(inspect.getsource(function) + "\n" for function in functions)
            + "signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the tests\n"
              "sys.stdin.buffer.read()\n"
              "remove_clusters(os.path.dirname(os.path.abspath(__file__)))\n")


# The folders that a watchdog of this run watches (make test's memory_folder()): it
# removes the clusters made directly in one when the run ends, so that such a cluster
# needs no watchdog of its own; one left by a test process that died stays until then.
WATCHED: List[str] = []


def start_watchdog(folder: str) -> subprocess.Popen:
    """Start a watchdog (watchdog_program()) in folder, which removes it, and the
    clusters in it, when this process ends without having closed its stdin first."""
    program = os.path.join(folder, "watchdog.py")
    with open(program, "w") as file:
        file.write(watchdog_program())
    return subprocess.Popen(
        [sys.executable, "-S", program], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)


_CERTIFICATE_EXTENSIONS = """\
[req]
distinguished_name = name
[name]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def make_certificates(folder: str) -> Dict[str, str]:
    """With the openssl command, in folder: a CA ("ca"), a server certificate and key
    that it signs for 127.0.0.1 and localhost ("cert", "key"), and another CA that
    signed nothing ("other_ca"); their paths by those names. Elliptic-curve keys
    (P-256): much quicker to make than RSA ones."""
    os.makedirs(folder, exist_ok=True)
    path = functools.partial(os.path.join, folder)
    with open(path("extensions.cnf"), "w") as extensions:
        extensions.write(_CERTIFICATE_EXTENSIONS)

    def openssl(*args):
        result = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=30)
        if result.returncode:
            raise ClusterError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    for name, subject in (("ca", "scheduler test CA"), ("other_ca", "another test CA")):
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        openssl("req", "-new", "-x509", "-key", f"{name}.key", "-subj", f"/CN={subject}",
                "-days", "30", "-config", "extensions.cnf", "-extensions", "ca",
                "-out", f"{name}.crt")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key")
    openssl("req", "-new", "-key", "server.key", "-subj", "/CN=localhost",
            "-config", "extensions.cnf", "-out", "server.csr")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", f"0x{random.getrandbits(63):x}", "-days", "30",
            "-extfile", "extensions.cnf", "-extensions", "server", "-out", "server.crt")
    os.chmod(path("server.key"), 0o600)  # or the server refuses it
    return {"ca": path("ca.crt"), "other_ca": path("other_ca.crt"),
            "cert": path("server.crt"), "key": path("server.key")}


@functools.lru_cache(maxsize=None)
def certificate_files() -> Dict[str, Tuple[str, bytes]]:
    """make_certificates()'s files, made once in this process (in a temporary folder,
    removed at once): (file name, content) by make_certificates()'s names."""
    folder = tempfile.mkdtemp(prefix="scheduler-tls-")
    try:
        files = {}
        for name, path in make_certificates(folder).items():
            with open(path, "rb") as file:
                files[name] = os.path.basename(path), file.read()
        return files
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_certificates(folder: str) -> Dict[str, str]:
    """make_certificates() for a cluster: the same files for every cluster of this
    process, written into folder; their paths by those names. openssl runs on the
    first call only (make test's first call is in the process that starts its pool,
    whose processes inherit what it made)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, (file_name, content) in certificate_files().items():
        paths[name] = path = os.path.join(folder, file_name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
            file.write(content)  # private to the server's user, as it wants its key
    return paths


def ssl_request(port: int, timeout: float) -> Optional[bytes]:
    """Send PostgreSQL's SSLRequest to 127.0.0.1:port; the server's one-byte answer
    (b"S" or b"N"), or None if none came within timeout seconds (a frozen server:
    the kernel still accepts the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877103))
        try:
            return sock.recv(1)
        except socket.timeout:
            return None


_DEFAULT = object()


def _conf_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _psql_text(value) -> str:
    """A value that scheduler's client read, as psql prints it."""
    if isinstance(value, bool):
        return "t" if value else "f"
    return "" if value is None else str(value)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# Where postgres_template() keeps its folder from run to run: the temporary folder as
# this process found it, before make test moved the run's own files (memory_folder()).
TEMPLATES = tempfile.gettempdir()


def postgres_template() -> str:
    """The data folder that each cluster's is a copy of, stopped: made on first need
    and kept in the temporary folder for later runs, one for each PostgreSQL build
    and way of making it. A copy is much quicker than initdb, the roles and the
    database."""
    binary = os.stat(os.path.join(postgres_binaries(), "postgres"))
    recipe = repr((postgres_binaries(), binary.st_size, binary.st_mtime_ns,
                   PostgresCluster.INITDB, PostgresCluster.ROLES, PostgresCluster.DATABASE))
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    folder = os.path.join(TEMPLATES, f"scheduler-pg-template-{os.geteuid()}-{key}")
    data = os.path.join(folder, "data")
    if os.path.isdir(data):
        return data
    os.makedirs(folder, mode=0o700, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock:  # other processes may make it too

        def locked():
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        wait_until(locked, 120, "the lock on the PostgreSQL template")
        if not os.path.isdir(data):
            # Made beside it, on the same file system, to be renamed into place.
            maker = PostgresCluster(folder=tempfile.mkdtemp(prefix="scheduler-pg-", dir=TEMPLATES))
            try:
                maker._make(from_template=False)
                maker.stop()
                os.remove(os.path.join(maker.data, "postmaster.opts"))  # names maker.data
                os.rename(maker.data, data)
            finally:
                maker.cleanup()
    return data


class PostgresCluster:
    """A throwaway PostgreSQL cluster: a data folder in folder (a temporary one by
    default), a server on 127.0.0.1 and a free port, scram-sha-256, TLS where the
    openssl command is found, and these roles (their passwords in PASSWORDS), as
    pg_hba.conf lets them in from 127.0.0.1:

        trust_user   trust
        md5_user     md5 (its password stored as md5)
        plain_user   password (cleartext), over TLS only
        scheduler    scram-sha-256; owns the database "scheduler" (DATABASE), where
                     the store tests work, a schema each (fresh_schema())
        postgres     the superuser, scram-sha-256; admin SQL (sql()) and replication

    Made on its first start(); cleanup() stops the server and removes the folder, or,
    if this process ends first however it ends, a watchdog process does (its own, or
    the run's: WATCHED). As root, initdb, pg_ctl and pg_basebackup run as the postgres
    user (initdb refuses root). Every setting is in postgresql.conf, and pg_ctl always
    writes the server's output to a log file in folder (log()): a server that a test
    restarts must not inherit its pipes. Every wait has a deadline."""

    SUPERUSER = "postgres"
    DATABASE = "scheduler"
    PASSWORDS = {"postgres": "superuser-secret-4b1d", "scheduler": "scheduler-secret-9c2e",
                 "md5_user": "md5-secret-3f7a", "plain_user": "plain-secret-8d5b",
                 "trust_user": None}

    _shared: Dict[int, "PostgresCluster"] = {}  # by process ID
    _numbers = itertools.count(1)

    def __init__(self, folder: Optional[str] = None, settings: Optional[dict] = None):
        self.folder = folder
        self.settings = dict(settings or {})  # postgresql.conf's, over the defaults
        self.name = f"test_{os.getpid()}_{next(self._numbers)}"  # cluster_name
        self.port: Optional[int] = None
        self.ca_file: Optional[str] = None  # None without TLS (no openssl)
        self.other_ca_file: Optional[str] = None
        self.certificates: Dict[str, str] = {}
        self.primary: Optional[PostgresCluster] = None  # of a standby
        self.standbys: List[PostgresCluster] = []
        self._synchronous: List[str] = []  # the standbys that commits wait for
        self._made = False
        self._frozen: List[int] = []
        self._watchdog: Optional[subprocess.Popen] = None
        self._numbers_of_names = itertools.count(1)
        self._spare_schemas: List[str] = []  # emptied_schema()'s, given back
        self._sessions: Dict[str, "scheduler.PGConnection"] = {}  # sql()'s, by database

    @classmethod
    def shared(cls) -> "PostgresCluster":
        """This process's cluster, started on first use (and again if a test left it
        stopped, killed or frozen); removed when the process ends."""
        starting = cls._starting.pop(os.getpid(), None)
        if starting is not None:  # whatever became of it, _start_shared() says now
            starting.join()
        return cls._start_shared()

    @classmethod
    def _start_shared(cls) -> "PostgresCluster":
        cluster = cls._shared.get(os.getpid())  # not one a parent process started
        if cluster is None:
            cluster = cls._shared[os.getpid()] = cls()
            atexit.register(cluster.cleanup)
        return cluster.start()

    _starting: Dict[int, threading.Thread] = {}  # by process ID

    @classmethod
    def start_shared_early(cls) -> None:
        """Start this process's cluster in a thread of its own, while other tests run
        (make test's processes do, as each begins, where PostgreSQL is found); the
        first shared() waits for it. A failure here is shared()'s to report."""
        def start():
            with contextlib.suppress(Exception):
                cls._start_shared()

        if postgres_missing() is None:
            cls._starting[os.getpid()] = thread = threading.Thread(target=start, daemon=True)
            thread.start()

    @classmethod
    def for_test(cls, testcase: unittest.TestCase, settings: Optional[dict] = None
                 ) -> "PostgresCluster":
        """A started cluster of one test's own (to kill, to fail over), removed when
        the test ends."""
        cluster = cls(settings=settings)
        testcase.addCleanup(cluster.cleanup)
        return cluster.start()

    # -- Paths and programs

    @property
    def data(self) -> str:
        return os.path.join(self.folder, "data")

    @property
    def log_file(self) -> str:
        return os.path.join(self.folder, "postgres.log")

    def _program(self, name: str) -> str:
        return os.path.join(postgres_binaries(), name)

    def _run(self, args: List[str], timeout: float = 60, env=None) -> str:
        """Run a PostgreSQL program as the data's owner (the postgres user under root);
        its output, or ClusterError with what it printed."""
        program = os.path.basename(args[0])
        if os.geteuid() == 0:
            args = ["runuser", "-u", POSTGRES_ACCOUNT, "--", *args]
        try:
            result = subprocess.run(args, cwd=self.folder, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{program} did not end within {timeout:g} s") from None
        if result.returncode:
            raise ClusterError(f"{program} failed: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def _pg_ctl(self, *args: str) -> str:
        return self._run([self._program("pg_ctl"), "-D", self.data, *args])

    def _own(self, path: str) -> None:
        """Give path, and all under it, to the postgres user (under root only)."""
        if os.geteuid() != 0:
            return
        shutil.chown(path, POSTGRES_ACCOUNT)
        for top, folders, files in os.walk(path):
            for name in folders + files:
                shutil.chown(os.path.join(top, name), POSTGRES_ACCOUNT)

    def _watch(self) -> None:
        """Start the watchdog that removes this cluster if this process ends first,
        unless one of the run's does (WATCHED)."""
        if os.path.dirname(self.folder) not in WATCHED:
            self._watchdog = start_watchdog(self.folder)

    # -- Making, starting, stopping

    def _make(self, from_template: bool = True) -> None:
        missing = postgres_missing()
        if missing:
            postgres_unavailable(missing)
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="scheduler-pg-")
        os.makedirs(self.folder, exist_ok=True)
        self._watch()
        try:
            if from_template and tls_missing() is None and not self.certificates:
                self._write_certificates()
            self._own(self.folder)
            if os.path.exists(self.data):
                raise ClusterError(f"{self.data} exists: a cluster's folder must not hold one")
            if from_template:
                subprocess.run(["cp", "-a", postgres_template(), self.data], check=True,
                               timeout=60)
                self._write_hba()
                self._start_on_a_free_port()
            else:
                self._initdb()
            self._made = True
        except BaseException:
            self.cleanup()
            raise

    def _write_certificates(self) -> None:
        self.certificates = write_certificates(os.path.join(self.folder, "tls"))
        self.ca_file, self.other_ca_file = self.certificates["ca"], self.certificates["other_ca"]

    INITDB = ["--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1"]
    ROLES = (f"CREATE ROLE scheduler LOGIN PASSWORD {_sql_literal(PASSWORDS['scheduler'])};"
             "SET password_encryption = 'md5';"
             f"CREATE ROLE md5_user LOGIN PASSWORD {_sql_literal(PASSWORDS['md5_user'])};"
             "RESET password_encryption;"
             f"CREATE ROLE plain_user LOGIN PASSWORD {_sql_literal(PASSWORDS['plain_user'])};"
             "CREATE ROLE trust_user LOGIN")

    def _initdb(self) -> None:
        """What postgres_template() keeps: initdb, the roles, the database."""
        password_file = os.path.join(self.folder, "superuser-password")
        with open(password_file, "w") as file:
            file.write(self.PASSWORDS[self.SUPERUSER] + "\n")
        os.chmod(password_file, 0o600)
        self._own(password_file)
        self._run([self._program("initdb"), "-D", self.data, "-U", self.SUPERUSER,
                   f"--pwfile={password_file}", *self.INITDB])
        os.remove(password_file)
        self._write_hba()
        self._start_on_a_free_port()
        self.sql(self.ROLES)
        self.create_database(self.DATABASE)

    def _write_hba(self) -> None:
        lines = ["# TYPE     DATABASE     USER        ADDRESS        METHOD",
                 "host       all          trust_user  127.0.0.1/32   trust",
                 "host       all          md5_user    127.0.0.1/32   md5"]
        if self.ca_file:
            lines.append("hostssl    all          plain_user  127.0.0.1/32   password")
        lines += ["host       all          plain_user  127.0.0.1/32   reject",
                  f"host       replication  {self.SUPERUSER:11} 127.0.0.1/32   scram-sha-256",
                  "host       all          all         127.0.0.1/32   scram-sha-256"]
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as hba:
            hba.write("\n".join(lines) + "\n")

    _SETTINGS_MARK = "# --- Set by test_scheduler.py (the last line of a setting wins) ---"

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": "127.0.0.1", "port": self.port, "unix_socket_directories": "",
            "cluster_name": self.name, "max_connections": 100,
            "log_line_prefix": "%m [%p] %q%u@%d ", "ssl": bool(self.certificates),
            # Shared memory segments as files in the data folder, removed with it: the
            # default's (posix, in /dev/shm) outlive a server that a test kills.
            "dynamic_shared_memory_type": "mmap",
        }
        if self.certificates:
            settings.update(ssl_cert_file=self.certificates["cert"],
                            ssl_key_file=self.certificates["key"])
        if self._synchronous:
            settings["synchronous_standby_names"] = ", ".join(f'"{name}"'
                                                              for name in self._synchronous)
        settings.update(self.settings)
        path = os.path.join(self.data, "postgresql.conf")
        with open(path) as conf:
            text = conf.read().partition("\n" + self._SETTINGS_MARK)[0]
        with open(path, "w") as conf:
            conf.write(f"{text}\n{self._SETTINGS_MARK}\n" + "".join(
                f"{name} = {_conf_value(value)}\n" for name, value in settings.items()))

    def _start_on_a_free_port(self) -> None:
        for attempt in range(3):  # another process may take the port before the server
            self.port = free_port()
            self._write_settings()
            logged = len(self.log())
            try:
                self._pg_ctl("start", "-w", "-t", "30", "-l", self.log_file)
                return
            except ClusterError as error:
                if "could not bind" not in self.log()[logged:] or attempt == 2:
                    raise ClusterError(f"{error}; the server logged:\n{self.log()[logged:]}") \
                        from None

    def start(self) -> "PostgresCluster":
        """Make the cluster if it is not made yet, and start its server if it is not
        running (thawing it if frozen)."""
        if not self._made:
            self._make()
        elif self._frozen:
            self.thaw()
        if self.pid is None:
            pid, _ = read_lock_file(self.data)
            if pid is not None:  # a killed server's, which a zombie may keep alive to PostgreSQL
                os.remove(os.path.join(self.data, "postmaster.pid"))
            self._pg_ctl("start", "-w", "-t", "30", "-l", self.log_file)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down (pg_ctl stop's mode: smart, fast or immediate)."""
        self.thaw()
        if self.pid is not None:
            self._pg_ctl("stop", "-m", mode, "-w", "-t", "30")

    def restart(self, mode: str = "fast") -> None:
        self.thaw()
        if self.pid is None:
            self.start()
        else:
            self._pg_ctl("restart", "-m", mode, "-w", "-t", "30", "-l", self.log_file)

    def kill(self) -> None:
        """SIGKILL the postmaster and every process under it, as when a machine is
        lost: no shutdown, no checkpoint; start() recovers from the WAL."""
        pid = self.pid
        if pid is None:
            return
        pids = stop_process_tree(pid)
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)
        self._frozen = []
        wait_until(lambda: not any(map(process_alive, pids)), 10, f"the end of {self.name}")

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every process under it, as a frozen machine or a
        network partition: the kernel still accepts connections, nothing answers
        them, until thaw()."""
        pid = self.pid
        if pid is None:
            raise ClusterError(f"{self.name} is not running")
        self._frozen += stop_process_tree(pid)

    def thaw(self) -> None:
        for pid in reversed(self._frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    def cleanup(self) -> None:
        """Remove the standbys made from this cluster, stop the server, remove the
        folder. Can be called again."""
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        for standby in reversed(self.standbys):
            standby.cleanup()
        if self.primary is not None and self in self.primary.standbys:
            self.primary.standbys.remove(self)
            self.primary._forget_standby(self.name)
        self._frozen = []
        if self.folder is not None and os.path.isdir(self.folder):
            remove_cluster(self.folder)
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(10)
            self._watchdog = None
        self._made = False
        if PostgresCluster._shared.get(os.getpid()) is self:
            del PostgresCluster._shared[os.getpid()]

    # -- What tests read and use

    @property
    def pid(self) -> Optional[int]:
        """The postmaster's process ID, None if no server runs."""
        pid, _ = read_lock_file(self.data) if self.folder else (None, None)
        return pid if pid is not None and process_alive(pid) else None

    def log(self) -> str:
        """What the server has logged (pg_ctl -l's file)."""
        try:
            with open(self.log_file, errors="replace") as log:
                return log.read()
        except (OSError, TypeError):
            return ""

    def uri(self, user: str = "scheduler", password=_DEFAULT, database: str = DATABASE,
            others: Tuple["PostgresCluster", ...] = (), **params) -> str:
        """A libpq connection URI for user (with the user's own password unless given;
        None for none) on this cluster's server, then those of others (a multi-host
        URI: a standby's), with params as its query."""
        if password is _DEFAULT:
            password = self.PASSWORDS.get(user)
        quote = functools.partial(urllib.parse.quote, safe="")
        who = quote(user) + ("" if password is None else ":" + quote(password))
        hosts = ",".join(f"127.0.0.1:{cluster.port}" for cluster in (self, *others))
        query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="/")
        return f"postgresql://{who}@{hosts}/{quote(database)}" + (f"?{query}" if query else "")

    def sql(self, statement: str, database: str = "postgres", timeout: float = 30) -> str:
        """Run statement (several, separated by ';', run in one transaction) as the
        superuser; the rows it returns as psql -A -t prints them: a line each,
        columns separated by '|', NULL empty, booleans t and f. ClusterError if it
        fails. Through scheduler's client, on a session kept from call to call
        (_session()), not a psql each: that cost more than most statements."""
        deadline = time.monotonic() + timeout
        try:
            session = self._session(database, timeout)
            results = session.run_script(statement, deadline)
            session.run_script("DISCARD ALL", deadline)  # a SET ROLE, say, ends here
        except (scheduler.PGError, scheduler.PGConnectionError) as error:
            self._discard(database)
            raise ClusterError(f"{statement!r} on {self.name}: {error}") from None
        if database not in ("postgres", self.DATABASE):
            self._discard(database)  # a test's own, which it may drop
        return "\n".join("|".join(map(_psql_text, row)) for result in results
                          for row in result.rows)

    def _session(self, database: str, timeout: float = 30) -> "scheduler.PGConnection":
        """The superuser's session on database: the one kept if the server has not
        ended it (a restart, a kill) meanwhile, else a new one (without TLS, its
        statements cut off after timeout seconds) that is kept."""
        session = self._sessions.pop(database, None)
        if session is not None and session.check_idle():
            self._sessions[database] = session
            return session
        if session is not None:
            session.close()
        settings = scheduler.parse_postgres_uri(self.uri(
            self.SUPERUSER, database=database, sslmode="disable",
            application_name="test_scheduler"))._replace(
                session=(("statement_timeout", str(round(timeout * 1000))),))
        self._sessions[database] = session = scheduler.pg_connect(
            settings, time.monotonic() + timeout)
        return session

    def _discard(self, database: str) -> None:
        """Close the session kept on database, in whatever state a failure left it."""
        session = self._sessions.pop(database, None)
        if session is not None:
            session.close()

    def new_schema_name(self) -> str:
        """A schema name that no other call here returns."""
        return f"test_{os.getpid()}_{next(self._numbers_of_names)}"

    def fresh_schema(self, testcase: unittest.TestCase, database: str = DATABASE) -> str:
        """A schema name for one test, in database. Not dropped when the test ends
        (that took a psql process a test): the cluster is thrown away whole."""
        return self.new_schema_name()

    def emptied_schema(self, testcase: unittest.TestCase) -> str:
        """A schema in DATABASE for one test that changes only the rows in its store's
        tables (through the store's methods, or SQL as a tool would), never the
        tables (OnPostgres, PostgresStoreTest): one that a store made for an earlier
        test of this process, emptied of its rows, else a new name; given back for
        the next test when this one ends. Making a store's tables cost more than the
        rest of such a test. A schema that cannot be emptied (a test left the server
        down, say) is left alone."""
        while self._spare_schemas:
            schema = self._spare_schemas.pop()
            try:
                self._empty(schema)
            except (scheduler.PGError, scheduler.PGConnectionError, LookupError):
                continue
            break
        else:
            schema = self.new_schema_name()
        testcase.addCleanup(self._spare_schemas.append, schema)
        return schema

    def _empty(self, schema: str) -> None:
        """Delete every row that a test made in the store's tables in schema, as the
        store's own SQL would (the triggers keep the counts), in one transaction."""
        session = self._session(self.DATABASE)
        try:
            tables = [name for name, in session.query(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", (schema,)).rows]
            if "appointments" not in tables:
                raise LookupError(f"schema {schema} holds no store")  # left alone
            session.queries([("BEGIN", ())] + [
                (f'DELETE FROM "{schema}"."{table}"', ()) for table in
                ["appointments"] + sorted(set(tables) - {"appointments", "schema_version",
                                                          "appointment_count"})]
                + [("COMMIT", ())])
        except BaseException:
            self._discard(self.DATABASE)
            raise

    def _drop(self, statement: str, database: str = "postgres") -> None:
        """Run statement unless the server is down or frozen (a test that left it so
        gets an error of its own; shared() starts it for the next)."""
        if self.pid is not None and not self._frozen:
            self.sql(statement, database)

    def create_database(self, name: str, owner: str = "scheduler") -> str:
        self.sql(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        return name

    def fresh_database(self, testcase: unittest.TestCase) -> str:
        """A database of one test's own, owned by scheduler; dropped when it ends."""
        name = self.create_database(self.new_schema_name())
        testcase.addCleanup(self._drop, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return name

    # -- Replication

    def standby(self, synchronous: bool = True) -> "PostgresCluster":
        """A standby of this cluster (pg_basebackup -R), started on a free port of its
        own and streaming; if synchronous, this cluster's commits wait for it
        (synchronous_standby_names), until its cleanup(). Its cleanup() is the test's
        to register (this cluster's cleanup() does it too)."""
        standby = PostgresCluster(settings=self.settings)
        standby.primary = self
        standby.folder = tempfile.mkdtemp(prefix="scheduler-pg-")
        standby._watch()
        try:
            if self.certificates:  # its own copy: it may outlive this cluster's folder
                standby._write_certificates()
            standby._own(standby.folder)
            env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
            env["PGPASSWORD"] = self.PASSWORDS[self.SUPERUSER]
            standby._run([self._program("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port),
                          "-U", self.SUPERUSER, "-D", standby.data, "-R", "--checkpoint=fast",
                          "--no-sync", "--no-manifest", "--no-password"], env=env)
            standby._start_on_a_free_port()
            standby._made = True
            self.standbys.append(standby)
            if synchronous:
                self._synchronous.append(standby.name)
                self._write_settings()
                self.sql("SELECT pg_reload_conf()")
            state = "streaming|sync" if synchronous else "streaming|async"
            wait_until(lambda: self.sql("SELECT state, sync_state FROM pg_stat_replication "
                                        f"WHERE application_name = '{standby.name}'") == state,
                       30, f"{standby.name}: {state}")
        except BaseException:
            standby.cleanup()
            raise
        return standby

    def _forget_standby(self, name: str) -> None:
        """Commits here stop waiting for that standby, which is going away."""
        if name in self._synchronous:
            self._synchronous.remove(name)
            if self._made:
                self._write_settings()  # read at the next start if not now
            if self.pid is not None and not self._frozen:
                self.sql("SELECT pg_reload_conf()")

    def promote(self) -> None:
        """Make this standby a primary (pg_ctl promote -w): it writes from now on. Its
        old primary is not told (the failover tests kill it first)."""
        self._pg_ctl("promote", "-w", "-t", "30")


class HTTPTestCase(unittest.TestCase):
    """What route tests and socket tests share: a fresh store (in memory unless
    make_store says otherwise), booking, and checking problems. Subclasses say how
    a request is sent: request()."""

    def make_store(self) -> scheduler.Store:
        return scheduler.InMemoryStore()

    def setUp(self):
        self.store = self.make_store()
        self.addCleanup(self.store.close)

    def request(self, method, path, body=None, headers=None) -> Response:
        raise NotImplementedError

    def book(self, user_id="alice", date="2026-11-25", time="09:30", note=None,
             **kwargs) -> Response:
        fields = {"user_id": user_id, "date": date, "time": time}
        return self.request("POST", "/appointments", fields if note is None else
                            {**fields, "note": note}, **kwargs)

    def assertFramed(self, method: str, response: Response) -> Response:
        """A response with content says how long it is, exactly; returns it."""
        if method != "HEAD" and response.status not in (204, 304):
            self.assertEqual(response.headers["Content-Length"], str(len(response.body)))
        return response

    def assertProblem(self, response: Response, status: int) -> dict:
        """The response is an RFC 9457 problem with this status; returns its body."""
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/problem+json")
        problem = response.json()
        self.assertEqual(problem["status"], status)
        self.assertEqual(problem["type"], "about:blank")
        self.assertIsInstance(problem["title"], str)
        self.assertIsInstance(problem["detail"], str)
        self.assertNotIn("Traceback", problem["detail"])
        return problem

    def stored(self, user_id="alice") -> list:
        return self.store.list_for_user(user_id)

    def metric(self, name: str, conn=None, **labels) -> float:
        """One sample from GET /metrics (on conn, if given), which must parse as the
        format says."""
        response = self.request("GET", "/metrics", **({"conn": conn} if conn else {}))
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.headers["Content-Type"], scheduler.METRICS_TYPE)
        return parse_metrics(response.body.decode())[(name, frozenset(labels.items()))]


class OnSQLite:
    """Mixed into a test class: the same tests, with appointments in an SQLite file."""

    def make_store(self):
        return scheduler.SQLiteStore(made_database(self))


def postgres_store(testcase: unittest.TestCase, cluster: Optional["PostgresCluster"] = None,
                   **options) -> "scheduler.PostgresStore":
    """A PostgresStore on cluster (this process's shared one by default), in a schema
    of the test's own unless options name one; closed when the test ends. Skips
    (or fails, under SCHEDULER_REQUIRE_POSTGRES=1) where PostgreSQL is missing."""
    if postgres_missing():
        postgres_unavailable(postgres_missing())
    cluster = cluster or PostgresCluster.shared()
    options.setdefault("schema", cluster.fresh_schema(testcase))
    store = scheduler.PostgresStore(scheduler.parse_postgres_uri(cluster.uri()), **options)
    testcase.addCleanup(store.close)
    return store


class OnPostgres:
    """Mixed into a test class: the same tests, with appointments in PostgreSQL."""

    def make_store(self):
        return postgres_store(self, schema=PostgresCluster.shared().emptied_schema(self))


def on_every_store(cls):
    """For a test class whose tests touch a store: they run as the class is, in memory,
    and again on SQLite and on PostgreSQL, as the classes SQLite<its name> and
    Postgres<its name> that this makes beside it."""
    for prefix, mixin, where in (("SQLite", OnSQLite, "in an SQLite file"),
                                 ("Postgres", OnPostgres, "in PostgreSQL")):
        name = f"{prefix}{cls.__name__}"
        globals()[name] = type(name, (mixin, cls), {
            "__doc__": f"{cls.__name__}, with appointments {where}.",
            "__module__": cls.__module__, "__qualname__": name})
    return cls


# --- Domain ---------------------------------------------------------------------------


class ParserCases:
    """A field parser's table of cases: VALID (value, result) pairs parse to the
    result; INVALID (value, message) pairs raise ValueError matching message."""

    parse = None
    VALID: list = []
    INVALID: list = []

    def test_valid(self):
        for value, expected in self.VALID:
            with self.subTest(value=value):
                self.assertEqual(self.parse(value), expected)

    def test_invalid(self):
        for value, message in self.INVALID:
            with self.subTest(value=value):
                with self.assertRaisesRegex(ValueError, message):
                    self.parse(value)


class ParseUserIdTest(ParserCases, unittest.TestCase):
    parse = staticmethod(scheduler.parse_user_id)
    VALID = [
        ("alice", "alice"),
        ("alice+bob@example.com", "alice+bob@example.com"),
        ("a/b c", "a/b c"),
        ("Zoë 東京", "Zoë 東京"),
        ("x" * 256, "x" * 256),
        ("...", "..."),  # not a dot segment: a URL holds it
        (".alice", ".alice"),
        # Joiners between visible non-ASCII characters: emoji sequences, joining scripts.
        ("dev-\U0001F469\u200d\U0001F4BB", "dev-\U0001F469\u200d\U0001F4BB"),  # woman coder
        ("\U0001F3F3\ufe0f\u200d\U0001F308", "\U0001F3F3\ufe0f\u200d\U0001F308"),  # rainbow flag
        ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"),  # Persian
        ("\u0915\u094d\u200d\u0937", "\u0915\u094d\u200d\u0937"),  # Devanagari, half form
        # A variation selector after an emoji: health worker, keycap, the emoji that are
        # not symbols (category S), text presentation.
        ("\U0001F469\u200d\u2695\ufe0f", "\U0001F469\u200d\u2695\ufe0f"),
        ("room 1\ufe0f\u20e3", "room 1\ufe0f\u20e3"),
        ("\u203c\ufe0f\u2139\ufe0f", "\u203c\ufe0f\u2139\ufe0f"),
        ("\u2695\ufe0e", "\u2695\ufe0e"),
        # One user in NFC, Unicode's composed form, whatever form it is sent in.
        ("Jose\u0301", "Jos\u00e9"),
        ("Jos\u00e9", "Jos\u00e9"),
        ("\u212b", "\u00c5"),  # ANGSTROM SIGN is A WITH RING ABOVE
        ("\u1100\u1161\u11a8", "\uac01"),  # Hangul jamo, as one syllable
        ("e\u0301" * 256, "\u00e9" * 256),  # its length counted in NFC
        (42, "42"),
        ("42", "42"),
        (-7, "-7"),
        # JSON Schema's integers: numbers without a fraction, as decode_json reads them.
        (decimal.Decimal("42.0"), "42"),
        (decimal.Decimal("4.2e1"), "42"),
        (decimal.Decimal("-0.0"), "0"),
        (decimal.Decimal("12345678901234567890.0"), "12345678901234567890"),  # exactly
        (decimal.Decimal("9" * 256 + ".0"), "9" * 256),
    ]
    INVALID = [
        (True, "string or an integer"),
        (False, "string or an integer"),
        (None, "string or an integer"),
        (1.5, "string or an integer"),
        (decimal.Decimal("1.5"), "string or an integer"),
        (decimal.Decimal("1e256"), "at most 256"),
        (decimal.Decimal("1e999999999"), "at most 256"),
        (decimal.Decimal("NaN"), "string or an integer"),
        (-10 ** 255, "at most 256"),  # the minus sign makes 257 characters
        (["alice"], "string or an integer"),
        ({"id": "alice"}, "string or an integer"),
        ("", "empty"),
        ("x" * 257, "at most 256"),
        (10 ** 300, "at most 256"),
        ("al\x00ice", "control characters"),
        ("alice\n", "control characters"),
        ("al\x7fice", "control characters"),
        ("al\x85ice", "control characters"),
        ("al\ud800ice", "lone surrogates"),
        (" alice", "whitespace"),
        ("alice\u3000", "whitespace"),
        (".", "must not be \\. or \\.\\.: an appointment's URL could not hold it"),
        ("..", "must not be \\. or \\.\\."),
        # Invisible format characters: alike-looking IDs, or text reversed (Trojan Source).
        ("alice\u200b", "U\\+200B \\(ZERO WIDTH SPACE\\)"),
        ("ali\u200dce", "U\\+200D"),  # a joiner between ASCII letters joins nothing
        ("alice\u200d", "U\\+200D"),
        ("\u200c\u0645", "U\\+200C"),
        ("alice\u2060", "U\\+2060"),
        ("\ufeffalice", "U\\+FEFF"),
        ("user\u202eecila", "U\\+202E \\(RIGHT-TO-LEFT OVERRIDE\\)"),
        ("user\u2066x\u2069", "U\\+2066"),
        ("al\u00adice", "U\\+00AD \\(SOFT HYPHEN\\)"),
        ("\U0001F3F4\U000E0067\U000E007F", "U\\+E0067"),  # tag characters
        ("ali\u2028ce", "U\\+2028 \\(LINE SEPARATOR\\)"),  # breaks lines where shown
        ("ali\u2029ce", "U\\+2029"),
        # Default-ignorable characters and blank look-alikes: "alice" seen twice.
        ("alice\u3164", "U\\+3164 \\(HANGUL FILLER\\)"),
        ("alice\uffa0", "U\\+FFA0 \\(HALFWIDTH HANGUL FILLER\\)"),
        ("alice\u115f", "U\\+115F \\(HANGUL CHOSEONG FILLER\\)"),
        ("alice\u1160", "U\\+1160 \\(HANGUL JUNGSEONG FILLER\\)"),
        ("alice\u2800", "U\\+2800 \\(BRAILLE PATTERN BLANK\\)"),
        ("alice\ufe0f", "U\\+FE0F \\(VARIATION SELECTOR-16\\)"),
        ("alice\u034f", "U\\+034F \\(COMBINING GRAPHEME JOINER\\)"),
        ("alice\u17b4", "U\\+17B4 \\(KHMER VOWEL INHERENT AQ\\)"),
        ("alice\U000E0100", "U\\+E0100 \\(VARIATION SELECTOR-17\\)"),
        ("alice\U0001D159", "U\\+1D159 \\(MUSICAL SYMBOL NULL NOTEHEAD\\)"),
        ("\u3164", "U\\+3164"),
        ("ali\u180bce", "U\\+180B"),
        ("\u6771\ufe00", "U\\+FE00"),  # only VS15 and VS16 go with emoji
        ("alice\U000E0500", "U\\+E0500 \\(unnamed: a reserved code point\\)"),
        ("1\ufe0f", "U\\+FE0F"),  # a keycap's base alone: VS16 changes nothing shown
        ("#\ufe0e\u20e3", "U\\+FE0E"),
        ("\u2695\ufe0f\ufe0f", "U\\+FE0F"),
        ("\u00e9\ufe0f", "U\\+FE0F"),  # after a letter
        ("\U0001F469\u200d\u3164", "U\\+3164"),
        # Rules hold for the NFC form: a joiner beside what becomes ASCII, and a length
        # that grows (one letter is three code points in NFC).
        ("\u212a\u200d\u00e9", "U\\+200D"),  # KELVIN SIGN is K
        ("\ufb2c" * 86, "at most 256 characters long \\(counted in NFC"),
        ("e\u0301" * 257, "at most 256 characters long \\(counted in NFC"),
        ("e\u0301" * 1025, "at most 256 characters long \\(counted in NFC"),
    ]

    def test_nfc_joins_at_most_four_code_points_into_one(self):
        # So text longer than 4 x 256 is not normalized to learn that it is too long.
        longest = max(len(unicodedata.normalize("NFD", chr(code)))
                      for code in range(sys.maxunicode + 1)
                      if unicodedata.decomposition(chr(code))[:1] not in ("", "<"))
        self.assertLessEqual(longest, scheduler._MOST_JOINED_BY_NFC)


class ParseDateTest(ParserCases, unittest.TestCase):
    parse = staticmethod(scheduler.parse_date)
    VALID = [
        ("2026-11-25", dt.date(2026, 11, 25)),
        ("2024-02-29", dt.date(2024, 2, 29)),  # leap year
        ("2000-01-01", dt.date(2000, 1, 1)),
        ("2019-01-01", dt.date(2019, 1, 1)),  # past dates are bookable
        ("2099-12-31", dt.date(2099, 12, 31)),  # the last
    ]
    INVALID = [
        ("2025-02-29", "not a real calendar date"),
        ("2026-13-01", "not a real calendar date"),
        ("2026-11-31", "not a real calendar date"),
        ("0000-01-01", "not a real calendar date"),
        ("1999-12-31", "outside the dates that can be booked, 2000-01-01 to 2099-12-31"),
        ("2100-01-01", "outside the dates that can be booked"),
        ("9999-12-31", "outside the dates that can be booked"),
        ("2026-1-5", "YYYY-MM-DD"),
        ("20261105", "YYYY-MM-DD"),
        ("2026-W45-3", "YYYY-MM-DD"),
        ("2026-11-25T09:30", "YYYY-MM-DD"),
        ("2026-11-25\n", "YYYY-MM-DD"),
        (" 2026-11-25", "YYYY-MM-DD"),
        ("٢٠٢٦-١١-٢٥", "YYYY-MM-DD"),  # Arabic-Indic digits match \d, not [0-9]
        ("", "YYYY-MM-DD"),
        (20261125, "YYYY-MM-DD"),
        (None, "YYYY-MM-DD"),
    ]


class ParseTimeTest(ParserCases, unittest.TestCase):
    parse = staticmethod(scheduler.parse_time)
    STARTS = scheduler.starts_in_words()  # "on the hour or half hour", by the rules
    VALID = [
        ("00:00", dt.time(0, 0)),
        ("09:00", dt.time(9, 0)),
        ("13:30", dt.time(13, 30)),
        ("23:30", dt.time(23, 30)),
    ]
    INVALID = [
        ("09:15", STARTS),
        ("09:59", STARTS),
        ("9:00", STARTS),
        ("24:00", "00 to 23"),
        ("09:00:00", STARTS),
        ("0900", STARTS),
        ("9:30am", STARTS),
        ("09:30\n", STARTS),
        ("０９:３０", STARTS),  # full-width digits
        ("", STARTS),
        (930, "HH:MM"),
        (None, "HH:MM"),
    ]


class ParseNoteTest(ParserCases, unittest.TestCase):
    parse = staticmethod(scheduler.parse_note)
    VALID = [
        ("Bring the X-ray, please; thanks.", "Bring the X-ray, please; thanks."),
        ("line 1\nline 2\n", "line 1\nline 2\n"),
        ("line 1\r\nline 2", "line 1\nline 2"),  # one line break, as a browser sends it
        ("", None),  # an empty note is none
        ("x" * 500, "x" * 500),
        ("\r\n" * 250, "\n" * 250),  # 500 as sent
        ("Zoë 東京 \U0001F469\u200d\U0001F4BB", "Zoë 東京 \U0001F469\u200d\U0001F4BB"),
        # Free text, shown as written: not normalized, and characters that only a user
        # ID refuses (variation selectors, Mongolian's, blanks) kept.
        ("Jose\u0301", "Jose\u0301"),
        ("\u845b\U000E0100\u98fe", "\u845b\U000E0100\u98fe"),  # an ideographic variant
        ("\u1820\u180b \u2800 ok\ufe0f", "\u1820\u180b \u2800 ok\ufe0f"),
    ]
    INVALID = [
        (42, "must be a string"),
        (["a note"], "must be a string"),
        ({"text": "a note"}, "must be a string"),
        ("x" * 501, "at most 500"),
        ("a\tb", "control characters \\(U\\+0009\\)"),
        ("a\rb", "U\\+000D"),  # a carriage return on its own is not a line break here
        ("a\x00b", "U\\+0000"),
        ("a\x85b", "U\\+0085"),
        ("a\ud800b", "lone surrogates"),
        ("a\u200bb", "U\\+200B \\(ZERO WIDTH SPACE\\)"),
        ("a\u202eb", "U\\+202E"),
        ("a\u2028b", "U\\+2028"),
        ("tag\U000E0041", "U\\+E0041"),
    ]


class DecodeJsonTest(unittest.TestCase):
    # RFC 8259 section 2: space, tab, CR and LF may come before and after the value, and
    # nothing else; an error says where, as json does.
    CASES = [
        (b' \t\r\n{"a": 1} \n', {"a": 1}),
        (b'{"a": 1}x', "Extra data: line 1 column 9 (char 8)"),
        (b'{"a": 1}\n\n x', "Extra data: line 3 column 2 (char 11)"),
        (b"{} {}", "Extra data: line 1 column 4 (char 3)"),
        (b" \n ", "Expecting value: line 2 column 2 (char 3)"),
        (b"\x0c{}", "Expecting value: line 1 column 1 (char 0)"),  # a form feed is not JSON's
        (b"\xc2\xa0{}", "Expecting value: line 1 column 1 (char 0)"),  # nor a no-break space
    ]

    def test_whitespace_around_the_value(self):
        for body, expected in self.CASES:
            with self.subTest(body=body):
                if isinstance(expected, dict):
                    self.assertEqual(scheduler.decode_json(body), expected)
                else:
                    with self.assertRaises(scheduler.HTTPError) as raised:
                        scheduler.decode_json(body)
                    self.assertEqual(raised.exception.detail,
                                     f"The request body is not valid JSON: {expected}.")


class ParseAppointmentTest(unittest.TestCase):
    def test_builds_a_utc_appointment(self):
        booked = appointment("alice", "2026-11-25", "09:30")
        self.assertEqual(booked.user_id, "alice")
        self.assertEqual(booked.start, dt.datetime(2026, 11, 25, 9, 30, tzinfo=UTC))
        self.assertEqual(booked.end.strftime("%Y-%m-%dT%H:%M:%SZ"), ends("2026-11-25", "09:30"))
        self.assertEqual(booked.end.tzinfo, UTC)

    def test_json_shape(self):
        self.assertEqual(appointment(42, "2026-11-25", "09:30").as_json(), {
            "user_id": "42", "date": "2026-11-25", "time": "09:30",
            "start": "2026-11-25T09:30:00Z", "end": ends("2026-11-25", "09:30")})

    def test_last_slot_ends_at_midnight_next_day(self):
        booked = appointment(date="2026-12-31", time=LAST_START)
        self.assertEqual(booked.as_json()["end"], "2027-01-01T00:00:00Z")
        self.assertEqual(booked.date, dt.date(2026, 12, 31))

    def test_unknown_fields_are_ignored(self):
        fields = {"user_id": "alice", "date": "2026-11-25", "time": "09:30", "colour": "red"}
        self.assertEqual(scheduler.parse_appointment(fields), appointment())

    def test_every_bad_field_is_reported_at_once(self):
        with self.assertRaises(scheduler.InvalidAppointment) as caught:
            scheduler.parse_appointment({"user_id": True, "date": "2025-02-29"})
        errors = caught.exception.errors
        self.assertEqual([field for field, _ in errors], ["user_id", "date", "time"])
        self.assertEqual(errors[2], ("time", "time is required"))


class ModuleLayoutTest(unittest.TestCase):
    """scheduler.py reads top to bottom, as its docstring says: no section uses a
    name that a section below it defines, and part two, the HTTP runtime, reaches
    part one, the service, only through Service and Metrics and the values they
    take and give (its command line, where the two are put together, aside)."""

    RUNTIME_TAKES = frozenset({  # from part one, besides Service and Metrics
        "RequestHead", "Reply", "HTTPError", "Limits", "ClientGone", "content_of",
        "CLIENT_GONE", "UNMATCHED", "REASONS", "KNOWN_METHODS", "SERVER_NAME",
        "DEFAULT_HOST", "DEFAULT_PORT", "Sample", "SeriesLayout", "Reading"})

    @staticmethod
    def statements() -> List[Tuple[int, str, ast.stmt]]:
        """Each top-level statement below the first banner: its part (1 or 2), its
        section, and itself."""
        with open(SCRIPT, encoding="utf-8") as file:
            source = file.read()
        marks = []  # (line, part, section)
        part = 0
        for number, line in enumerate(source.splitlines(), 1):
            if line.startswith("# Part "):
                part += 1
            found = re.match(r"# --- (.+?) -+$", line)
            if found:
                marks.append((number, part, found.group(1)))
        placed = []
        for node in ast.parse(source).body:
            before = [mark for mark in marks if mark[0] <= node.lineno]
            if before:
                placed.append((before[-1][1], before[-1][2], node))
        return placed

    @staticmethod
    def defined(node: ast.stmt) -> List[str]:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return [node.name]
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        return [name.id for target in targets for name in ast.walk(target)
                if isinstance(name, ast.Name)]

    @staticmethod
    def used(node: ast.AST) -> Set[str]:
        """The module-level names node reads (in quoted annotations too), less those
        that a function or class inside it binds for itself."""
        found: Set[str] = set()

        def visit(node: ast.AST, bound: frozenset) -> None:
            if isinstance(node, (ast.FunctionDef, ast.Lambda, ast.ClassDef)):
                own: Set[str] = set()
                if not isinstance(node, ast.ClassDef):
                    arguments = node.args
                    own |= {argument.arg for argument in (
                        *arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                        arguments.vararg, arguments.kwarg) if argument is not None}
                for child in ast.walk(node):
                    if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                        own.add(child.id)
                    elif isinstance(child, ast.ExceptHandler) and child.name:
                        own.add(child.name)
                bound = bound | own
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) \
                    and node.id not in bound:
                found.add(node.id)
            annotations = [getattr(node, "returns", None), getattr(node, "annotation", None)]
            for annotation in filter(None, annotations):
                for text in ast.walk(annotation):
                    if isinstance(text, ast.Constant) and isinstance(text.value, str):
                        found.update(re.findall(r"[A-Za-z_]\w*", text.value))
            for child in ast.iter_child_nodes(node):
                visit(child, bound)

        visit(node, frozenset())
        return found

    def test_no_section_uses_one_below_it(self):
        placed = self.statements()
        where = {}  # name: its section's place in the file
        sections = list(dict.fromkeys(section for _, section, _ in placed))
        for _, section, node in placed:
            for name in self.defined(node):
                where.setdefault(name, sections.index(section))
        for _, section, node in placed:
            for name in sorted(self.used(node)):
                with self.subTest(section=section, name=name):
                    self.assertLessEqual(where.get(name, -1), sections.index(section),
                                         f"{section} (line {node.lineno}) uses {name}, "
                                         "which a section below it defines")

    def test_the_runtime_reaches_the_service_through_service_and_metrics(self):
        placed = self.statements()
        self.assertEqual(sorted({part for part, _, _ in placed}), [1, 2])
        service_names = {name for part, _, node in placed if part == 1
                         for name in self.defined(node)}
        for part, section, node in placed:
            if part != 2 or section.startswith("Command line"):
                continue
            for name in sorted(self.used(node) & service_names):
                with self.subTest(section=section, name=name):
                    self.assertIn(name, self.RUNTIME_TAKES | {"Service", "Metrics"},
                                  f"{section} (line {node.lineno}) reaches into part one")


class RulesOnceTest(unittest.TestCase):
    """Each rule is stated once, in the domain's constants: whatever says a rule (the
    parsers' messages, --help, the API description) is made from them, and the
    docstrings and comments name them rather than repeat their values."""

    # Two sets of rules, each with the words that only it would say.
    RULES = (
        ({"APPOINTMENT_LENGTH": dt.timedelta(minutes=30), "START_MINUTES": (0, 30),
          "FIRST_DATE": dt.date(2000, 1, 1), "LAST_DATE": dt.date(2099, 12, 31),
          "MAX_USER_ID_LENGTH": 256},
         (r"\b30-minute", r"\bhalf hour", r"\b00 or 30\b", r"\b2000-01-01\b", r"\b2099-12-31\b",
          r"\b256 characters|\bmost 256\b|\"maxLength\": 256\b")),
        ({"APPOINTMENT_LENGTH": dt.timedelta(minutes=15), "START_MINUTES": (0, 15, 30, 45),
          "FIRST_DATE": dt.date(1990, 1, 1), "LAST_DATE": dt.date(2149, 12, 31),
          "MAX_USER_ID_LENGTH": 300},
         (r"\b15-minute", r"\bquarter hour", r"\b00, 15, 30 or 45\b", r"\b1990-01-01\b",
          r"\b2149-12-31\b", r"\b300 characters|\bmost 300\b|\"maxLength\": 300\b")))

    @staticmethod
    def said() -> str:
        """What the service says of its rules: the API description, --help, the pages
        (/ and /docs, which may say none), and the messages of each field that breaks
        one, the time's format and a huge number's."""
        said = [json.dumps(scheduler.openapi_document()), scheduler.home_page(),
                scheduler.DOCS_PAGE, scheduler.DOCS_SCRIPT]
        with contextlib.redirect_stdout(io.StringIO()) as help_text:
            with contextlib.suppress(SystemExit):
                scheduler.parse_args(["--help"])
        said.append(help_text.getvalue())
        for parse, value in ((scheduler.parse_time, "09:07"), (scheduler.parse_time, "9:07"),
                             (scheduler.parse_date, "1899-12-31"),
                             (scheduler.parse_user_id, "x" * 400)):
            with contextlib.suppress(ValueError):
                parse(value)
                raise AssertionError(f"{value} was taken")
            try:
                parse(value)
            except ValueError as error:
                said.append(str(error))
        try:
            scheduler.decode_json(b'{"user_id": %s}' % (b"9" * 5000))
        except scheduler.HTTPError as error:
            said.append(error.detail)
        return "\n".join(said)

    def test_what_is_said_of_the_rules_follows_them(self):
        today = self.said()
        said = []
        for rules, _ in self.RULES:
            with other_rules(**rules):
                said.append(self.said())
        self.assertEqual(self.said(), today)  # made again under today's rules
        for (_, words), text, other in ((self.RULES[0], *said), (self.RULES[1], *said[::-1])):
            for pattern in words:
                with self.subTest(pattern=pattern):
                    self.assertTrue(re.search(pattern, text), "the rules are said")
                    found = re.search(pattern, other)  # written out, not made from the rules
                    self.assertIsNone(found, found and other[found.start() - 100:found.end() + 50])

    def test_the_examples_follow_the_rules(self):
        # The API description's examples are made by the domain: their times and ends.
        with other_rules(APPOINTMENT_LENGTH=dt.timedelta(minutes=60), START_MINUTES=(0,)):
            document = json.dumps(scheduler.openapi_document())
            self.assertIn('"time": "09:00", "start": "2026-11-25T09:00:00Z", '
                          '"end": "2026-11-25T10:00:00Z"', document)
            self.assertIn("time 09:30 is not bookable: appointments start on the hour "
                          "(minutes 00)", document)
        self.assertNotIn('"time": "09:00"', json.dumps(scheduler.openapi_document()))

    # Words that say a value of the rules, as the domain's functions say them: made from
    # the rules, so that they are the words to keep out after a rule changes too.
    RULES_IN_WORDS = re.compile("|".join([
        re.escape(scheduler.starts_in_words().replace("on the hour or ", "")),  # "half hour"
        re.escape(scheduler.length_in_words()).replace(r"\-", "[- ]"),  # "30-minute"
        "minutes " + re.escape(scheduler.start_minutes_listed()),
        rf"\b{scheduler.MAX_USER_ID_LENGTH} characters", rf"\b{scheduler.MAX_NOTE_LENGTH} characters",
        rf"\b{scheduler.LAST_DATE.year}\b"]))

    def test_docstrings_and_comments_name_the_rules_not_their_values(self):
        with open(SCRIPT, encoding="utf-8") as source:
            tokens = list(tokenize.generate_tokens(source.readline))
        found = [f"line {token.start[0]}: {token.string.strip()[:70]}" for token in tokens
                 if token.type == tokenize.COMMENT and self.RULES_IN_WORDS.search(token.string)]
        docstrings = [scheduler.__doc__] + [
            getattr(thing, "__doc__", None) or "" for owner in
            [scheduler] + [value for value in vars(scheduler).values() if inspect.isclass(value)]
            for thing in vars(owner).values()
            if getattr(thing, "__module__", None) == "scheduler"
            or isinstance(thing, (property, staticmethod, classmethod))]
        found += [doc.strip()[:70] for doc in docstrings if self.RULES_IN_WORDS.search(doc)]
        self.assertEqual(found, [])


class HTTPErrorTest(unittest.TestCase):
    """http_error(): the one place where domain outcomes become statuses, sentences
    and JSON for the client."""

    CASES = [  # (raised, status, words in the detail, extension members)
        (scheduler.AlreadyBooked(appointment()), 409,
         "User alice already has an appointment on 2026-11-25, at 09:30",
         {"appointment": appointment().as_json()}),
        (scheduler.NotBooked("bob", dt.date(2026, 11, 26)), 404,
         "User bob has no appointment on 2026-11-26.", {}),
        (scheduler.InvalidAppointment([("date", "date is required")]), 422,
         "1 field is invalid (date)", {"errors": [{"field": "date",
                                                   "message": "date is required"}]}),
        (scheduler.StoreUnavailable("The database does not answer: gone."), 503,
         "The database does not answer: gone.", {}),
        (scheduler.HTTPError(405, "Use GET.", headers={"Allow": "GET"}), 405, "Use GET.", {}),
        (RuntimeError("secret detail"), 500, "unexpected error", {}),
    ]

    def test_each_outcome_becomes_its_problem(self):
        for raised, status, words, extensions in self.CASES:
            with self.subTest(raised=type(raised).__name__):
                reply = scheduler.error_reply(raised)
                self.assertEqual((reply.status, reply.media_type),
                                 (status, "application/problem+json"))
                problem = reply.body
                self.assertEqual(problem["status"], status)
                self.assertIn(words, problem["detail"])
                self.assertEqual({key: problem[key] for key in extensions}, extensions)
                self.assertNotIn("secret", json.dumps(problem))

    def test_headers_and_titles(self):
        reply = scheduler.error_reply(scheduler.HTTPError(405, "x", headers={"Allow": "GET"}))
        self.assertEqual(reply.headers, (("Allow", "GET"),))
        for status, title in ((413, "Content Too Large"), (422, "Unprocessable Content"),
                              (404, "Not Found")):
            with self.subTest(status=status):
                self.assertEqual(scheduler.HTTPError(status, "x").problem()["title"], title)


def made_request_id(testcase: unittest.TestCase, request_id: str) -> uuid.UUID:
    """request_id is one the service made (RequestIds): a UUID of version 8, written
    in lower case; returns it."""
    made = uuid.UUID(request_id)
    testcase.assertEqual((str(made), made.version, made.variant),
                         (request_id, 8, uuid.RFC_4122), request_id)
    return made


class RequestIdRuleTest(unittest.TestCase):
    """X-Request-ID: which of a client's are kept (a table of values, as the head's
    bytes read as ISO-8859-1 make them), and the IDs made for the others."""

    KEPT = ["a", "x" * scheduler.MAX_REQUEST_ID_LENGTH, "req-42", "0B7C3C4E-5D6F-4A1B-9C2D-1",
            "urn:uuid:5e0b3c8a-2f71-8c4d-9a1e-3b6f0d2c7a15", "%0D%0A", "a,b", "{}()<>[]",
            "!#$%&*+-./:;=?@^_`|~", "trace=1;span=2"]
    REFUSED = ["", "x" * (scheduler.MAX_REQUEST_ID_LENGTH + 1), "a b", 'a"b', "a'b", "a\\b",
               "a\tb", "a\x00b", "\x1b[31m", "a\x7fb", "\x85", "caf\xc3\xa9", "\xff\xfe",
               "a, b", "a\r\nX-Forged: 1", " a"]

    def test_a_clients_id_is_kept_if_it_is_a_token_of_printable_ascii(self):
        for value in self.KEPT + self.REFUSED:
            with self.subTest(value=value):
                got = scheduler.Service.request_id({"x-request-id": value})
                if value in self.KEPT:
                    self.assertEqual(got, value)
                else:
                    self.assertNotEqual(got, value)
                    made_request_id(self, got)
        made_request_id(self, scheduler.Service.request_id({}))

    def test_the_api_description_says_the_same(self):
        parameter = scheduler.openapi_document()["components"]["parameters"]["RequestId"]
        self.assertEqual((parameter["name"], parameter["in"]), ("X-Request-ID", "header"))
        schema = parameter["schema"]
        self.assertIn(f"1 to {scheduler.MAX_REQUEST_ID_LENGTH} printable ASCII",
                      parameter["description"])
        for value in self.KEPT + self.REFUSED:
            with self.subTest(value=value):
                by_schema = (schema["minLength"] <= len(value) <= schema["maxLength"]
                             and re.search(schema["pattern"], value) is not None)
                self.assertEqual(by_schema, value in self.KEPT)

    def test_made_ids_are_unique_and_cost_no_system_call(self):
        ids = scheduler.RequestIds()
        with mock.patch("os.urandom", side_effect=AssertionError("a system call per ID")):
            made = [ids.next() for _ in range(10_000)]
        self.assertEqual(len(set(made)), len(made))
        first = [made_request_id(self, value).int for value in made]
        self.assertEqual(first, list(range(first[0], first[0] + len(made))))  # a counter
        self.assertEqual({value[:24] for value in made}, {ids.prefix})
        another = scheduler.RequestIds()  # another process's, or a forked child's
        self.assertNotEqual(another.prefix, ids.prefix)
        ids.draw()  # what a forked child does first
        self.assertNotIn(ids.next(), made)

    def test_a_problem_says_the_id_as_its_instance_or_as_request_id(self):
        error = scheduler.HTTPError(404, "No such thing.")
        self.assertNotIn("instance", error.problem())
        made = scheduler.Service.request_id({})
        self.assertEqual(error.problem(made)["instance"], "urn:uuid:" + made)
        self.assertEqual(error.problem("0B7C3C4E-5D6F-4A1B-9C2D-AA0000000001")["instance"],
                         "urn:uuid:0b7c3c4e-5d6f-4a1b-9c2d-aa0000000001")  # RFC 9562: lower
        problem = error.problem("req-42")
        self.assertEqual(problem["request_id"], "req-42")
        self.assertNotIn("instance", problem)  # a URI reference; req-42 would be a relative one


# --- Stores ---------------------------------------------------------------------------


def race_bookings(stores: List[scheduler.Store]) -> List[str]:
    """One thread per store in stores, all released at once, each booking alice on
    one date at a different hour; returns each thread's "booked" or "conflict"."""
    barrier, outcomes = threading.Barrier(len(stores)), []  # list.append is atomic

    def book(store, hour):
        barrier.wait()
        try:
            store.book(appointment(time=f"{hour:02d}:00"))
            outcomes.append("booked")
        except scheduler.AlreadyBooked:
            outcomes.append("conflict")

    workers = [threading.Thread(target=book, args=(store, hour))
               for hour, store in enumerate(stores)]
    run_all(workers)
    return outcomes


def race_to_fill(store: scheduler.Store, appointments) -> List[str]:
    """One thread per appointment, all released at once, each booking it; returns each
    thread's "booked" or "full", sorted."""
    barrier, outcomes = threading.Barrier(len(appointments)), []  # list.append is atomic

    def book(booked):
        barrier.wait()
        try:
            store.book(booked)
            outcomes.append("booked")
        except scheduler.StoreFull:
            outcomes.append("full")

    run_all([threading.Thread(target=book, args=(booked,)) for booked in appointments])
    return sorted(outcomes)


class StoreContract:
    """What every Store must do; run once per store class below."""

    def make_store(self, **options) -> scheduler.Store:
        raise NotImplementedError

    def setUp(self):
        self.store = self.make_store()
        self.addCleanup(self.store.close)

    def test_a_note_is_kept_changed_moved_and_removed(self):
        noted = appointment()._replace(note="Bring the X-ray.\nThanks")
        self.assertEqual(self.store.book(noted), noted)
        self.store.book(appointment(date="2026-11-20"))  # a second one: kept apart
        self.assertEqual(self.store.get("alice", self.D25), noted)
        self.assertEqual(self.store.list_for_user("alice"),
                         [appointment(date="2026-11-20"), noted])
        changed = self.store.reschedule("alice", self.D25, scheduler.Changes(
            details={"note": "Bring the MRI"}))
        self.assertEqual(changed, noted._replace(note="Bring the MRI"))
        moved = self.store.reschedule("alice", self.D25, scheduler.Changes(self.D26, None))
        self.assertEqual(moved, appointment(date="2026-11-26")._replace(note="Bring the MRI"))
        removed = self.store.reschedule("alice", self.D26, scheduler.Changes(
            details={"note": None}))
        self.assertEqual(removed, appointment(date="2026-11-26"))
        self.assertEqual(self.store.list_for_user("alice"),
                         [appointment(date="2026-11-20"), appointment(date="2026-11-26")])
        with self.assertRaises(scheduler.AlreadyBooked) as conflict:
            self.store.book(noted._replace(start=noted.start.replace(day=20)))
        self.assertIsNone(conflict.exception.existing.note)

    def test_a_full_store_books_no_more_but_still_reports_conflicts(self):
        store = self.make_store(capacity=2)
        self.addCleanup(store.close)
        store.book(appointment("alice"))
        store.book(appointment("bob"))
        with self.assertRaises(scheduler.StoreFull) as caught:
            store.book(appointment("carol"))
        self.assertEqual(caught.exception.capacity, 2)
        with self.assertRaises(scheduler.AlreadyBooked):
            store.book(appointment("alice", time="15:00"))
        store.cancel("alice", dt.date(2026, 11, 25))
        store.book(appointment("carol"))  # a cancellation makes room
        self.assertEqual(store.count(), 2)

    def test_racing_bookings_never_pass_the_capacity(self):
        store = self.make_store(capacity=5)
        self.addCleanup(store.close)
        self.assertEqual(race_to_fill(store, [appointment(f"user-{n}") for n in range(16)]),
                         ["booked"] * 5 + ["full"] * 11)
        self.assertEqual(store.count(), 5)

    def test_a_user_at_their_capacity_books_no_more_but_others_may(self):
        store = self.make_store(user_capacity=3)
        self.addCleanup(store.close)
        days = [dt.date(2026, 11, day) for day in range(1, 5)]
        for day in days[:3]:
            store.book(appointment(date=day.isoformat()))
        with self.assertRaises(scheduler.StoreFull) as caught:
            store.book(appointment(date=days[3].isoformat()))
        self.assertEqual((caught.exception.capacity, caught.exception.user_id), (3, "alice"))
        with self.assertRaises(scheduler.AlreadyBooked):  # a conflict is still one
            store.book(appointment(date=days[0].isoformat(), time="15:00"))
        store.book(appointment("bob"))
        moved = store.reschedule("alice", days[0], scheduler.Changes(days[3], None))
        self.assertEqual(moved.date, days[3])  # a move holds no more
        store.cancel("alice", days[1])
        store.book(appointment(date=days[1].isoformat()))  # a cancellation makes room
        self.assertEqual(len(store.list_for_user("alice")), 3)

    def test_racing_bookings_of_one_user_never_pass_their_capacity(self):
        store = self.make_store(user_capacity=4)
        self.addCleanup(store.close)
        self.assertEqual(race_to_fill(store, [appointment(date=f"2026-11-{day:02}")
                                              for day in range(1, 13)]),
                         ["booked"] * 4 + ["full"] * 8)
        self.assertEqual(len(store.list_for_user("alice")), 4)

    def test_a_users_version_changes_with_their_appointments_alone(self):
        versions = [self.store.version("alice")]

        def changed(change) -> object:
            change()
            self.assertNotIn(self.store.version("alice"), versions)
            versions.append(self.store.version("alice"))

        changed(lambda: self.store.book(appointment()))
        changed(lambda: self.store.book(appointment(date="2026-11-26")))
        changed(lambda: self.store.book(appointment(date="2026-11-27")))
        changed(lambda: self.store.reschedule("alice", self.D25, scheduler.Changes(
            details={"note": "a note"})))
        changed(lambda: self.store.reschedule("alice", self.D26, scheduler.Changes(
            dt.date(2026, 11, 28), None)))
        changed(lambda: self.store.cancel("alice", self.D25))
        changed(lambda: self.store.cancel("alice", dt.date(2026, 11, 27)))
        unchanged = self.store.version("alice")
        self.store.book(appointment("bob"))
        self.store.list_for_user("alice")
        self.store.get("alice", dt.date(2026, 11, 28))
        with self.assertRaises(scheduler.AlreadyBooked):
            self.store.book(appointment(date="2026-11-28"))
        self.assertEqual(self.store.version("alice"), unchanged)

    def test_book_returns_the_appointment_and_lists_it(self):
        booked = self.store.book(appointment())
        self.assertEqual(booked, appointment())
        self.assertEqual(self.store.list_for_user("alice"), [appointment()])

    def test_second_booking_on_a_date_conflicts_and_names_the_first(self):
        self.store.book(appointment(time="09:30"))
        with self.assertRaises(scheduler.AlreadyBooked) as caught:
            self.store.book(appointment(time="15:00"))
        self.assertEqual(caught.exception.existing, appointment(time="09:30"))
        self.assertEqual(self.store.list_for_user("alice"), [appointment(time="09:30")])

    def test_same_booking_twice_conflicts(self):
        self.store.book(appointment())
        with self.assertRaises(scheduler.AlreadyBooked):
            self.store.book(appointment())

    def test_other_users_may_book_the_same_slot(self):
        for user in ("alice", "bob", "carol"):
            self.store.book(appointment(user))
        for user in ("alice", "bob", "carol"):
            self.assertEqual(self.store.list_for_user(user), [appointment(user)])

    def test_one_user_may_book_other_dates(self):
        self.store.book(appointment(date="2026-11-25", time="23:30"))
        self.store.book(appointment(date="2026-11-26", time="00:00"))
        self.assertEqual(len(self.store.list_for_user("alice")), 2)

    def test_list_is_sorted_by_start(self):
        dates = ["2026-12-01", "2026-11-24", "2026-11-30", "2026-11-25"]
        for date in dates:
            self.store.book(appointment(date=date))
        listed = [a.date.isoformat() for a in self.store.list_for_user("alice")]
        self.assertEqual(listed, sorted(dates))
        # With a note, or moved, as booked, or neither (kept apart in memory): the same.
        self.store.book(appointment(date="2026-11-26")._replace(note="x"))
        self.store.reschedule("alice", dt.date(2026, 12, 1), scheduler.Changes(
            dt.date(2026, 11, 20), None))
        listed = [a.date.isoformat() for a in self.store.list_for_user("alice")]
        self.assertEqual(listed, sorted(dates[1:] + ["2026-11-26", "2026-11-20"]))
        self.assertEqual([event.appointment.date.isoformat()
                          for event in self.store.events("alice")], listed)

    def test_unknown_user_has_no_appointments(self):
        self.assertEqual(self.store.list_for_user("nobody"), [])

    def test_list_is_a_snapshot(self):
        self.store.book(appointment())
        listed = self.store.list_for_user("alice")
        listed.clear()
        self.assertEqual(self.store.list_for_user("alice"), [appointment()])

    def test_racing_bookings_for_one_date_store_exactly_one(self):
        outcomes = race_bookings([self.store] * 16)
        self.assertEqual(sorted(outcomes), ["booked"] + ["conflict"] * 15)
        self.assertEqual(len(self.store.list_for_user("alice")), 1)

    def test_a_users_appointments_grow_and_shrink(self):
        # In memory, a user's one appointment is kept apart from two or more: each step.
        dates = ["2026-11-25", "2026-11-27", "2026-11-26"]
        for count, date in enumerate(dates, 1):
            self.store.book(appointment(date=date))
            self.assertEqual(self.store.list_for_user("alice"),
                             sorted(appointment(date=d) for d in dates[:count]))
        for index, date in enumerate(dates):
            self.store.cancel("alice", dt.date.fromisoformat(date))
            left = sorted(appointment(date=d) for d in dates[index + 1:])
            self.assertEqual(self.store.list_for_user("alice"), left)
            for kept in left:
                self.assertEqual(self.store.get("alice", kept.date), kept)
            with self.assertRaises(scheduler.NotBooked):
                self.store.get("alice", dt.date.fromisoformat(date))
        self.assertEqual(self.store.count(), 0)
        self.store.book(appointment(time="15:00"))  # and again from nothing
        self.assertEqual(self.store.list_for_user("alice"), [appointment(time="15:00")])

    def test_get_returns_the_booked_appointment(self):
        self.store.book(appointment(date="2026-11-25", time="23:30"))
        self.assertEqual(self.store.get("alice", dt.date(2026, 11, 25)),
                         appointment(date="2026-11-25", time="23:30"))

    def test_get_without_a_booking_is_not_found(self):
        self.store.book(appointment(date="2026-11-25"))
        for user, date in (("alice", dt.date(2026, 11, 26)), ("bob", dt.date(2026, 11, 25))):
            with self.subTest(user=user, date=date):
                with self.assertRaises(scheduler.NotBooked) as caught:
                    self.store.get(user, date)
                self.assertEqual((caught.exception.user_id, caught.exception.date), (user, date))

    def test_cancel_frees_the_date_for_a_new_booking(self):
        self.store.book(appointment(time="09:30"))
        self.store.cancel("alice", dt.date(2026, 11, 25))
        self.assertEqual(self.store.list_for_user("alice"), [])
        self.assertEqual(self.store.count(), 0)
        self.store.book(appointment(time="15:00"))
        self.assertEqual(self.store.list_for_user("alice"), [appointment(time="15:00")])

    def test_cancel_without_a_booking_is_not_found(self):
        with self.assertRaises(scheduler.NotBooked):
            self.store.cancel("alice", dt.date(2026, 11, 25))
        self.store.book(appointment())
        self.store.cancel("alice", dt.date(2026, 11, 25))
        with self.assertRaises(scheduler.NotBooked):
            self.store.cancel("alice", dt.date(2026, 11, 25))

    def test_list_between_dates_is_inclusive(self):
        for day in range(20, 31):
            self.store.book(appointment(date=f"2026-11-{day}"))
        cases = [((dt.date(2026, 11, 22), dt.date(2026, 11, 24)), [22, 23, 24]),
                 ((dt.date(2026, 11, 29), None), [29, 30]),
                 ((None, dt.date(2026, 11, 21)), [20, 21]),
                 ((dt.date(2026, 11, 25), dt.date(2026, 11, 25)), [25]),
                 ((dt.date(2026, 12, 1), None), [])]
        for (first, last), days in cases:
            with self.subTest(first=first, last=last):
                listed = self.store.list_for_user("alice", first, last)
                self.assertEqual([a.date.day for a in listed], days)

    def test_count_follows_bookings_and_cancellations(self):
        for user in ("alice", "bob"):
            for date in ("2026-11-25", "2026-11-26"):
                self.store.book(appointment(user, date))
        self.store.cancel("bob", dt.date(2026, 11, 26))
        self.assertEqual(self.store.count(), 3)


    # Rescheduling: one step, whatever the user holds.
    D25, D26, D27 = dt.date(2026, 11, 25), dt.date(2026, 11, 26), dt.date(2026, 11, 27)

    def test_reschedule_moves_to_another_date_and_time(self):
        for held in (["2026-11-25"], ["2026-11-25", "2026-11-28"]):  # one, or more
            with self.subTest(held=held):
                store = self.make_store()
                self.addCleanup(store.close)
                for date in held:
                    store.book(appointment(date=date))
                moved = store.reschedule("alice", self.D25,
                                         scheduler.Changes(self.D26, dt.time(10, 0)))
                self.assertEqual(moved, appointment(date="2026-11-26", time="10:00"))
                self.assertEqual(store.list_for_user("alice"),
                                 sorted([moved] + [appointment(date=d) for d in held[1:]]))
                with self.assertRaises(scheduler.NotBooked):
                    store.get("alice", self.D25)
                self.assertEqual(store.count(), len(held))

    def test_reschedule_keeps_what_it_is_not_given(self):
        self.store.book(appointment(time="09:30"))
        self.assertEqual(self.store.reschedule("alice", self.D25,
                                               scheduler.Changes(None, dt.time(15, 0))),
                         appointment(time="15:00"))
        self.assertEqual(self.store.reschedule("alice", self.D25,
                                               scheduler.Changes(self.D27, None)),
                         appointment(date="2026-11-27", time="15:00"))
        self.assertEqual(self.store.reschedule("alice", self.D27, scheduler.Changes(None, None)),
                         appointment(date="2026-11-27", time="15:00"))
        self.assertEqual(self.store.list_for_user("alice"),
                         [appointment(date="2026-11-27", time="15:00")])

    def test_reschedule_onto_a_held_date_conflicts_and_changes_nothing(self):
        self.store.book(appointment(date="2026-11-25", time="09:30"))
        self.store.book(appointment(date="2026-11-26", time="14:00"))
        with self.assertRaises(scheduler.AlreadyBooked) as caught:
            self.store.reschedule("alice", self.D25, scheduler.Changes(self.D26, dt.time(10, 0)))
        self.assertEqual(caught.exception.existing, appointment(date="2026-11-26", time="14:00"))
        self.assertEqual(self.store.list_for_user("alice"),
                         [appointment(date="2026-11-25", time="09:30"),
                          appointment(date="2026-11-26", time="14:00")])

    def test_reschedule_of_nothing_is_not_booked(self):
        self.store.book(appointment("bob"))
        with self.assertRaises(scheduler.NotBooked):
            self.store.reschedule("alice", self.D25, scheduler.Changes(self.D26, None))
        self.assertEqual(self.store.count(), 1)

    def test_a_change_on_a_condition_is_made_only_if_it_holds_and_then_whole(self):
        self.store.book(appointment(time="09:30"))
        seen = []
        condition = lambda current: seen.append(current) or current.start.hour == 9  # noqa
        moved = self.store.reschedule("alice", self.D25, scheduler.Changes(None, dt.time(10)),
                                      condition)
        self.assertEqual((seen, moved), ([appointment(time="09:30")], appointment(time="10:00")))
        for change in (lambda: self.store.reschedule("alice", self.D25, scheduler.Changes(
                           self.D26, dt.time(11)), condition),
                       lambda: self.store.cancel("alice", self.D25, condition)):
            with self.assertRaises(scheduler.ConditionFailed) as caught:
                change()
            self.assertEqual(caught.exception.current, appointment(time="10:00"))
        self.assertEqual(self.store.list_for_user("alice"), [appointment(time="10:00")])
        self.store.cancel("alice", self.D25, lambda current: current.start.hour == 10)
        self.assertEqual(self.store.count(), 0)

    def test_a_conflict_or_nothing_to_change_comes_before_the_condition(self):
        self.store.book(appointment(date="2026-11-25"))
        self.store.book(appointment(date="2026-11-26"))
        never = lambda current: False  # noqa: E731
        with self.assertRaises(scheduler.AlreadyBooked):
            self.store.reschedule("alice", self.D25, scheduler.Changes(self.D26, None), never)
        with self.assertRaises(scheduler.NotBooked):
            self.store.reschedule("alice", self.D27, scheduler.Changes(None, None), never)
        with self.assertRaises(scheduler.NotBooked):
            self.store.cancel("alice", self.D27, never)
        self.assertEqual(self.store.count(), 2)

    def test_writers_holding_the_same_tag_end_with_one_change(self):
        # The condition is tested under the lock or in the transaction of the change:
        # the first change makes the tag stale for the others.
        self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
        sys.setswitchinterval(1e-5)  # threads take turns often, so that a race is run
        for round in range(10):
            with self.subTest(round=round):
                store, user = self.store, f"alice-{round}"  # a user a round: one store
                tag = scheduler.appointment_tag(store.book(appointment(user)))
                barrier, outcomes = threading.Barrier(4), []

                def holds(current):  # long, so that a test outside the lock lets all through
                    return all(scheduler.appointment_tag(current) == tag for _ in range(200))

                def move(hour):
                    barrier.wait()
                    try:
                        store.reschedule(user, self.D25, scheduler.Changes(
                            None, dt.time(hour)), holds)
                        outcomes.append(hour)
                    except scheduler.ConditionFailed:
                        outcomes.append("failed")

                run_all([threading.Thread(target=move, args=(hour,)) for hour in (10, 11, 12, 13)])
                self.assertEqual(outcomes.count("failed"), 3, outcomes)
                winner, = (hour for hour in outcomes if hour != "failed")
                self.assertEqual(store.list_for_user(user),
                                 [appointment(user, time=f"{winner}:00")])

    def test_a_reschedule_racing_a_booking_for_its_date_leaves_one(self):
        for round in range(20):
            with self.subTest(round=round):
                store, user = self.store, f"alice-{round}"  # a user a round: one store
                store.book(appointment(user, date="2026-11-25"))
                barrier, outcomes = threading.Barrier(2), {}

                def move():
                    barrier.wait()
                    try:
                        store.reschedule(user, self.D25, scheduler.Changes(self.D26, None))
                        outcomes["move"] = "moved"
                    except scheduler.AlreadyBooked:
                        outcomes["move"] = "conflict"

                def book():
                    barrier.wait()
                    try:
                        store.book(appointment(user, date="2026-11-26", time="18:00"))
                        outcomes["book"] = "booked"
                    except scheduler.AlreadyBooked:
                        outcomes["book"] = "conflict"

                run_all([threading.Thread(target=move), threading.Thread(target=book)])
                dates = [a.date.isoformat() for a in store.list_for_user(user)]
                self.assertIn((outcomes, dates), [
                    ({"move": "moved", "book": "conflict"}, ["2026-11-26"]),
                    ({"move": "conflict", "book": "booked"}, ["2026-11-25", "2026-11-26"])])

    # Calendar events: an appointment is one from its booking to its cancellation.
    BOOKED_AT = dt.datetime(2026, 11, 20, 8, 0, tzinfo=UTC)

    def tick(self, store: scheduler.Store) -> Callable[[], dt.datetime]:
        """Set the store's clock to BOOKED_AT, a second later at each reading; return
        what it will read next."""
        ticks = itertools.count(int(self.BOOKED_AT.timestamp()) * 10**9, 10**9)
        readings: List[int] = []
        store.clock = lambda: readings.append(next(ticks)) or readings[-1]
        return lambda: self.BOOKED_AT + dt.timedelta(seconds=len(readings))

    def test_an_appointment_is_one_event_across_moves_and_changes(self):
        next_reading = self.tick(self.store)
        booked_at = next_reading()
        self.store.book(appointment(date="2026-11-25", time="09:30"))
        self.store.book(appointment(date="2026-11-28"))
        event, other = self.store.events("alice")
        self.assertEqual(event, scheduler.Event(appointment(), event.key, 0, booked_at))
        self.assertTrue(event.key.startswith("20261125T093000Z-"), event.key)
        self.assertNotEqual(other.key, event.key)
        versions = [event]
        for changes in (scheduler.Changes(self.D26, dt.time(10)),  # a move
                        scheduler.Changes(details={"note": "Left knee"}),  # a detail
                        scheduler.Changes(self.D25, dt.time(9, 30), {"note": None})):  # back
            changed_at = next_reading()
            moved = self.store.reschedule("alice", versions[-1].appointment.date, changes)
            versions.append(scheduler.Event(moved, event.key, len(versions), changed_at))
            self.assertEqual(self.store.events("alice"), sorted([versions[-1], other]))
        self.assertEqual(versions[-1].appointment, event.appointment)  # as booked, a third version
        self.assertEqual(self.store.list_for_user("alice"), [event.appointment, other.appointment])

    def test_a_change_to_what_it_is_changes_no_event(self):
        self.tick(self.store)
        self.store.book(appointment()._replace(note="Left knee"))
        self.store.reschedule("alice", self.D25, scheduler.Changes(details={"note": "x"}))
        events = self.store.events("alice")
        for changes in (scheduler.Changes(), scheduler.Changes(self.D25, dt.time(9, 30)),
                        scheduler.Changes(details={"note": "x"})):
            with self.subTest(changes=changes):
                self.assertEqual(self.store.reschedule("alice", self.D25, changes),
                                 events[0].appointment)
                self.assertEqual(self.store.events("alice"), events)
        with self.assertRaises(scheduler.ConditionFailed):  # refused: none either
            self.store.reschedule("alice", self.D25, scheduler.Changes(self.D26, None),
                                  lambda current: False)
        self.assertEqual(self.store.events("alice"), events)

    def test_a_slot_cancelled_and_booked_again_is_a_new_event(self):
        next_reading = self.tick(self.store)
        self.store.book(appointment())
        self.store.reschedule("alice", self.D25, scheduler.Changes(None, dt.time(11)))
        first = self.store.events("alice")[0]
        self.store.cancel("alice", self.D25)
        self.assertEqual(self.store.events("alice"), [])
        booked_at = next_reading()
        self.store.book(appointment(time="11:00"))
        again = self.store.events("alice")[0]
        self.assertEqual(again, scheduler.Event(first.appointment, again.key, 0, booked_at))
        self.assertNotEqual(again.key, first.key)
        self.assertEqual(self.store.events("bob"), [])

    def test_events_are_kept_apart_by_user(self):
        self.tick(self.store)
        for user_id in ("alice", "bob"):
            self.store.book(appointment(user_id))
        self.store.reschedule("bob", self.D25, scheduler.Changes(self.D26, None))
        (alice,), (bob,) = self.store.events("alice"), self.store.events("bob")
        self.assertEqual((alice.appointment, alice.sequence), (appointment("alice"), 0))
        self.assertEqual((bob.appointment, bob.sequence), (appointment("bob", "2026-11-26"), 1))


class InMemoryStoreTest(StoreContract, unittest.TestCase):
    def make_store(self, **options):
        return scheduler.InMemoryStore(**options)

    def test_a_slot_booked_again_at_the_same_reading_of_the_clock_is_a_new_event(self):
        self.store.clock = lambda: 1_796_000_000 * 10**9  # a clock standing still
        self.store.book(appointment())
        first = self.store.events("alice")[0]
        self.store.cancel("alice", self.D25)
        self.store.book(appointment())
        again = self.store.events("alice")[0]
        self.assertNotEqual(again.key, first.key)  # each stamp after the one before
        self.assertEqual(again.modified - first.modified, dt.timedelta(microseconds=1))


def limits_row(option: str) -> str:
    """The row of the README's Limits table for option, as written."""
    with open(README, encoding="utf-8") as file:
        return next(line for line in file if line.startswith(f"| `{option}`"))


def traced_bytes(work: Callable[[], object]) -> Tuple[object, int]:
    """What work() returns, and the bytes it leaves allocated, as tracemalloc counts
    them after a full collection. tracemalloc also counts what other threads of the
    process allocate meanwhile (make test starts PostgreSQL in one), which only
    adds: a test of a worst case takes the less of two measures."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = work()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


class AppointmentMemoryTest(unittest.TestCase):
    """What the README's Limits table says an appointment takes in memory at worst,
    measured with tracemalloc: the longest user ID and note, in four-byte UTF-8
    characters, each made anew as a request's JSON makes it, and each appointment
    moved once; at one appointment a user, and at as many as a user may hold."""

    @staticmethod
    def largest(number: int, character: str, length: int) -> str:
        return f"{number:06d}" + character * (length - 6)

    def bytes_each(self, count: int, per_user: int) -> float:
        store = scheduler.InMemoryStore()

        def book_and_move() -> None:
            for number in range(count):
                user, day = number // per_user, dt.date(2026, 1, 1) + dt.timedelta(
                    days=number % per_user)
                store.book(scheduler.Appointment(
                    self.largest(user, "😀", scheduler.MAX_USER_ID_LENGTH),
                    dt.datetime.combine(day, dt.time(9, 30), tzinfo=UTC),
                    self.largest(number, "🦴", scheduler.MAX_NOTE_LENGTH)))
                store.reschedule(self.largest(user, "😀", scheduler.MAX_USER_ID_LENGTH),
                                 day, scheduler.Changes(time=dt.time(10, 0)))

        return traced_bytes(book_and_move)[1] / count

    def test_the_worst_case_is_the_one_the_readme_gives(self):
        row = limits_row("--max-appointments")
        claimed = int(re.search(r"([\d,]+) bytes at worst", row).group(1).replace(",", ""))
        # Each the less of two measures (traced_bytes()).
        worst = max(min(self.bytes_each(2 * scheduler.MAX_APPOINTMENTS_PER_USER, per_user)
                        for _ in range(2))
                    for per_user in (1, scheduler.MAX_APPOINTMENTS_PER_USER))
        self.assertLessEqual(worst, claimed)
        self.assertGreater(worst, 0.9 * claimed, "the README gives the worst case measured")
        at_the_cap = float(re.search(r"([\d.]+) GiB at the cap", row).group(1))
        self.assertEqual(at_the_cap,
                         round(claimed * scheduler.Limits().max_appointments / 2**30, 1))


class SQLiteStoreTest(StoreContract, unittest.TestCase):
    def make_store(self, **options):
        self.path = made_database(self)
        return scheduler.SQLiteStore(self.path, **options)

    def test_appointments_survive_reopening_the_file(self):
        self.store.book(appointment("alice", "2026-11-25", "23:30"))
        self.store.book(appointment("bob", "2026-11-26", "00:00"))
        self.store.close()
        reopened = scheduler.SQLiteStore(self.path)
        self.addCleanup(reopened.close)
        self.assertEqual(reopened.list_for_user("alice"), [appointment("alice", "2026-11-25", "23:30")])
        self.assertEqual(reopened.get("bob", dt.date(2026, 11, 26)),
                         appointment("bob", "2026-11-26", "00:00"))
        self.assertEqual(reopened.count(), 2)

    def test_a_note_survives_reopening_the_file(self):
        noted = appointment()._replace(note="line 1\nline 2")
        self.store.book(noted)
        self.store.close()
        reopened = scheduler.SQLiteStore(self.path)
        self.addCleanup(reopened.close)
        self.assertEqual(reopened.list_for_user("alice"), [noted])

    def test_the_unique_constraint_holds_across_connections(self):
        # Two stores on one file are two connections, as two server processes would have.
        other = scheduler.SQLiteStore(self.path)
        self.addCleanup(other.close)
        outcomes = race_bookings([self.store, other] * 4)
        self.assertEqual(sorted(outcomes), ["booked"] + ["conflict"] * 7)
        self.assertEqual(len(other.list_for_user("alice")), 1)

    def test_a_booking_without_room_fails_its_statement_alone(self):
        """SQLiteStore._insert() looks for room in its INSERT, whose NOT NULL refuses
        the row where there is none: the rest of the transaction stands."""
        store = self.make_store(user_capacity=1)
        self.addCleanup(store.close)
        store.book(appointment())

        def three(db):  # bob's before the refused one, carol's after it
            return (store._insert(db, appointment("bob")),
                    store._insert(db, appointment(date="2026-11-26")),
                    store._writer.in_transaction, store._insert(db, appointment("carol")))

        self.assertEqual(store.transact(three), (1, 0, True, 1))
        self.assertEqual(store.list_for_user("alice"), [appointment()])
        self.assertEqual(store.list_for_user("bob"), [appointment("bob")])
        self.assertEqual(store.list_for_user("carol"), [appointment("carol")])
        self.assertEqual(store.count(), 3)

    def test_check_reports_a_database_that_does_not_answer(self):
        self.store.check()
        self.store.close()
        with self.assertRaises(scheduler.StoreUnavailable):
            self.store.check()


# PostgreSQL's steps, as SHIPPED_STEPS: the SHA-256 of each one's statements.
SHIPPED_PG_STEPS = {
    1: "517bcdfb07bd3fc070b1fdb486f79ae673610942bc626dbdb609a566b6320844",
    2: "3df961fb6b30854f09b3428ed0c49cbca72bd436503e8ecae411123c6baa0481",
    3: "a0e61686100a5eaeebe0ac375abe2cb13291965fd79c1a03c78edb6547b2a996",
}


class PostgresStoreTest(StoreContract, unittest.TestCase):
    """The contract on PostgreSQL, and what is PostgreSQL's own: the schema, servers
    sharing the database (two stores are two servers' connections)."""

    def make_store(self, **options):
        options.setdefault("schema", PostgresCluster.shared().emptied_schema(self))
        return postgres_store(self, **options)

    def another(self, **options) -> scheduler.PostgresStore:
        """A second store on the same schema: another server."""
        return postgres_store(self, schema=self.store.schema, **options)

    def test_a_shipped_step_is_the_sql_it_shipped_with(self):
        self.assertEqual(len(SHIPPED_PG_STEPS), scheduler.PG_SCHEMA_VERSION,
                         "a new schema step gets its digest in SHIPPED_PG_STEPS")
        for number, statements in enumerate(scheduler.PG_SCHEMA_STEPS, 1):
            with self.subTest(step=number):
                self.assertEqual(digest(list(statements)), SHIPPED_PG_STEPS[number],
                                 f"schema step {number} shipped, and its SQL is frozen: "
                                 "a rule that changes gets a new step")

    def connect(self, schema: str) -> scheduler.PGConnection:
        """A connection of its own to schema, as a tool (psql) would write there."""
        settings = scheduler.parse_postgres_uri(PostgresCluster.shared().uri())._replace(
            session=(("search_path", schema),))
        connection = scheduler.pg_connect(settings, time.monotonic() + 10)
        self.addCleanup(connection.close)
        return connection

    def test_check_constraints_refuse_what_the_parsers_refuse(self):
        # Their form; the bounds that the rules' values set are the code's (PAST_BOUNDS).
        connection = self.connect(self.store.schema)
        insert = "INSERT INTO appointments VALUES (?, ?, ?, ?)"
        for row in (("alice", "2025-02-29", "09:00", None),
                    ("alice", "2026-11-25", "24:00", None),
                    ("alice", "2026-11-25", "9:00", None),
                    ("alice", "2026-11-25 ", "09:00", None),
                    (" alice", "2026-11-25", "09:00", None),
                    ("", "2026-11-25", "09:00", None),
                    ("Jose\u0301", "2026-11-25", "09:00", None),  # not NFC
                    ("a\x01", "2026-11-25", "09:00", None),
                    ("alice", "2026-11-25", "09:00", "")):
            with self.subTest(row=row[:3]):
                with self.assertRaises(scheduler.PGError) as refused:
                    connection.query(insert, row)
                self.assertIn(refused.exception.sqlstate, ("23514", "22008"))  # CHECK, a date
        connection.query(insert, ("Jos\u00e9", "2026-11-25", "09:00", "x" * 500))
        self.assertEqual(self.store.count(), 1)

    def test_rows_past_the_bounds_of_the_rules_are_left_out_and_set_aside_in_the_way(self):
        connection = self.connect(self.store.schema)
        for row, _ in PAST_BOUNDS:  # PostgreSQL takes them: their form is right
            connection.query("INSERT INTO appointments VALUES (?, ?, ?, ?)", row)
        # A user ID past its length is never asked for: no request can name its user
        # (as one with invisible characters, which no constraint looks for).
        past = [(row, field) for row, field in PAST_BOUNDS if field != "user_id"]
        for (user_id, date, _, _), field in past:
            with self.subTest(field=field):
                self.assertEqual(self.store.list_for_user(user_id), [])
                with self.assertRaises(scheduler.NotBooked):  # a write: it is in the way
                    self.store.cancel(user_id, dt.date.fromisoformat(date))
        aside = connection.query("SELECT user_id, date, time, note, reason FROM set_aside").rows
        self.assertEqual(sorted(row[:4] for row in aside), sorted(row for row, _ in past))
        for user_id, *_, reason in aside:
            field = next(field for row, field in past if row[0] == user_id)
            self.assertTrue(reason.startswith(field + " "), reason)
        self.assertEqual(self.store.count(), 1)  # the user ID's
        with self.assertRaisesRegex(ValueError, "at most"):
            scheduler.parse_user_id("x" * 257)

    def schema_of_version(self, version: int, rows: List[tuple]) -> Tuple[
            str, "scheduler.PGConnection", Dict[str, str], Dict[str, list]]:
        """A schema of the test's own as PG_SCHEMA_STEPS up to version made it, holding
        rows (user_id, date, time, note); a connection to it; and, by table, the SQL
        that reads its rows, and what that read before any store opened it."""
        schema = PostgresCluster.shared().fresh_schema(self)
        connection = self.connect(schema)
        connection.query(f'CREATE SCHEMA "{schema}"')
        for step in scheduler.PG_SCHEMA_STEPS[:version]:
            connection.run_script(";\n".join(step))
        connection.query(f"UPDATE schema_version SET version = {version}")
        for row in rows:
            connection.query("INSERT INTO appointments VALUES (?, ?, ?, ?)", row)
        tables = {"appointments": "SELECT user_id, date, time, note FROM appointments "
                                  "ORDER BY 1, 2",
                  **{table: f"SELECT * FROM {table} ORDER BY 1, 2" for table in (
                      "users", "appointment_count")}}
        return schema, connection, tables, {table: connection.query(sql).rows
                                            for table, sql in tables.items()}

    def test_step_2_keeps_every_row_of_a_schema_made_by_step_1(self):
        schema, connection, tables, before = self.schema_of_version(1, [
            ("alice", "2026-11-25", "09:30", "Left knee"),
            ("Jos\u00e9", "2000-01-01", "23:30", None), ("bob", "2099-12-31", "00:00", None)])
        store = postgres_store(self, schema=schema)
        self.assertEqual(len(store.notices), 1)
        self.assertTrue(store.notices[0].endswith(
            f"from schema version 1 to {scheduler.PG_SCHEMA_VERSION}."), store.notices)
        self.assertEqual({table: connection.query(sql).rows for table, sql in tables.items()},
                         before)
        self.assertEqual(store.count(), 3)
        # A row at 09:15 is now taken by PostgreSQL, and left to the rules: under
        # half-hour slots, not shown, and set aside by the first write in its way.
        connection.query("INSERT INTO appointments VALUES ('carol', '2026-11-25', '09:15', NULL)")
        with other_rules(APPOINTMENT_LENGTH=dt.timedelta(minutes=30), START_MINUTES=(0, 30)):
            self.assertEqual(store.list_for_user("carol"), [])
            self.assertEqual(store.book(appointment("carol", time="10:00")),
                             appointment("carol", time="10:00"))
        self.assertEqual(connection.query("SELECT user_id, time, reason FROM set_aside").rows, [
            ("carol", "09:15", "time 09:15 is not bookable: appointments start on the hour or "
                               "half hour (minutes 00 or 30)")])
        # Under quarter-hour slots, a 09:15 booking is taken, with no new step.
        with other_rules(APPOINTMENT_LENGTH=dt.timedelta(minutes=15),
                         START_MINUTES=(0, 15, 30, 45)):
            quarter = appointment("dave", time="09:15")
            self.assertEqual(store.book(quarter), quarter)
            self.assertEqual(store.list_for_user("dave"), [quarter])

    def test_step_3_keeps_every_row_and_the_uid_each_feed_showed(self):
        schema, connection, tables, before = self.schema_of_version(2, [
            ("alice", "2026-11-25", "09:30", "Left knee"),
            ("alice", "2026-11-26", "23:30", None), ("Jos\u00e9", "2000-01-01", "00:00", None)])
        store = postgres_store(self, schema=schema)
        self.assertEqual(len(store.notices), 1)
        self.assertTrue(store.notices[0].endswith(
            f"from schema version 2 to {scheduler.PG_SCHEMA_VERSION}."), store.notices)
        self.assertEqual({table: connection.query(sql).rows for table, sql in tables.items()},
                         before)
        for column, value in (("event_key", ""), ("sequence", -1)):
            with self.subTest(column=column, value=value):
                with self.assertRaises(scheduler.PGError) as refused:
                    connection.query(f"UPDATE appointments SET {column} = ?", (value,))
                self.assertEqual(refused.exception.sqlstate, "23514")  # CHECK
        connection.query("UPDATE appointments SET event_key = 'a b' WHERE date = '2000-01-01'")
        assert_upgraded_events_keep_their_uids(self, store)  # that key taken as none
        # A server of the release before, still running, books as it did: its rows
        # are events too, of the start's key until they move.
        connection.query("INSERT INTO appointments VALUES ('bob', '2026-11-25', '09:30', NULL)")
        self.assertEqual(store.events("bob"), [scheduler.Event(appointment("bob"),
                                                               "20261125T093000Z")])

    def test_the_unique_constraint_holds_across_servers(self):
        other = self.another()
        outcomes = race_bookings([self.store, other] * 4)
        self.assertEqual(sorted(outcomes), ["booked"] + ["conflict"] * 7)
        self.assertEqual(len(other.list_for_user("alice")), 1)

    def test_a_change_by_another_server_changes_the_version(self):
        other = self.another()
        self.store.book(appointment())
        before = self.store.version("alice")
        other.reschedule("alice", dt.date(2026, 11, 25), scheduler.Changes(time=dt.time(11, 0)))
        self.assertNotEqual(self.store.version("alice"), before)

    def test_a_booking_is_one_round_trip_and_a_write_sends_begin_with_its_first_statement(self):
        sent = []
        send = scheduler.PGConnection._send
        with mock.patch.object(scheduler.PGConnection, "_send",
                               lambda connection, data, deadline: (sent.append(data),
                                                                   send(connection, data, deadline))):
            self.store.book(appointment())
            self.assertEqual(len(sent), 1)  # the INSERT alone, a transaction of its own
            with self.assertRaises(scheduler.AlreadyBooked):
                self.store.book(appointment(time="11:00"))
        self.assertEqual([data.count(scheduler.SYNC) for data in sent], [1] * len(sent))
        self.assertNotIn(b"BEGIN", sent[0])
        self.assertIn(b"INSERT INTO appointments", sent[0])
        # It inserted nothing, so a transaction finds out why: BEGIN with the INSERT,
        # the SELECT of what is in the way, COMMIT.
        self.assertEqual(len(sent), 1 + 1 + 3)
        self.assertIn(b"BEGIN ISOLATION LEVEL REPEATABLE READ", sent[2])
        self.assertEqual(sent[2].count(scheduler.EXECUTE), 2)  # the INSERT, prepared earlier
        self.assertEqual(self.store.list_for_user("alice"), [appointment()])

    def session(self) -> "scheduler.PGConnection":
        """A connection of the test's own to the store's schema, as an operator's."""
        settings = scheduler.parse_postgres_uri(PostgresCluster.shared().uri())._replace(
            session=(("search_path", self.store.schema),))
        connection = scheduler.pg_connect(settings, time.monotonic() + 10)
        self.addCleanup(connection.close)
        self.sessions.append(connection)
        return connection

    sessions: List["scheduler.PGConnection"] = []  # session()'s, the test's own

    def behind_a_held_batch(self, hold: str, calls: List[Callable[[], object]],
                            batches: "scheduler.Batches") -> List[object]:
        """Run the first call in a thread, its batch held at the lock that hold (SQL, in
        a transaction of a connection of the test's own) takes; then the others, each
        in a thread, and let the lock go once they all wait in batches for the next
        batch. What the calls returned, in the order they returned."""
        blocker = self.session()
        blocker.queries((("BEGIN", ()), (hold, ())))
        answers: List[object] = []
        threads = [threading.Thread(target=lambda call: answers.append(call()), args=(call,))
                   for call in calls]
        threads[0].start()
        wait_until(lambda: blocker.query("SELECT count(*) FROM pg_stat_activity WHERE "
                                         "wait_event_type = 'Lock'").rows[0][0],
                   what="the first batch to wait for the lock")
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: len(batches._waiting) == len(calls) - 1, what="the others waiting")
        blocker.query("ROLLBACK")
        for thread in threads:
            thread.join(10)
        return answers

    def test_a_statement_past_its_deadline_is_cancelled_not_left_running(self):
        # Given up on, its backend waited on for the lock, one more than the pool's
        # bound each time, and booked once the lock went, after the client's 503.
        blocker = self.session()
        blocker.queries((("BEGIN", ()), ("LOCK TABLE appointments", ())))
        self.store.busy_timeout = 0.3
        with self.assertRaises(scheduler.StoreUnavailable):
            self.store.book(appointment())
        wait_until(lambda: blocker.query("SELECT count(*) FROM pg_stat_activity WHERE "
                                         "wait_event_type = 'Lock'").rows == [(0,)],
                   what="the booking's statement to be cancelled")
        blocker.query("ROLLBACK")
        self.assertEqual(self.store.count(), 0)

    def test_bookings_that_come_while_a_batch_is_under_way_go_in_one_insert_next(self):
        booked = self.behind_a_held_batch(  # alice's users row: her batch waits for it
            "INSERT INTO users VALUES ('alice', 0, 0)",
            [functools.partial(self.store.book, appointment(user))
             for user in ["alice"] + [f"user-{n}" for n in range(8)]], self.store._bookings)
        self.assertEqual(len(booked), 9)
        self.assertEqual(self.store.count(), 9)
        self.assertEqual(self.session().query(  # a transaction's rows share its xmin
            "SELECT count(DISTINCT xmin::text) FROM appointments").rows, [(2,)])

    def test_reads_that_come_while_a_batch_is_under_way_go_in_one_round_trip_next(self):
        self.sessions = []
        for user in ("alice", "bob"):
            self.store.book(appointment(user))
        sent = []
        send = scheduler.PGConnection._send
        with mock.patch.object(scheduler.PGConnection, "_send", lambda connection, data,
                               deadline: (connection in self.sessions or connection.state
                                          == "starting" or sent.append(data),
                                          send(connection, data, deadline))):
            answers = self.behind_a_held_batch("LOCK TABLE appointments", [
                functools.partial(self.store.list_for_user, user)
                for user in ["alice"] + ["bob"] * 8], self.store._reads)
        self.assertEqual(sorted(answers), [[appointment("alice")]] + [[appointment("bob")]] * 8)
        self.assertEqual([data.count(scheduler.SYNC) for data in sent], [1, 1])
        self.assertEqual(sent[1].count(scheduler.EXECUTE), 8)

    def test_a_statement_alone_runs_at_repeatable_read(self):
        with self.store.reading() as db:
            self.assertEqual(db.execute("SHOW transaction_isolation"), [("repeatable read",)])

    def test_text_round_trips_exactly(self):
        for user_id, note in (("o'brien \\ \"q\"", "$1 ? $$ -- /* */ \\N"),
                              ("Jos\u00e9 \U0001f600", "e\u0301 \u0915\u094d\u0937 \U0001f469\u200d\U0001f4bb")):
            booked = appointment(user_id)._replace(note=note)
            self.store.book(booked)
            self.assertEqual(self.store.list_for_user(user_id), [booked])
            self.assertEqual(self.another().get(user_id, booked.date), booked)

    def test_servers_starting_at_once_on_an_empty_database_make_one_schema(self):
        schema = PostgresCluster.shared().fresh_schema(self)
        stores, errors = [], []

        def start():
            try:
                stores.append(postgres_store(self, schema=schema))
            except Exception as error:  # noted, for the assertion below
                errors.append(error)

        run_all([threading.Thread(target=start) for _ in range(4)])
        self.assertEqual(errors, [])
        self.assertEqual(sorted(len(store.notices) for store in stores), [0, 0, 0, 1])
        stores[0].book(appointment())
        self.assertEqual(stores[3].count(), 1)

    def test_an_empty_schema_made_by_an_operator_is_taken(self):
        cluster = PostgresCluster.shared()
        schema = cluster.fresh_schema(self)
        cluster.sql(f'CREATE SCHEMA "{schema}" AUTHORIZATION scheduler', cluster.DATABASE)
        store = postgres_store(self, schema=schema)
        self.assertEqual(store.book(appointment()), appointment())

    def test_a_schema_it_did_not_make_or_a_newer_one_is_refused_untouched(self):
        cluster = PostgresCluster.shared()
        for setup, words in (
                ("CREATE TABLE {0}.orders (id integer)", "tables this service did not make"),
                ("CREATE TABLE {0}.schema_version (application text, version integer); "
                 "INSERT INTO {0}.schema_version VALUES ('other', 1)", "another's"),
                (None, "newer than this release's")):
            with self.subTest(words):
                schema = cluster.fresh_schema(self)
                if setup is None:
                    postgres_store(self, schema=schema).close()
                    cluster.sql(f"UPDATE {schema}.schema_version SET version = 99",
                                cluster.DATABASE)
                else:
                    cluster.sql(f"SET ROLE scheduler; CREATE SCHEMA {schema}; "
                                + setup.format(schema), cluster.DATABASE)
                before = cluster.sql(
                    f"SELECT count(*) FROM pg_class JOIN pg_namespace ON pg_namespace.oid = "
                    f"relnamespace WHERE nspname = '{schema}'", cluster.DATABASE)
                with self.assertRaises(scheduler.SchemaRefused) as refused:
                    postgres_store(self, schema=schema)
                self.assertIn(words, str(refused.exception))
                self.assertIn("nothing was changed", str(refused.exception))
                self.assertEqual(cluster.sql(
                    f"SELECT count(*) FROM pg_class JOIN pg_namespace ON pg_namespace.oid = "
                    f"relnamespace WHERE nspname = '{schema}'", cluster.DATABASE), before)

    def test_racing_bookings_never_pass_the_capacity(self):
        # What the README says: a batch counts its own bookings, and capacity is passed
        # by at most one booking a connection committing at that moment beside it.
        store = self.make_store(capacity=5, pool_size=4)
        outcomes = race_to_fill(store, [appointment(f"user-{n}") for n in range(16)])
        booked = outcomes.count("booked")
        self.assertTrue(5 <= booked <= 5 + 4 - 1, outcomes)
        self.assertEqual(store.count(), booked)
        with self.assertRaises(scheduler.StoreFull):
            store.book(appointment("late"))

    def test_a_database_not_in_utf8_is_refused(self):
        cluster = PostgresCluster.shared()
        name = cluster.new_schema_name()
        cluster.sql(f"CREATE DATABASE {name} OWNER scheduler ENCODING 'LATIN1' "
                    "TEMPLATE template0")
        self.addCleanup(cluster.sql, f"DROP DATABASE {name}")
        settings = scheduler.parse_postgres_uri(cluster.uri(database=name))
        with self.assertRaises(scheduler.SchemaRefused) as refused:
            scheduler.PostgresStore(settings)
        self.assertIn("encoded in LATIN1; this service needs UTF8", str(refused.exception))

    def test_check_reports_a_database_that_does_not_answer(self):
        self.store.check()
        self.store.close()
        with self.assertRaises(scheduler.StoreUnavailable):
            self.store.check()


class NotingDatabase(scheduler._SQLiteDatabase):
    """The write connection of an SQLiteStore, noting each statement that fails: where
    SQLite fails that statement alone, PostgreSQL aborts the whole transaction."""

    def __init__(self, connection: sqlite3.Connection, failed: List[str]):
        super().__init__(connection)
        self.failed = failed

    def execute(self, sql: str, parameters: tuple = ()) -> list:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as error:
            self.failed.append(f"{sql}: {error}")
            raise


class SharedSQLTest(StoreContract, unittest.TestCase):
    """SQLStore's SQL, which a store on PostgreSQL runs too: no statement of a write
    fails, even one whose failure SQLite would let the write get over. A booking runs
    SQLStore's _insert() (insertion()), not SQLiteStore's, whose statement fails where
    there is no room, as SQLite allows."""

    def make_store(self, **options):
        store = scheduler.SQLiteStore(made_database(self), **options)
        store._insert = types.MethodType(scheduler.SQLStore._insert, store)
        store.failed = []
        store._write_db = NotingDatabase(store._writer, store.failed)
        self.addCleanup(lambda: self.assertEqual(store.failed, []))
        return store

    def test_rows_that_break_the_rules_in_the_way_are_set_aside_without_a_failure(self):
        plant_rows(self.store.path, [("alice", "2026-11-25", "25:00"),
                                     ("alice", "2026-11-26", "09:15"), ("bob", "2026-11-25", "xx")])
        self.assertEqual(self.store.book(appointment()), appointment())
        moved = self.store.reschedule("alice", self.D25, scheduler.Changes(self.D26, None))
        self.assertEqual(moved, appointment(date="2026-11-26"))
        with self.assertRaises(scheduler.NotBooked):
            self.store.cancel("bob", self.D25)
        self.assertEqual(len(query(self.store.path, "SELECT * FROM set_aside")), 3)

    def test_keys_kept_found_and_forgotten_without_a_failure(self):
        store = self.make_store(max_keys=3, max_keys_per_user=2)
        self.addCleanup(store.close)

        def keyed(user_id, key):
            return scheduler.Keyed(user_id, key, key.encode(), lambda outcome: scheduler.Replay(
                key.encode(), HTTPStatus.CONFLICT if isinstance(outcome, Exception)
                else HTTPStatus.CREATED, None, (("X", key),), b"{}"))

        store.book(appointment(), keyed("alice", "a1"))
        with self.assertRaises(scheduler.AlreadyKeyed) as kept:
            store.book(appointment(), keyed("alice", "a1"))
        self.assertEqual(kept.exception.replay, scheduler.Replay(
            b"a1", 201, None, (("X", "a1"),), b"{}"))
        with self.assertRaises(scheduler.AlreadyBooked):  # kept, as changing nothing
            store.book(appointment(), keyed("alice", "a2"))
        store.book(appointment(date="2026-11-26"), keyed("alice", "a3"))  # a2 makes room
        store.book(appointment("bob"), keyed("bob", "b1"))
        self.assertEqual(store.count_keys(), 3)
        with self.assertRaises(scheduler.KeysFull):  # no unchanged key is left to forget
            store.book(appointment("carol"), keyed("carol", "c1"))
        self.assertEqual(query(store.path, "SELECT user_id, key, changed FROM idempotency_keys "
                                           "ORDER BY key"),
                         [("alice", "a1", 1), ("alice", "a3", 1), ("bob", "b1", 1)])

    def test_sqlite_finds_the_oldest_unchanged_key_by_its_partial_index(self):
        # As the index says it, NOT changed: for changed = 0, SQLite scans every key.
        with contextlib.closing(sqlite3.connect(self.store.path, isolation_level=None)) as db:
            recording = RecordingConnection(db)
            scheduler._SQLKeys(scheduler._SQLiteDatabase(recording)).forget_unchanged(None)
            (forget,) = recording.statements
            plan = db.execute(f"EXPLAIN QUERY PLAN {forget}").fetchall()
        self.assertIn("USING INDEX idempotency_keys_unchanged", str(plan))


def store_sample(store: scheduler.Store, name: str) -> float:
    """One of the store's samples, as /metrics shows it."""
    return next(value for sample, _, _, value in store.samples() if sample == name)


class BatchTestCase(unittest.TestCase):
    """Tests of what writes do when they line up for one transaction."""

    def store(self, store_class=scheduler.SQLiteStore) -> scheduler.SQLiteStore:
        store = store_class(temporary_database(self))
        self.addCleanup(store.close)
        return store

    def gathered(self, store: scheduler.SQLiteStore, writes: List[Callable[[], object]]) -> list:
        """Run the writes at once while another connection holds the write lock, so
        that they line up; release it when all wait. Each write's result or error."""
        release = hold_write_lock(self, store.path)
        outcomes = [None] * len(writes)

        def run(index):
            try:
                outcomes[index] = writes[index]()
            except Exception as error:  # the outcome under test
                outcomes[index] = error

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(writes))]
        for thread in threads:
            thread.start()
        wait_until(lambda: store_sample(store, "scheduler_sqlite_writes_queued") == len(writes),
                   what="every write to wait")
        release()
        for thread in threads:
            thread.join()
        return outcomes


class GroupCommitTest(BatchTestCase):
    """Writes that wait while a transaction is written go into the next one together;
    each is answered as if alone, and only once its transaction is on disk."""

    def test_a_batch_answers_each_write_as_if_alone(self):
        store = self.store()
        store.book(appointment("carol"))
        transactions = store_sample(store, "scheduler_sqlite_transactions_total")
        writes = [lambda: store.book(appointment("alice", time="09:00")),
                  lambda: store.book(appointment("alice", time="10:00")),  # one of these wins
                  lambda: store.book(appointment("alice", time="11:00")),
                  lambda: store.book(appointment("bob")),
                  lambda: store.cancel("carol", dt.date(2026, 11, 25)),
                  lambda: store.cancel("dave", dt.date(2026, 11, 25))]
        outcomes = self.gathered(store, writes)
        self.assertLessEqual(store_sample(store, "scheduler_sqlite_transactions_total")
                             - transactions, 2)  # not one transaction a write
        alice = [outcome for outcome in outcomes[:3] if isinstance(outcome, scheduler.Appointment)]
        self.assertEqual(len(alice), 1)
        for outcome in outcomes[:3]:
            if not isinstance(outcome, scheduler.Appointment):
                self.assertIsInstance(outcome, scheduler.AlreadyBooked)
                self.assertEqual(outcome.existing, alice[0])
        self.assertEqual(outcomes[3], appointment("bob"))
        self.assertIsNone(outcomes[4])
        self.assertIsInstance(outcomes[5], scheduler.NotBooked)
        self.assertEqual(store.list_for_user("alice"), alice)
        self.assertEqual(store.list_for_user("carol"), [])
        self.assertEqual(store.count(), 2)

    def test_a_batch_that_fails_fails_each_write_and_writes_nothing(self):
        store = self.store()
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
            # SQLite rolls back the whole transaction, as it may on a disk's failure
            # (SQLITE_IOERR, SQLITE_FULL), for the batch that holds bob's booking.
            db.execute("CREATE TRIGGER failing_disk AFTER INSERT ON appointments WHEN "
                       "NEW.user_id = 'bob' BEGIN SELECT RAISE(ROLLBACK, 'disk I/O error'); END")
        outcomes = self.gathered(store, [lambda user=user: store.book(appointment(user))
                                         for user in ("alice", "bob", "carol")])
        failed = [o for o in outcomes if isinstance(o, scheduler.StoreUnavailable)]
        self.assertIn(outcomes[1], failed)
        for error in failed:
            self.assertIn("disk I/O error", error.cause)  # for the log, not the client
        booked = [o for o in outcomes if isinstance(o, scheduler.Appointment)]
        self.assertEqual(len(failed) + len(booked), 3)
        self.assertEqual(store.count(), len(booked))  # the failed batch left nothing
        self.assertEqual(store.book(appointment("dave")), appointment("dave"))  # and then works

    def test_a_write_a_batch_and_the_lock_change_state_only_as_their_tables_allow(self):
        turns = scheduler._Turns(temporary_database(self) + "-lock")
        self.addCleanup(turns.close)
        for machine in (scheduler._Write(lambda db: None, (), 0.0), scheduler._Batch([]), turns):
            for state, allowed in machine.NEXT.items():
                for target in machine.NEXT:
                    with self.subTest(machine=type(machine).__name__, state=state,
                                      target=target):
                        machine.state = state
                        if target in allowed:
                            machine.to(target)
                            self.assertEqual(machine.state, target)
                        else:
                            with self.assertRaisesRegex(RuntimeError, f"cannot go from "
                                                                      f"{state} to {target}"):
                                machine.to(target)
                            self.assertEqual(machine.state, state)

    def test_a_lone_write_is_its_own_batch(self):
        store = self.store()
        transactions = store_sample(store, "scheduler_sqlite_transactions_total")
        store.book(appointment())
        store.cancel("alice", dt.date(2026, 11, 25))
        self.assertEqual(store_sample(store, "scheduler_sqlite_transactions_total")
                         - transactions, 2)


# The DDL of the releases from before schema versions, which each ran at every start.
UNVERSIONED_DDL = {
    "2026-11-25": """
        CREATE TABLE IF NOT EXISTS appointments (
            user_id TEXT NOT NULL, date TEXT NOT NULL, time TEXT NOT NULL,
            UNIQUE (user_id, date));""",
    "2026-11-30": """
        CREATE TABLE IF NOT EXISTS appointments (
            user_id TEXT NOT NULL, date TEXT NOT NULL, time TEXT NOT NULL,
            UNIQUE (user_id, date));
        CREATE TABLE IF NOT EXISTS appointment_count (n INTEGER NOT NULL);
        INSERT INTO appointment_count SELECT COUNT(*) FROM appointments
            WHERE NOT EXISTS (SELECT 1 FROM appointment_count);
        CREATE TRIGGER IF NOT EXISTS counted AFTER INSERT ON appointments
            BEGIN UPDATE appointment_count SET n = n + 1; END;
        CREATE TRIGGER IF NOT EXISTS uncounted AFTER DELETE ON appointments
            BEGIN UPDATE appointment_count SET n = n - 1; END;
        UPDATE appointment_count SET n = n;""",
}
# Rows that break today's rules, which older releases, hand edits or other tools
# stored: (user_id, date, time, the field at fault).
BROKEN_ROWS = [
    ("letters", "2026-11-25", "xx:yy", "time"),
    ("late", "2026-11-25", "25:00", "time"),
    ("quarter", "2026-11-25", "09:15", "time"),
    ("february", "2026-02-30", "09:00", "date"),
    ("spaced", "2026-11-25 ", "09:00", "date"),
    ("old", "1999-12-31", "09:00", "date"),
    (b"blob", "2026-11-25", "09:00", "user_id"),
    ("zero\u200bwidth", "2026-11-25", "09:00", "user_id"),  # 2026-11-25's release took these
    ("\u202eoverride", "2026-11-25", "09:00", "user_id"),
    ("tag\U000e0041", "2026-11-25", "09:00", "user_id"),
    ("line\u2028separator", "2026-11-25", "09:00", "user_id"),  # and a later one this
    ("alice\u3164", "2026-11-25", "09:00", "user_id"),  # and the releases before NFC these
    ("look\u2800alike", "2026-11-25", "09:00", "user_id"),
]
GOOD_DATE = "2026-11-26"
# Rows of the right form past a bound of today's rules (a length, the dates, the
# starts), which the tables' CHECK constraints leave to the code since SQLite's schema
# step 6 and PostgreSQL's step 2: (user_id, date, time, note), and the field at fault.
PAST_BOUNDS = [
    (("seven", "2026-11-25", "09:07", None), "time"),  # no slot starts then
    (("old", "1999-12-31", "09:00", None), "date"),
    (("future", "2100-01-01", "09:00", None), "date"),
    (("x" * 257, "2026-11-25", "09:00", None), "user_id"),
    (("wordy", "2026-11-25", "09:00", "x" * 501), "note"),
]


def good_rows(rows=BROKEN_ROWS) -> List[Tuple[str, str, str]]:
    """A row on GOOD_DATE for each user whose ID is not at fault."""
    return [(user_id, GOOD_DATE, "10:00") for user_id, _, _, field in rows if field != "user_id"]


def unversioned_database(testcase: unittest.TestCase, release: str, rows, starts: int = 1) -> str:
    """A file as the release of that date left it after that many starts, holding rows."""
    path = temporary_database(testcase)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        for _ in range(starts):
            db.executescript(UNVERSIONED_DDL[release])
        db.executemany("INSERT INTO appointments VALUES (?, ?, ?)", rows)
    return path


def plant_rows(path: str, rows) -> None:
    """Write rows past the CHECK constraints, as a tool that switches them off would."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA ignore_check_constraints = ON")
        db.executemany("INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)", rows)


def query(path: str, sql: str, parameters=()) -> list:
    """The rows of one query (committed at once), on a connection of its own."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        return db.execute(sql, parameters).fetchall()


def files_of(path: str) -> Dict[str, Optional[str]]:
    """The database's files, by suffix: a digest of each one's bytes, or None if absent."""
    digests = {}
    for suffix in ("", "-wal", "-shm", "-journal", "-lock"):
        try:
            with open(path + suffix, "rb") as file:
                digests[suffix] = hashlib.sha256(file.read()).hexdigest()
        except FileNotFoundError:
            digests[suffix] = None
    return digests


OUR_APPLICATION_ID = f"PRAGMA application_id = {scheduler.APPLICATION_ID}"


def foreign_files(testcase: unittest.TestCase) -> Dict[str, str]:
    """Files that are not this service's, by what they are: each a path."""
    paths = {}
    for case, statements in (
            ("another application's appointments", [
                "CREATE TABLE appointments (id INTEGER PRIMARY KEY, patient TEXT, starts_at TEXT)",
                "INSERT INTO appointments (patient, starts_at) VALUES ('x', '2026-11-25 09:30')"]),
            ("ours, beside another table", [
                UNVERSIONED_DDL["2026-11-25"], "CREATE TABLE invoices (id INTEGER PRIMARY KEY)"]),
            ("a newer release's", [
                UNVERSIONED_DDL["2026-11-25"], OUR_APPLICATION_ID,
                f"PRAGMA user_version = {scheduler.SCHEMA_VERSION + 1}"]),
            ("another application's, in WAL mode", [
                "PRAGMA journal_mode = WAL", "CREATE TABLE events (id INTEGER PRIMARY KEY)"]),
            ("ours, with a version no release wrote", [
                UNVERSIONED_DDL["2026-11-25"], OUR_APPLICATION_ID, "PRAGMA user_version = -1"]),
            ("only a header of another application's", ["PRAGMA user_version = 7"])):
        paths[case] = temporary_database(testcase)
        with contextlib.closing(sqlite3.connect(paths[case], isolation_level=None)) as db:
            for statement in statements:
                db.execute(statement)
    # Another application's log (-wal) copied without its index (-shm), as after a crash.
    paths["another application's log, without its index"] = copy = temporary_database(testcase)
    with contextlib.closing(sqlite3.connect(paths["another application's, in WAL mode"],
                                            isolation_level=None)) as db:
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("INSERT INTO events DEFAULT VALUES")  # in the log, not yet in the file
        for suffix in ("", "-wal"):
            shutil.copyfile(paths["another application's, in WAL mode"] + suffix, copy + suffix)
    paths["not SQLite at all"] = temporary_database(testcase)
    with open(paths["not SQLite at all"], "w") as file:
        file.write("user_id,date,time\nalice,2026-11-25,09:30\n")
    return paths


class RecordingConnection:
    """An sqlite3 connection that records the SQL of each statement run through it."""

    def __init__(self, db: sqlite3.Connection):
        self.__dict__.update(db=db, statements=[])

    def execute(self, sql, *parameters):
        self.statements.append(sql)
        return self.db.execute(sql, *parameters)

    def executemany(self, sql, *parameters):
        self.statements.append(sql)
        return self.db.executemany(sql, *parameters)

    def __getattr__(self, name):
        return getattr(self.db, name)

    def __setattr__(self, name, value):  # text_factory
        setattr(self.db, name, value)


def steps_sql(testcase: unittest.TestCase) -> List[List[str]]:
    """The SQL each schema step runs, in order, from a file of the first release
    holding rows that take every branch: a row set aside by step 1, two forms of
    one user ID on one date for step 4."""
    path = unversioned_database(testcase, "2026-11-25", [
        ("late", "2026-11-25", "25:00"), ("Jose\u0301", "2026-11-25", "10:00"),
        ("Jos\u00e9", "2026-11-25", "09:00"), ("alice", "2026-11-25", "09:30")])
    steps = []
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for step in scheduler.SCHEMA_STEPS:
            recording = RecordingConnection(db)
            step(recording)
            steps.append(recording.statements)
        testcase.assertEqual(query(path, "SELECT count(*) FROM set_aside"), [(2,)])
    return steps


def digest(statements: List[str]) -> str:
    return hashlib.sha256("\n;\n".join(statements).encode()).hexdigest()


# What each schema step that shipped runs: the SHA-256 of its statements (steps_sql()).
# A shipped step is frozen; a rule that changes gets a new step, and a new line here.
SHIPPED_STEPS = {
    1: "1141bd907652b1f60d596491e4cbe7864ee5a64034722377eb23a42fcd12f1fe",
    2: "b76c3dcdecae0f4925cd7e7b21cda2a8a2d87ff5ff3942ab6663e1b1c59e2e3a",
    3: "9267dc9921f711f66ca2984e61ca5a0108b9e94b82407f13d1008e0e2c7d259f",
    4: "659826acf89e23f875bcaf8b916866201753aa53a7dbb470703d45e77958e9e5",
    5: "e644279dfcf700fa7efdb3c7fb9dfc17f79df1c983bdc28400d71523b7f2bd74",
    6: "a91609441e7bc6ccd7b6eb36117491cbc638daa6f111669c8f176fb990058953",
    7: "f26fc3f9a6e15a04b8caead94425e383d45abb78c0b67cf9f6f4ce5fcaeb07e3",
    8: "aa162748b6434d95fc601eb68d3629424041277aab144db347633cf81c66cb28",
}


def assert_upgraded_events_keep_their_uids(test: unittest.TestCase, store: scheduler.Store):
    """The appointments a release from before events were kept stored (alice's on
    2026-11-25 at 09:30, with a note, and on 2026-11-26 at 23:30; Jos\u00e9's on
    2000-01-01 at 00:00), in store, upgraded: each feed shows the UIDs that release's
    did, made of the user and the start, so subscribers see no change; a move keeps
    its UID, and a slot cancelled and booked again is a new event."""
    def uids(user_id: str) -> List[str]:
        feed = scheduler.calendar_feed(user_id, store.events(user_id), scheduler.utc_now())
        return [line[4:] for line in unfold(feed) if line.startswith("UID:")]

    alice = ["20261125T093000Z-2bd806c97f0e00af@scheduler",  # as the README showed them
             "20261126T233000Z-2bd806c97f0e00af@scheduler"]
    test.assertEqual(uids("alice"), alice)
    test.assertEqual(uids("Jos\u00e9"), [
        "20000101T000000Z-%s@scheduler" % hashlib.sha256("Jos\u00e9".encode()).hexdigest()[:16]])
    test.assertEqual([(event.sequence, event.modified) for event in store.events("alice")],
                     [(0, None), (0, None)])  # when each last changed is not known
    store.reschedule("alice", dt.date(2026, 11, 25), scheduler.Changes(dt.date(2026, 11, 27)))
    test.assertEqual(uids("alice"), alice[1:] + alice[:1])  # the moved one is last now
    moved = store.events("alice")[1]
    test.assertEqual((moved.appointment.note, moved.sequence), ("Left knee", 1))
    test.assertIsNotNone(moved.modified)
    store.cancel("alice", dt.date(2026, 11, 26))
    store.book(appointment(date="2026-11-26", time="23:30"))
    test.assertNotIn(uids("alice")[0], alice)


def rows_by_table(path: str, *others: str) -> Tuple[Dict[str, str], Dict[str, list]]:
    """By table of the SQLite file at path (appointments, users, appointment_count and
    others), the SQL that reads its rows in order, and what it reads now: what an
    upgrade must leave as it found it."""
    tables = {"appointments": "SELECT rowid, user_id, date, time, note FROM appointments "
                              "ORDER BY rowid",
              **{table: f"SELECT * FROM {table} ORDER BY 1, 2" for table in (
                  "users", "appointment_count", *others)}}
    return tables, {table: query(path, sql) for table, sql in tables.items()}


class SchemaTest(unittest.TestCase):
    """The file's schema has a version; a start upgrades older files in one
    transaction and refuses files it does not own, before changing them."""

    def open(self, path: str, **options) -> scheduler.SQLiteStore:
        store = scheduler.SQLiteStore(path, **options)
        self.addCleanup(store.close)
        return store

    def schema(self, path: str) -> list:
        return query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")

    def test_every_release_before_versions_upgrades_keeping_every_appointment(self):
        rows = [("alice", "2026-11-25", "09:30"), ("alice", "2026-11-26", "23:30"),
                ("bob", "2099-12-31", "00:00"), ("😀", "2000-01-01", "12:00")]
        for release in UNVERSIONED_DDL:
            with self.subTest(release=release):
                path = unversioned_database(self, release, rows, starts=3)
                store = self.open(path)
                self.assertIn(f"Upgraded {path} to schema version 1", store.notices[0])
                self.assertEqual(query(path, "PRAGMA user_version"),
                                 [(scheduler.SCHEMA_VERSION,)])
                self.assertEqual(query(path, "PRAGMA application_id"),
                                 [(scheduler.APPLICATION_ID,)])
                self.assertEqual(query(path, "PRAGMA integrity_check"), [("ok",)])
                for user_id in ("alice", "bob", "😀"):
                    self.assertEqual(store.list_for_user(user_id),
                                     [appointment(*row) for row in rows if row[0] == user_id])
                self.assertEqual(store.count(), 4)
                with self.assertRaises(scheduler.AlreadyBooked):  # one per user and date
                    store.book(appointment("alice", "2026-11-25", "10:00"))
                store.close()
                schema, stored = self.schema(path), query(path, "SELECT * FROM appointments")
                again = self.open(path)
                self.assertEqual(again.notices, ())  # a second start changes nothing
                self.assertEqual(self.schema(path), schema)
                self.assertEqual(query(path, "SELECT * FROM appointments"), stored)

    def test_every_versioned_schema_upgrades_keeping_every_appointment(self):
        for version in range(1, scheduler.SCHEMA_VERSION):
            with self.subTest(version=version):
                path = temporary_database(self)
                with database_of_release(path, version) as db:
                    db.execute("INSERT INTO appointments (user_id, date, time) VALUES "
                               "('alice', '2026-11-25', '09:30')")
                store = self.open(path)
                self.assertEqual(
                    [notice.split(":")[0] for notice in store.notices],
                    [f"Upgraded {path} to schema version {step}"
                     for step in range(version + 1, scheduler.SCHEMA_VERSION + 1)])
                self.assertEqual(store.list_for_user("alice"), [appointment()])
                self.assertEqual(store.count(), 1)
                noted = appointment(date="2026-11-26")._replace(note="a note")
                self.assertEqual(store.book(noted), noted)  # the new column, in use
                with self.assertRaisesRegex(sqlite3.IntegrityError, "CHECK"):
                    query(path, "UPDATE appointments SET note = ?", ("",))

    def test_rows_written_past_the_constraints_do_not_stop_an_upgrade(self):
        # Each release's file, holding rows a tool wrote past its CHECK constraints,
        # opens as a file of today holding the same rows does.
        rows = [row[:3] for row in BROKEN_ROWS if isinstance(row[0], str)]
        rows += [row[:3] for row, _ in PAST_BOUNDS] + [("alice", GOOD_DATE, "10:00")]
        planted = list({row[0]: row for row in rows}.values())  # a row a user

        def opened(path: str) -> dict:
            self.open(path).close()
            return {table: sorted(query(path, sql), key=repr) for table, sql in (
                ("appointments", "SELECT user_id, date, time FROM appointments"),
                ("set_aside", "SELECT user_id, date, time, reason FROM set_aside"),
                ("users", "SELECT user_id, appointments FROM users"))}

        today = made_database(self)
        plant_rows(today, planted)
        expected = opened(today)
        for version in range(1, scheduler.SCHEMA_VERSION):
            with self.subTest(version=version):
                path = temporary_database(self)
                with database_of_release(path, version):
                    pass
                plant_rows(path, planted)
                self.assertEqual(opened(path), expected)
                self.assertEqual(query(path, "PRAGMA user_version"), [(scheduler.SCHEMA_VERSION,)])

    def test_version_5_counts_each_users_appointments_and_scopes_the_keys_kept(self):
        path = temporary_database(self)
        booked = json.dumps(appointment().as_json()).encode()
        in_the_way = json.dumps({"status": 409, "appointment": appointment(
            "bob").as_json()}).encode()
        with database_of_release(path, 4) as db:
            db.executemany("INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)",
                           [("alice", "2026-11-25", "09:30"), ("alice", "2026-11-26", "10:00"),
                            ("bob", "2026-11-25", "09:30")])
            db.executemany("INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?, ?, ?)", [
                ("booked", b"f1", time.time(), 201, "application/json", "[]", booked),
                ("conflict", b"f2", time.time(), 409, "application/problem+json", "[]",
                 in_the_way),
                ("cancelled", b"f3", time.time(), 204, None, "[]", None)])
        store = self.open(path, user_capacity=2)
        self.assertIn("Upgraded", store.notices[0])
        self.assertEqual(query(path, "SELECT * FROM users ORDER BY user_id"),
                         [("alice", 2, 1), ("bob", 1, 1)])
        self.assertEqual(query(path, "SELECT user_id, key, changed, status FROM "
                                     "idempotency_keys ORDER BY key"),
                         [("alice", "booked", 1, 201), ("bob", "conflict", 0, 409)])
        with self.assertRaises(scheduler.AlreadyKeyed) as kept:
            store.book(appointment(), scheduler.Keyed("alice", "booked", b"f1", None))
        self.assertEqual(kept.exception.replay.body, booked)
        with self.assertRaises(scheduler.StoreFull):  # alice's two count
            store.book(appointment(date="2026-11-27"))
        store.book(appointment("bob", "2026-11-27"))
        store.reschedule("bob", dt.date(2026, 11, 27), scheduler.Changes(
            dt.date(2026, 11, 28), None))
        store.cancel("alice", dt.date(2026, 11, 26))
        self.assertEqual(query(path, "SELECT * FROM users ORDER BY user_id"),
                         [("alice", 1, 2), ("bob", 2, 4)])

    def test_one_count_row_whatever_the_number_of_starts(self):
        for path in (temporary_database(self),
                     unversioned_database(self, "2026-11-30", [("a", "2026-11-25", "09:00")],
                                          starts=9)):
            with self.subTest(path=path):
                for _ in range(3):
                    self.open(path).close()
                store = self.open(path)
                store.book(appointment("b"))
                self.assertEqual(query(path, "SELECT * FROM appointment_count"),
                                 [(1, store.count())])

    # Opens the file that each line read names, and says so; ends when its input does.
    OPEN_WHEN_TOLD = ("import sys, scheduler\nprint('ready', flush=True)\n"
                      "for line in sys.stdin:\n"
                      "    scheduler.SQLiteStore(line[:-1]).close()\n"
                      "    print('opened', flush=True)\n")

    def test_processes_starting_at_once_on_a_new_file_all_open_it(self):
        # Four processes race to open each of four new files, a file a round; each
        # imports the module once.
        starts = [subprocess.Popen([*PYTHON, "-c", self.OPEN_WHEN_TOLD], cwd=HERE,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                  for _ in range(4)]
        for start in starts:
            self.addCleanup(start.stdout.close)
            self.addCleanup(start.stdin.close)
            self.addCleanup(lambda start=start: start.poll() is None and start.kill())
            self.assertEqual(start.stdout.readline(), "ready\n")
        for round_ in range(4):  # SQLite refused the switch to WAL in 13 of 80 such starts
            with self.subTest(round=round_):
                path = temporary_database(self)
                open(path, "w").close()  # empty, as a unit file's touch leaves it
                for start in starts:  # all at once, as near as can be
                    start.stdin.write(path + "\n")
                    start.stdin.flush()
                for start in starts:
                    self.assertEqual(start.stdout.readline(), "opened\n")
                self.assertEqual(query(path, "SELECT one FROM appointment_count"), [(1,)])
        for start in starts:
            start.stdin.close()  # the end
            self.assertEqual(start.stdout.read(), "")
            self.assertEqual(start.wait(timeout=30), 0)

    def test_a_shipped_step_runs_the_sql_it_shipped_with(self):
        self.assertEqual(len(SHIPPED_STEPS), scheduler.SCHEMA_VERSION,
                         "a new schema step gets its digest in SHIPPED_STEPS")
        for number, statements in enumerate(steps_sql(self), 1):
            with self.subTest(step=number):
                self.assertEqual(digest(statements), SHIPPED_STEPS[number],
                                 f"schema step {number} shipped, and its SQL is frozen: "
                                 "a rule that changes gets a new step")

    def test_rules_changed_since_a_step_shipped_leave_the_step_as_it_was(self):
        shipped = temporary_database(self)
        self.open(shipped).close()
        longer_notes = scheduler.FreeText(1000, line_breaks=True)
        rules = {"START_MINUTES": (0, 15, 30, 45), "MAX_USER_ID_LENGTH": 300,
                 "FIRST_DATE": dt.date(1990, 1, 1), "LAST_DATE": dt.date(2199, 12, 31),
                 # The note's rule is NOTE, made once from MAX_NOTE_LENGTH, and DETAILS
                 # holds it: each changed as the module would have made it.
                 "MAX_NOTE_LENGTH": 1000, "NOTE": longer_notes,
                 "DETAILS": tuple(detail._replace(text=longer_notes) if detail.name == "note"
                                  else detail for detail in scheduler.DETAILS)}
        with contextlib.ExitStack() as patches:
            for name, value in rules.items():
                patches.enter_context(mock.patch.object(scheduler, name, value))
            path = temporary_database(self)
            self.open(path)
            self.assertEqual([digest(statements) for statements in steps_sql(self)],
                             [SHIPPED_STEPS[number] for number in sorted(SHIPPED_STEPS)])
        self.assertEqual(self.schema(path), self.schema(shipped))
        # Since step 6 the tables hold none of the rules' values (past_the_bounds()).
        (table,), = query(path, "SELECT sql FROM sqlite_master WHERE name = 'appointments'")
        for value in ("'30'", "256", "'2000-01-01'", "'2099-12-31'", "500"):
            self.assertNotIn(value, table)

    def test_version_6_keeps_every_row_and_every_count(self):
        path = temporary_database(self)
        with database_of_release(path, 5) as db:
            db.executemany("INSERT INTO appointments (user_id, date, time, note) "
                           "VALUES (?, ?, ?, ?)", [
                               ("alice", "2026-11-25", "09:30", "Left knee"),
                               ("alice", "2026-11-26", "23:30", None),
                               ("Jos\u00e9", "2000-01-01", "00:00", "line 1\nline 2"),
                               ("bob", "2099-12-31", "12:00", None)])
            db.execute("DELETE FROM appointments WHERE user_id = 'bob'")  # bob's version: 2
            db.execute("INSERT INTO idempotency_keys VALUES ('alice', 'k', x'01', 1.5, 1, 201, "
                       "'application/json', '[]', x'7b7d')")
        tables, before = rows_by_table(path, "idempotency_keys")
        store = self.open(path)
        self.assertEqual(store.notices[0], f"Upgraded {path} to schema version 6: Rows checked "
                                           "by SQLite for their form alone; lengths, dates and "
                                           "starts by the rules.")
        self.assertEqual(len(store.notices), scheduler.SCHEMA_VERSION - 5)  # nothing set aside
        self.assertEqual({table: query(path, sql) for table, sql in tables.items()}, before)
        self.assertEqual(query(path, "PRAGMA integrity_check"), [("ok",)])
        made = temporary_database(self)
        self.open(made)
        self.assertEqual(self.schema(path), self.schema(made))  # upgraded, or made so
        # The triggers, made again, count as before.
        store.book(appointment("carol"))
        store.reschedule("alice", dt.date(2026, 11, 26), scheduler.Changes(dt.date(2026, 11, 27)))
        store.cancel("alice", dt.date(2026, 11, 25))
        self.assertEqual(query(path, "SELECT * FROM users ORDER BY user_id"), [
            ("Jos\u00e9", 1, 1), ("alice", 1, 5), ("bob", 0, 2), ("carol", 1, 1)])
        self.assertEqual(query(path, "SELECT n FROM appointment_count"), [(3,)])
        self.assertEqual(store.count(), 3)

    def test_version_7_keeps_every_row_and_the_uid_each_feed_showed(self):
        path = temporary_database(self)
        with database_of_release(path, 6) as db:
            db.executemany("INSERT INTO appointments (user_id, date, time, note) "
                           "VALUES (?, ?, ?, ?)", [
                               ("alice", "2026-11-25", "09:30", "Left knee"),
                               ("alice", "2026-11-26", "23:30", None),
                               ("Jos\u00e9", "2000-01-01", "00:00", None)])
        tables, before = rows_by_table(path)
        store = self.open(path)
        self.assertEqual(store.notices[0], f"Upgraded {path} to schema version 7: Calendar "
                                           "events: a key kept across moves, a count of "
                                           "changes, when the last was made.")
        self.assertEqual({table: query(path, sql) for table, sql in tables.items()}, before)
        made = temporary_database(self)
        self.open(made)
        self.assertEqual(self.schema(path), self.schema(made))  # upgraded, or made so
        for column, value in (("event_key", ""), ("event_key", b"k"), ("sequence", -1),
                              ("sequence", "x"), ("modified", 1.5)):
            with self.subTest(column=column, value=value), \
                    self.assertRaisesRegex(sqlite3.IntegrityError, "CHECK"):
                query(path, f"UPDATE appointments SET {column} = ?", (value,))
        query(path, "UPDATE appointments SET event_key = 'a b\r\n' WHERE date = '2000-01-01'")
        assert_upgraded_events_keep_their_uids(self, store)  # that key taken as none

    def test_version_8_keeps_every_row_and_every_count_and_refuses_what_7_refused(self):
        path = temporary_database(self)
        with database_of_release(path, 7) as db:
            db.executemany("INSERT INTO appointments (user_id, date, time, note, event_key, "
                           "sequence, modified) VALUES (?, ?, ?, ?, ?, ?, ?)", [
                               ("alice", "2026-11-25", "09:30", "Left knee", None, 0, None),
                               ("alice", "2026-11-26", "23:30", None, "k-1", 2, 1700),
                               ("Jos\u00e9", "2000-01-01", "00:00", None, "k-2", 0, 1800),
                               ("bob", "2099-12-31", "12:00", None, None, 0, None)])
            db.execute("DELETE FROM appointments WHERE user_id = 'bob'")  # bob's version: 2
        tables = {"appointments": "SELECT rowid, user_id, date, time, note, event_key, "
                                  "sequence, modified FROM appointments ORDER BY rowid",
                  **{table: f"SELECT * FROM {table} ORDER BY 1" for table in (
                      "users", "appointment_count")}}
        before = {table: query(path, sql) for table, sql in tables.items()}
        store = self.open(path)
        self.assertEqual(store.notices[0], f"Upgraded {path} to schema version 8: User IDs "
                                           "checked for control characters by a pattern "
                                           "written out, not made for each row.")
        self.assertEqual(len(store.notices), scheduler.SCHEMA_VERSION - 7)  # nothing set aside
        self.assertEqual({table: query(path, sql) for table, sql in tables.items()}, before)
        self.assertEqual(query(path, "PRAGMA integrity_check"), [("ok",)])
        made = temporary_database(self)
        self.open(made)
        self.assertEqual(self.schema(path), self.schema(made))  # upgraded, or made so
        # The user IDs each takes, by SQLite's CHECK constraints alone.
        user_ids = ["alice", "", " alice", "alice ", "a\x01b", "a\x1fb", "a\x7fb", "\x01",
                    "a\x00b", "a b", "a\x80b", "\u00e9", "a[b]*?", "a-b", b"alice", 1]
        version_7 = temporary_database(self)
        with database_of_release(version_7, 7):
            pass

        def taken(file: str) -> List[bool]:
            verdicts = []
            with contextlib.closing(sqlite3.connect(file, isolation_level=None)) as db:
                for user_id in user_ids:
                    db.execute("BEGIN")
                    try:
                        db.execute("INSERT INTO appointments (user_id, date, time) "
                                   "VALUES (?, '2030-01-01', '10:00')", (user_id,))
                        verdicts.append(True)
                    except sqlite3.IntegrityError:
                        verdicts.append(False)
                    db.execute("ROLLBACK")
            return verdicts

        in_utf_16 = temporary_database(self)  # a file whose text is UTF-16, all steps run
        with contextlib.closing(sqlite3.connect(in_utf_16, isolation_level=None)) as db:
            db.execute("PRAGMA encoding = 'UTF-16le'")
            for step in scheduler.SCHEMA_STEPS:
                step(db)
        self.assertEqual(query(in_utf_16, "PRAGMA encoding"), [("UTF-16le",)])
        self.assertEqual(taken(path), taken(version_7))
        self.assertEqual(taken(in_utf_16), taken(version_7))
        self.assertEqual(taken(path), [True, False, False, False, False, False, False, False,
                                       True, True, True, True, True, True, False, True])
        # The triggers, made again, count as before.
        store.book(appointment("carol"))
        store.cancel("alice", dt.date(2026, 11, 25))
        self.assertEqual(query(path, "SELECT * FROM users WHERE user_id IN "
                                     "('alice', 'bob', 'carol') ORDER BY user_id"),
                         [("alice", 1, 3), ("bob", 0, 2), ("carol", 1, 1)])
        self.assertEqual(query(path, "SELECT n FROM appointment_count"), [(3,)])

    def test_rows_past_the_bounds_of_the_rules_are_set_aside_by_the_next_start(self):
        path = temporary_database(self)
        self.open(path).close()
        for row, _ in PAST_BOUNDS:  # SQLite takes them: their form is right
            query(path, "INSERT INTO appointments (user_id, date, time, note) "
                        "VALUES (?, ?, ?, ?)", row)
        store = self.open(path)
        self.assertEqual(store.count(), 0)
        aside = query(path, "SELECT user_id, date, time, note, reason FROM set_aside "
                            "ORDER BY rowid")
        self.assertEqual([row[:4] for row in aside], [row for row, _ in PAST_BOUNDS])
        for (_, field), (*_, reason) in zip(PAST_BOUNDS, aside):
            with self.subTest(field=field):
                self.assertTrue(reason.startswith(field + " "), reason)
        self.assertIn(f"{len(PAST_BOUNDS)} stored appointment(s) break the rules",
                      store.notices[-1])

    def test_a_rule_that_changes_reaches_the_file_with_no_new_step(self):
        path = temporary_database(self)
        store = self.open(path)
        store.book(appointment("alice", time="09:30"))
        store.book(appointment("bob", time="10:00"))
        store.close()
        with other_rules(APPOINTMENT_LENGTH=dt.timedelta(minutes=15),
                         START_MINUTES=(0, 15, 30, 45)):
            wider = self.open(path)
            self.assertEqual(wider.notices, ())  # no step, nothing set aside
            quarter = appointment("carol", time="09:15")
            self.assertEqual(wider.book(quarter), quarter)
            self.assertEqual(wider.list_for_user("carol"), [quarter])
            wider.close()
        with other_rules(APPOINTMENT_LENGTH=dt.timedelta(minutes=60), START_MINUTES=(0,)):
            narrower = self.open(path)  # 09:30 and 09:15 break these rules: set aside
            self.assertEqual(narrower.list_for_user("bob"), [appointment("bob", time="10:00")])
            self.assertEqual(narrower.count(), 1)
        self.assertEqual(sorted(query(path, "SELECT user_id, time, reason FROM set_aside")), [
            ("alice", "09:30", "time 09:30 is not bookable: appointments start on the hour "
                               "(minutes 00)"),
            ("carol", "09:15", "time 09:15 is not bookable: appointments start on the hour "
                               "(minutes 00)")])

    def test_a_new_file_is_created_at_the_current_version(self):
        path = temporary_database(self)
        store = self.open(path)
        self.assertEqual(store.notices, (f"Created {path} (schema version "
                                         f"{scheduler.SCHEMA_VERSION}).",))
        self.assertEqual(query(path, "PRAGMA user_version"), [(scheduler.SCHEMA_VERSION,)])
        self.assertEqual(self.open(path).notices, ())
        empty = temporary_database(self)
        open(empty, "w").close()  # an empty file is a new one
        self.assertEqual(self.open(empty).notices, (f"Created {empty} (schema version "
                                                    f"{scheduler.SCHEMA_VERSION}).",))

    def test_a_file_it_does_not_own_is_refused_before_anything_changes(self):
        for case, path in foreign_files(self).items():
            with self.subTest(case=case):
                before = files_of(path)
                with self.assertRaises(sqlite3.DatabaseError) as raised:
                    scheduler.SQLiteStore(path)
                self.assertEqual(files_of(path), before)
                if case == "a newer release's":
                    self.assertIn(f"its schema is version {scheduler.SCHEMA_VERSION + 1}, newer "
                                  f"than this release's {scheduler.SCHEMA_VERSION}",
                                  str(raised.exception))

    def test_rows_that_break_the_rules_are_set_aside_with_their_reason(self):
        path = unversioned_database(self, "2026-11-30", [row[:3] for row in BROKEN_ROWS]
                                    + good_rows())
        store = self.open(path)
        self.assertEqual(store.count(), len(good_rows()))  # set aside: not counted
        aside = query(path, "SELECT user_id, date, time, reason FROM set_aside ORDER BY rowid")
        self.assertCountEqual([row[:3] for row in aside], [row[:3] for row in BROKEN_ROWS])
        for user_id, date, time_, field in BROKEN_ROWS:
            with self.subTest(user_id=user_id):
                reason = next(row[3] for row in aside if row[0] == user_id)
                self.assertTrue(reason.startswith(field + " "), reason)
                if field != "user_id":
                    self.assertEqual(store.list_for_user(user_id),
                                     [appointment(user_id, GOOD_DATE, "10:00")])
        self.assertIn(f"{len(BROKEN_ROWS)} stored appointment(s) break the rules",
                      store.notices[-1])
        store.book(appointment("late", "2026-11-25", "09:00"))  # no longer in the way

    def test_sqlite_itself_refuses_rows_that_break_the_rules(self):
        path = temporary_database(self)
        self.open(path)
        more = [(user_id, "2026-11-25", "09:00", "user_id") for user_id in ("", " x", "a\tb")]
        for user_id, date, time_, field in BROKEN_ROWS + more:
            if isinstance(user_id, str) and not user_id.isascii():
                continue  # invisible characters: the next start sets them aside
            if user_id in ("quarter", "old"):
                continue  # past a bound of the rules, which the code checks (PAST_BOUNDS)
            with self.subTest(user_id=user_id, date=date, time=time_):
                with self.assertRaisesRegex(sqlite3.IntegrityError, "CHECK constraint failed"):
                    query(path, "INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)",
                          (user_id, date, time_))

    def test_version_4_brings_user_ids_to_nfc_and_one_user_keeps_one_appointment_a_date(self):
        nfc, nfd, other = "Jos\u00e9", "Jose\u0301", "Jose\u0341"  # U+0341 is U+0301 in NFC
        path = temporary_database(self)
        with database_of_release(path, 3) as db:
            db.executemany("INSERT INTO appointments (user_id, date, time, note) "
                           "VALUES (?, ?, ?, ?)", [
                               (nfd, "2026-11-24", "08:00", "kept whole"),  # the date is free
                               (nfd, "2026-11-25", "10:00", None),  # the NFC one is kept
                               (nfc, "2026-11-25", "09:00", None),
                               (other, "2026-11-26", "12:00", None),  # not the first stored
                               (nfd, "2026-11-26", "11:00", None),
                               ("alice\u3164", "2026-11-25", "09:00", None),  # now refused
                               ("alice", "2026-11-25", "09:30", None)])
        store = self.open(path)
        self.assertEqual(store.list_for_user(nfd), [])  # a store is asked in NFC
        self.assertEqual(store.list_for_user(nfc), [
            appointment(nfc, "2026-11-24", "08:00")._replace(note="kept whole"),
            appointment(nfc, "2026-11-25", "09:00"), appointment(nfc, "2026-11-26", "12:00")])
        self.assertEqual(store.list_for_user("alice"),
                         [appointment("alice", "2026-11-25", "09:30")])
        self.assertEqual(store.count(), 4)
        self.assertEqual(query(path, "SELECT DISTINCT user_id FROM appointments ORDER BY 1"),
                         [(nfc,), ("alice",)])
        merged = "user_id is, in NFC (as this release reads it), the user of another " \
                 "appointment that date"
        self.assertEqual(query(path, "SELECT user_id, date, time, reason FROM set_aside "
                                     "ORDER BY rowid"), [
            (nfd, "2026-11-25", "10:00", merged), (nfd, "2026-11-26", "11:00", merged),
            ("alice\u3164", "2026-11-25", "09:00",
             "user_id must not contain the invisible character U+3164 (HANGUL FILLER)")])
        upgraded, counted, *_, aside = store.notices
        self.assertTrue(counted.startswith(f"Upgraded {path} to schema version 5: "))
        self.assertEqual(upgraded, f"Upgraded {path} to schema version 4: User IDs in NFC: "
                                   "forms of one ID merge, a second appointment on a date set "
                                   "aside.")
        self.assertIn("3 stored appointment(s) break the rules of this release", aside)
        self.assertIn(f"row 1: 'Jose\\u0301' '2026-11-25' '10:00' ({merged})", aside)
        self.assertIn("row 3: 'alice\\u3164' '2026-11-25' '09:00' (user_id must not contain "
                      "the invisible character U+3164 (HANGUL FILLER))", aside)
        store.close()
        self.assertEqual(self.open(path).notices, (aside,))  # nothing more is moved

    def test_the_next_start_sets_aside_user_ids_that_sql_cannot_check(self):
        path = temporary_database(self)
        self.open(path).close()
        unicode_rows = [row[:3] for row in BROKEN_ROWS if row[3] == "user_id"
                        and isinstance(row[0], str)]
        query(path, "INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)",
              unicode_rows[0])  # no CHECK sees the invisible character
        plant_rows(path, unicode_rows[1:] + [("\u00e9t\u00e9", "2026-11-25", "09:00")])
        query(path, "INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)",
              ("e\u0301te\u0301", "2026-11-25", "10:00"))  # not in NFC: été, by hand
        store = self.open(path)
        self.assertEqual(store.count(), 1)  # été alone: a visible character beyond ASCII
        self.assertEqual(sorted(query(path, "SELECT user_id, date, time FROM set_aside")),
                         sorted(unicode_rows + [("e\u0301te\u0301", "2026-11-25", "10:00")]))
        self.assertEqual(query(path, "SELECT reason FROM set_aside WHERE time = '10:00'"), [
            ("user_id is not in NFC (Unicode's composed form), as this release stores it",)])


    def test_the_next_start_sets_aside_user_ids_no_url_can_hold(self):
        path = temporary_database(self)
        self.open(path).close()
        for user_id in (*scheduler.DOT_SEGMENTS, "..."):  # no CHECK refuses them
            query(path, "INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)",
                  (user_id, "2026-11-25", "09:00"))
        store = self.open(path)
        self.assertEqual(store.count(), 1)  # "..." alone
        reason = "user_id must not be . or ..: an appointment's URL could not hold it"
        self.assertEqual(query(path, "SELECT user_id, reason FROM set_aside ORDER BY 1"),
                         [(".", reason), ("..", reason)])


class RowIsolationTest(BatchTestCase):
    """A write of a batch that fails unforeseen is undone alone: it leaves the
    others, and a row that cannot be read is a clear StoreUnavailable, never more."""

    def test_a_row_that_cannot_be_read_is_left_out_then_set_aside_when_in_the_way(self):
        store = self.store()
        plant_rows(store.path, [("alice", "2026-11-25", "25:00"), ("bob", "2026-11-25", "09:15"),
                                ("carol", "2026-02-30", "09:00"), ("carol", GOOD_DATE, "10:00")])
        self.assertEqual(store.list_for_user("alice"), [])
        self.assertEqual(store.list_for_user("carol"), [appointment("carol", GOOD_DATE, "10:00")])
        with self.assertRaises(scheduler.NotBooked):
            store.get("bob", dt.date(2026, 11, 25))
        outcomes = self.gathered(store, [
            lambda: store.reschedule("alice", dt.date(2026, 11, 25),
                                     scheduler.Changes(None, dt.time(10))),
            lambda: store.book(appointment("dave")),
            lambda: store.book(appointment("bob", time="10:00")),  # bob's 09:15 is in the way
            lambda: store.reschedule("carol", dt.date(2026, 11, 26),
                                     scheduler.Changes(dt.date(2026, 11, 25), None)),
            lambda: store.book(appointment("erin"))])
        self.assertIsInstance(outcomes[0], scheduler.NotBooked)
        self.assertEqual(outcomes[1:], [appointment("dave"), appointment("bob", time="10:00"),
                                        appointment("carol", time="10:00"), appointment("erin")])
        self.assertEqual(sorted(query(store.path, "SELECT user_id, time FROM set_aside")),
                         [("alice", "25:00"), ("bob", "09:15")])
        self.assertEqual(store.list_for_user("bob"), [appointment("bob", time="10:00")])

    def test_an_unexpected_error_undoes_only_its_own_write(self):
        class Flawed(scheduler.SQLiteStore):
            def _book(self, db, appointment):
                booked = super()._book(db, appointment)
                if appointment.user_id == "flawed":
                    raise RuntimeError("a bug, after the row was written")
                return booked

        store = self.store(Flawed)
        outcomes = self.gathered(store, [lambda user=user: store.book(appointment(user))
                                         for user in ("alice", "flawed", "bob", "alice")])
        self.assertIsInstance(outcomes[1], RuntimeError)
        self.assertEqual([outcomes[0], outcomes[2]], [appointment("alice"), appointment("bob")])
        self.assertIsInstance(outcomes[3], scheduler.AlreadyBooked)  # alice's first stands
        self.assertEqual(store.list_for_user("flawed"), [])  # its row undone
        self.assertEqual(store.count(), 2)
        self.assertEqual(query(store.path, "SELECT user_id, appointments FROM users "
                                           "ORDER BY user_id"), [("alice", 1), ("bob", 1)])


def hold_writers_lock(testcase: unittest.TestCase, path: str) -> Callable[[], None]:
    """Take the writers' file lock as another server process would; return what
    releases it (at the latest when the test ends)."""
    holder = open(f"{path}-lock", "a")
    testcase.addCleanup(holder.close)
    fcntl.flock(holder, fcntl.LOCK_EX)
    return lambda: fcntl.flock(holder, fcntl.LOCK_UN)


def store_outcome(store: scheduler.SQLiteStore) -> str:
    """Book alice; the message of the StoreUnavailable that answers (and its cause, for
    the log, after a newline, if it has one), or "booked"."""
    try:
        store.book(appointment())
        return "booked"
    except scheduler.StoreUnavailable as error:
        return str(error) + (f"\n{error.cause}" if error.cause else "")


class WritersLockTest(unittest.TestCase):
    def test_the_waiting_thread_hands_the_lock_over_every_time(self):
        path = temporary_database(self)
        turns = scheduler._Turns(f"{path}-lock")
        self.addCleanup(turns.close)
        for attempt in range(100):  # each time: busy, then free while a writer waits
            with self.subTest(attempt=attempt):
                release = hold_writers_lock(self, path)
                taken = queue.Queue()
                taking = threading.Thread(target=lambda: taken.put(turns.take(10)))
                taking.start()
                wait_until(lambda: turns.state == turns.WANTED, what="the writer to wait")
                release()
                self.assertTrue(taken.get(timeout=10))
                taking.join()
                turns.give_back()

    def test_waiting_for_another_process_has_a_deadline(self):
        store = scheduler.SQLiteStore(made_database(self), busy_timeout=0.2)
        self.addCleanup(store.close)
        release = hold_writers_lock(self, store.path)
        outcome = queue.Queue()
        booking = threading.Thread(target=lambda: outcome.put(store_outcome(store)))
        booking.start()
        booking.join(timeout=10)
        self.assertFalse(booking.is_alive(), "the booking waited for the lock with no deadline")
        self.assertIn("busy", outcome.get_nowait())
        release()
        self.assertEqual(store.book(appointment()), appointment())  # the lock is taken again
        self.assertEqual(store.count(), 1)

    def test_a_failure_on_the_way_to_the_lock_is_answered_and_writes_go_on(self):
        store = scheduler.SQLiteStore(made_database(self), busy_timeout=10)
        self.addCleanup(store.close)
        release = hold_writers_lock(self, store.path)
        with mock.patch.object(scheduler.threading, "Thread",
                               side_effect=RuntimeError("can't start new thread")):
            self.assertIn("can't start new thread", store_outcome(store))  # not raised past
        release()
        later = threading.Thread(target=store.book, args=(appointment(),))
        later.start()
        later.join(timeout=10)
        self.assertFalse(later.is_alive(), "the line of writes is stuck behind the failure")
        self.assertEqual((store.count(), store_sample(store, "scheduler_sqlite_writes_queued")),
                         (1, 0))

    def test_the_lock_is_handed_over_as_soon_as_it_is_free(self):
        store = scheduler.SQLiteStore(made_database(self), busy_timeout=30)
        self.addCleanup(store.close)
        release = hold_writers_lock(self, store.path)
        booking = threading.Thread(target=store.book, args=(appointment(),))
        booking.start()
        wait_until(lambda: store_sample(store, "scheduler_sqlite_writes_queued") == 1,
                   what="the booking to wait")
        release()
        booking.join(timeout=10)  # long before the 30 s deadline
        self.assertFalse(booking.is_alive())
        self.assertEqual(store.count(), 1)


# --- The PostgreSQL protocol: URIs, messages as bytes, authentication, states ---------


class PostgresURITest(unittest.TestCase):
    """parse_postgres_uri(), as libpq's own table of URIs (src/interfaces/libpq/t/
    001_uri.pl) reads them, and this service's parameters."""

    ENV = {"PGUSER": "env-user"}  # so that the operating system's user plays no part
    SOCKETS = scheduler._default_socket_directory()

    READ = [  # (URI, environment, what the PGSettings holds)
        ("postgresql://uri-user:secret@host:12345/db", ENV,
         {"hosts": (("host", 12345),), "user": "uri-user", "password": "secret",
          "database": "db", "sslmode": "prefer", "sslrootcert": None, "connect_timeout": None,
          "target_session_attrs": "any", "application_name": "scheduler"}),
        ("postgresql://host/db", ENV, {"hosts": (("host", 5432),), "user": "env-user",
                                       "password": None, "database": "db"}),
        ("postgres://host", ENV, {"hosts": (("host", 5432),), "database": "env-user"}),
        ("postgres://host:/", ENV, {"hosts": (("host", 5432),)}),
        ("postgres://@host", ENV, {"hosts": (("host", 5432),), "user": "env-user"}),
        ("postgresql://%68ost/", ENV, {"hosts": (("host", 5432),)}),
        ("postgresql://[::1]:12345/db", ENV, {"hosts": (("::1", 12345),)}),
        ("postgresql://[2001:db8::1234]/", ENV, {"hosts": (("2001:db8::1234", 5432),)}),
        ("postgresql://h1:5433,h2,[::1]:5434/db", ENV,
         {"hosts": (("h1", 5433), ("h2", 5432), ("::1", 5434))}),
        ("postgresql://h1,h2/db?port=7", ENV, {"hosts": (("h1", 7), ("h2", 7))}),
        ("postgresql://h1,h2/db?port=7,8", ENV, {"hosts": (("h1", 7), ("h2", 8))}),
        ("postgresql://host/db?user=uri-user&port=12345", ENV,
         {"hosts": (("host", 12345),), "user": "uri-user"}),
        ("postgresql://host/db?u%73er=someotheruser", ENV, {"user": "someotheruser"}),
        ("postgresql://host?", ENV, {"hosts": (("host", 5432),), "database": "env-user"}),
        ("postgres://?host=/path/to/socket/dir", ENV, {"hosts": (("/path/to/socket/dir", 5432),)}),
        ("postgres://%2Fvar%2Flib%2Fpostgresql/dbname", ENV,
         {"hosts": (("/var/lib/postgresql", 5432),), "database": "dbname"}),
        ("postgres://otheruser@:12345/db?host=/path/to/socket", ENV,
         {"hosts": (("/path/to/socket", 12345),), "user": "otheruser"}),
        ("postgresql:///db", ENV, {"hosts": ((SOCKETS, 5432),), "database": "db"}),
        ("postgresql://", ENV, {"hosts": ((SOCKETS, 5432),), "user": "env-user"}),
        ("postgresql://u:p%40ss%2Fw%3A%25@host/d%20b", ENV,
         {"user": "u", "password": "p@ss/w:%", "database": "d b"}),
        ("postgresql://u:p:with:colons@host", ENV, {"password": "p:with:colons"}),
        ("postgresql://u@host/db?sslmode=verify-full&sslrootcert=/etc/ca.crt&connect_timeout=1"
         "&target_session_attrs=read-write&application_name=my%20app", ENV,
         {"sslmode": "verify-full", "sslrootcert": "/etc/ca.crt", "connect_timeout": 2.0,
          "target_session_attrs": "read-write", "application_name": "my app"}),
        ("postgresql://host?connect_timeout=10", ENV, {"connect_timeout": 10.0}),
        ("postgresql://host?connect_timeout=0", ENV, {"connect_timeout": None}),
        ("postgresql://host?connect_timeout=-5", ENV, {"connect_timeout": None}),
        ("postgresql://host?ssl=true", ENV, {"sslmode": "require"}),
        ("postgresql://host?sslmode=disable&sslmode=require", ENV, {"sslmode": "require"}),
        ("postgresql://host?sslrootcert=system", ENV, {"sslmode": "verify-full",
                                                       "sslrootcert": "system"}),
        # The environment, as libpq reads it, for what the URI leaves out:
        ("postgresql://host/db", {**ENV, "PGPASSWORD": "from-env"}, {"password": "from-env"}),
        ("postgresql://u:from-uri@host/db", {**ENV, "PGPASSWORD": "from-env"},
         {"password": "from-uri"}),
        ("postgresql://", {"PGHOST": "envhost", "PGPORT": "6543", "PGDATABASE": "envdb",
                           "PGUSER": "envuser", "PGSSLMODE": "require",
                           "PGCONNECT_TIMEOUT": "3", "PGAPPNAME": "envapp",
                           "PGTARGETSESSIONATTRS": "read-write"},
         {"hosts": (("envhost", 6543),), "database": "envdb", "user": "envuser",
          "sslmode": "require", "connect_timeout": 3.0, "application_name": "envapp",
          "target_session_attrs": "read-write"}),
    ]

    REFUSED = [  # (URI, words in the ValueError)
        ("postgre://", "starts with postgresql://"),
        ("postgres://[::1", "no closing ']'"),
        ("postgres://[]", "empty"),
        ("postgres://[::1]z", "unexpected 'z'"),
        ("postgresql://host?zzz", "'zzz' has no '='"),
        ("postgresql://host?value1&value2", "'value1' has no '='"),
        ("postgresql://host?key=key=value", "second '='"),
        ("postgres://host?dbname=%XXfoo", "two hex digits"),
        ("postgresql://a%00b", "%00"),
        ("postgresql://%zz", "two hex digits"),
        ("postgresql://%1", "two hex digits"),
        ("postgresql://%", "two hex digits"),
        ("postgresql://host/%C3%28", "not percent-encoded UTF-8"),
        ("postgresql://host?uzer=x", "unknown parameter 'uzer'"),
        ("postgresql://host?sslcert=/c", "'sslcert' is not supported"),
        ("postgresql://host:99999/", "not a port number"),
        ("postgresql://host:0/", "not a port number"),
        ("postgresql://host:abc/", "not a port number"),
        ("postgresql://h1,h2/db?port=1,2,3", "3 ports were given for 2 hosts"),
        ("postgresql://host?sslmode=bogus", "sslmode 'bogus' is not one of"),
        ("postgresql://host?sslmode=require&sslrootcert=system", "use verify-full"),
        ("postgresql://host?connect_timeout=1.5", "whole number of seconds"),
        ("postgresql://host?target_session_attrs=standby", "not supported by this service"),
        ("postgresql://host?target_session_attrs=bogus", "unknown"),
    ]

    def test_uris_read_as_libpq_reads_them(self):
        for uri, environ, expected in self.READ:
            with self.subTest(uri=uri):
                self.assertTrue(scheduler.is_postgres_uri(uri))
                settings = scheduler.parse_postgres_uri(uri, environ)
                self.assertEqual({name: getattr(settings, name) for name in expected}, expected)

    def test_bad_uris_are_refused_saying_why(self):
        for uri, words in self.REFUSED:
            with self.subTest(uri=uri):
                with self.assertRaises(ValueError) as refused:
                    scheduler.parse_postgres_uri(uri, self.ENV)
                self.assertIn(words, str(refused.exception))
                self.assertIn("PostgreSQL URI", str(refused.exception))

    def test_other_db_values_are_not_uris(self):
        for text in ("appointments.db", "/var/lib/db.sqlite", "postgresql:/x", "mysql://h/d",
                     "PostgreSQL://host/db", ""):
            self.assertFalse(scheduler.is_postgres_uri(text), text)

    def test_the_password_is_never_in_an_error(self):
        """Nor half of it: where a password holds an unencoded "@" or "/", libpq reads
        the rest as hosts and ports, and its errors quote them."""
        for uri in ("postgresql://u:Zq9%zzXk7@host/db", "postgresql://u:Zq9/Xk7@host:5432/db",
                    "postgresql://u:Zq9@Xk7@host/db",
                    "postgresql://u:Zq9?Xk7@host:x/db", "postgresql://u@host/db?password=Zq9%Xk7",
                    "postgresql://u:Zq9Xk7@host/db?sslmode=Zq9Xk7x",
                    "postgresql://u:Zq9/Xk7@host?uzer=1"):
            with self.subTest(uri=uri):
                with self.assertRaises(ValueError) as refused:
                    scheduler.parse_postgres_uri(uri, self.ENV)
                message = str(refused.exception)
                self.assertNotIn("Zq9", message.replace("sslmode 'Zq9Xk7x'", ""))
                self.assertNotIn("Xk7", message.replace("sslmode 'Zq9Xk7x'", ""))

    def test_the_settings_show_no_password(self):
        settings = scheduler.parse_postgres_uri(
            "postgresql://alice:Zq9Xk7@db1:5433,[::1]/app?sslmode=require&connect_timeout=5",
            self.ENV)
        self.assertEqual(settings.password, "Zq9Xk7")
        self.assertEqual(settings.redacted_uri, "postgresql://alice@db1:5433,[::1]:5432/app"
                                                "?sslmode=require&connect_timeout=5")
        for shown in (repr(settings), str(settings), settings.redacted_uri, f"{settings}"):
            self.assertNotIn("Zq9Xk7", shown)
        # The redacted URI reads back as the same settings, but the password.
        self.assertEqual(scheduler.parse_postgres_uri(settings.redacted_uri, {}),
                         settings._replace(password=None))


def backend(kind: bytes, body: bytes = b"") -> bytes:
    """A backend message: its type, its length, its body."""
    return kind + struct.pack("!i", len(body) + 4) + body


def error_message(code: str, message: str, severity: str = "ERROR", **fields) -> bytes:
    """An ErrorResponse (or, with kind N, a NoticeResponse)'s body."""
    return b"".join(f"{letter}{value}\0".encode() for letter, value in (
        ("S", severity), ("V", severity), ("C", code), ("M", message), *fields.items())) + b"\0"


def row_description(*columns: Tuple[str, int]) -> bytes:
    return backend(b"T", struct.pack("!h", len(columns)) + b"".join(
        name.encode() + b"\0" + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0)
        for name, oid in columns))


def data_row(*values: Optional[bytes]) -> bytes:
    return backend(b"D", struct.pack("!h", len(values)) + b"".join(
        struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
        for value in values))


def ready(status: bytes = b"I") -> bytes:
    return backend(b"Z", status)


def authentication(code: int, data: bytes = b"") -> bytes:
    return backend(b"R", struct.pack("!i", code) + data)


def complete(tag: str) -> bytes:
    return backend(b"C", tag.encode() + b"\0")


# What a server sends a client it lets in by trust: Ok, its parameters, its key, ready.
STARTED = (authentication(0) + backend(b"S", b"server_version\x0015.4\0")
           + backend(b"S", b"in_hot_standby\0off\0") + backend(b"K", struct.pack("!ii", 4242, 7))
           + ready())
PARSED, BOUND, NO_DATA = backend(b"1"), backend(b"2"), backend(b"n")


class PostgresMessageTest(unittest.TestCase):
    """The protocol's messages as tables of bytes: each built, each read, malformed
    ones refused (PostgreSQL's documentation, "Message Formats")."""

    BUILT = [  # (name, the bytes built, the bytes expected)
        ("SSLRequest", scheduler.SSL_REQUEST, b"\0\0\0\x08\x04\xd2\x16\x2f"),
        ("CancelRequest", scheduler.cancel_request_message(1234, -5),  # the key as sent
         b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\x04\xd2\xff\xff\xff\xfb"),
        ("StartupMessage", scheduler.startup_message({"user": "alice", "database": "app"}),
         b"\0\0\0\x21\0\x03\0\0user\0alice\0database\0app\0\0"),
        ("PasswordMessage", scheduler.password_message(b"pw"), b"p\0\0\0\x07pw\0"),
        ("SASLInitialResponse", scheduler.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"),
         b"p\0\0\0\x1fSCRAM-SHA-256\0\0\0\0\x09n,,n=,r=x"),
        ("SASLResponse", scheduler.sasl_response(b"c=biws"), b"p\0\0\0\x0ac=biws"),
        ("Parse", scheduler.parse_message("s1", "SELECT $1"),
         b"P\0\0\0\x13s1\0SELECT $1\0\0\0"),
        ("Bind, text values", scheduler.bind_message("s1", ("a", 1, None, True, 1.5)),
         b"B\0\0\0\x28\0s1\0\0\0\0\x05\0\0\0\x01a\0\0\0\x011\xff\xff\xff\xff\0\0\0\x01t"
         b"\0\0\0\x031.5\0\0"),
        ("Bind, bytes in binary", scheduler.bind_message("s2", (b"\0\xff", "é")),
         b"B\0\0\0\x1e\0s2\0\0\x02\0\x01\0\0\0\x02\0\0\0\x02\0\xff\0\0\0\x02\xc3\xa9\0\0"),
        ("Bind, none", scheduler.bind_message("s3", ()), b"B\0\0\0\x0e\0s3\0\0\0\0\0\0\0"),
        ("Bind, False, a big int, -0.0", scheduler.bind_message("s", (False, -2**63, -0.0)),
         b"B\0\0\0\x32\0s\0\0\0\0\x03\0\0\0\x01f\0\0\0\x14-9223372036854775808"
         b"\0\0\0\x04-0.0\0\0"),
        ("Describe the portal", scheduler.DESCRIBE_PORTAL, b"D\0\0\0\x06P\0"),
        ("Execute", scheduler.EXECUTE, b"E\0\0\0\x09\0\0\0\0\0"),
        ("Sync", scheduler.SYNC, b"S\0\0\0\x04"),
        ("Close a statement", scheduler.close_statement_message("s1"), b"C\0\0\0\x08Ss1\0"),
        ("Query", scheduler.query_message("SELECT 1"), b"Q\0\0\0\x0dSELECT 1\0"),
        ("Terminate", scheduler.TERMINATE, b"X\0\0\0\x04"),
    ]

    def test_messages_built(self):
        for name, built, expected in self.BUILT:
            with self.subTest(name):
                self.assertEqual(built, expected)

    def test_what_cannot_be_sent_is_refused_before_it_is(self):
        for call, error in (
                (lambda: scheduler.parse_message("s", "SELECT '\0'"), ValueError),
                (lambda: scheduler.query_message("SELECT '\0'"), ValueError),
                (lambda: scheduler.password_message(b"p\0w"), ValueError),
                (lambda: scheduler.startup_message({"user": "a\0b"}), ValueError),
                (lambda: scheduler.bind_message("s", (object(),)), TypeError),
                (lambda: scheduler.bind_message("s", ([1],)), TypeError),
                (lambda: scheduler.bind_message("s", (None,) * 65536), ValueError)):
            with self.assertRaises(error):
                call()

    READ = [  # (function, body, what it returns)
        (scheduler.parse_error_fields,
         b"SERROR\0VERROR\0C23505\0Mduplicate key\0nappointments_pkey\0\0",
         {"S": "ERROR", "V": "ERROR", "C": "23505", "M": "duplicate key",
          "n": "appointments_pkey"}),
        (scheduler.parse_error_fields, b"\0", {}),
        (scheduler.parse_error_fields, b"Mnot UTF-8: \xff\0\0", {"M": "not UTF-8: \ufffd"}),
        (scheduler.parse_authentication, b"\0\0\0\0", (0, b"")),
        (scheduler.parse_authentication, b"\0\0\0\x05\x01\x02\x03\x04", (5, b"\x01\x02\x03\x04")),
        (scheduler.parse_authentication, b"\0\0\0\x0bdata", (11, b"data")),
        (scheduler.parse_sasl_mechanisms, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
         ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
        (scheduler.parse_parameter_status, b"in_hot_standby\0off\0", ("in_hot_standby", "off")),
        (scheduler.parse_parameter_status, b"application_name\0\0", ("application_name", "")),
        (scheduler.parse_backend_key_data, b"\0\0\x10\x92\xff\xff\xff\xfe", (4242, -2)),
        (scheduler.parse_ready_for_query, b"I", "I"),
        (scheduler.parse_ready_for_query, b"T", "T"),
        (scheduler.parse_ready_for_query, b"E", "E"),
        (scheduler.parse_command_complete, b"INSERT 0 1\0", ("INSERT 0 1", 1)),
        (scheduler.parse_command_complete, b"UPDATE 12\0", ("UPDATE 12", 12)),
        (scheduler.parse_command_complete, b"DELETE 0\0", ("DELETE 0", 0)),
        (scheduler.parse_command_complete, b"SELECT 3\0", ("SELECT 3", 3)),
        (scheduler.parse_command_complete, b"BEGIN\0", ("BEGIN", -1)),
        (scheduler.parse_command_complete, b"CREATE TABLE\0", ("CREATE TABLE", -1)),
        (scheduler.parse_row_description, row_description(("a", 23), ("é", 25))[5:],
         (("a", 23), ("é", 25))),
        (scheduler.parse_row_description, b"\0\0", ()),
    ]

    MALFORMED = [  # (function, body, words in the PGProtocolError)
        (scheduler.parse_error_fields, b"SERROR", "not NUL-terminated"),
        (scheduler.parse_error_fields, b"SERROR\0", "empty field"),
        (scheduler.parse_error_fields, b"SERROR\0\0\0", "no code"),
        (scheduler.parse_authentication, b"\0\0", "too short"),
        (scheduler.parse_authentication, b"\0\0\0\0x", "1 bytes after"),
        (scheduler.parse_authentication, b"\0\0\0\x05\x01\x02", "2 bytes after"),
        (scheduler.parse_sasl_mechanisms, b"SCRAM-SHA-256\0", "empty name"),
        (scheduler.parse_sasl_mechanisms, b"SCRAM-SHA-256", "not NUL-terminated"),
        (scheduler.parse_parameter_status, b"name\0", "a name and a value"),
        (scheduler.parse_parameter_status, b"a\0b\0c\0", "a name and a value"),
        (scheduler.parse_backend_key_data, b"\0\0\0\x01", "not 8 bytes"),
        (scheduler.parse_ready_for_query, b"X", "transaction status"),
        (scheduler.parse_ready_for_query, b"", "transaction status"),
        (scheduler.parse_ready_for_query, b"II", "transaction status"),
        (scheduler.parse_command_complete, b"INSERT 0 1", "not NUL-terminated"),
        (scheduler.parse_row_description, b"\0", "too short"),
        (scheduler.parse_row_description, b"\0\x01a\0\0\0", "too short for its columns"),
        (scheduler.parse_row_description, b"\0\x01a", "too short for its columns"),
        (scheduler.parse_row_description, row_description(("a", 23))[5:] + b"x", "longer"),
    ]

    def test_messages_read(self):
        for parse, body, expected in self.READ:
            with self.subTest(parse.__name__, body=body):
                self.assertEqual(parse(body), expected)

    def test_malformed_messages_are_refused(self):
        for parse, body, words in self.MALFORMED:
            with self.subTest(parse.__name__, body=body):
                with self.assertRaises(scheduler.PGProtocolError) as refused:
                    parse(body)
                self.assertIn(words, str(refused.exception))

    def test_messages_framed_whole_or_not_at_all(self):
        message = ready(b"T")
        for size in range(len(message)):  # a message cut short is not a message yet
            self.assertIsNone(scheduler.next_message(message[:size]))
        self.assertEqual(scheduler.next_message(message), (ord("Z"), 5, 6))
        self.assertEqual(scheduler.next_message(b"xx" + message + PARSED, 2), (ord("Z"), 7, 8))
        self.assertEqual(scheduler.next_message(PARSED), (ord("1"), 5, 5))
        for claimed in (b"\0\0\0\x03", b"\xff\xff\xff\xff", b"\x10\0\0\0"):  # under 4; huge
            with self.assertRaisesRegex(scheduler.PGProtocolError, "claims a length"):
                scheduler.next_message(b"D" + claimed)

    def test_rows_decoded_by_type(self):
        D = scheduler.PG_DECODERS
        columns = (25, 1043, 19, 1042, 21, 23, 20, 26, 700, 701, 16, 16, 17, 1082, 1700, 3802)
        values = (b"t\xc3\xa9xt", b"v", b"n", b"c ", b"-2", b"40", b"9223372036854775807", b"9",
                  b"1.5", b"-Infinity", b"t", b"f", b"\\x00ff", b"2026-11-25", b"1.10",
                  b'{"a": 1}')
        data = data_row(*values) + data_row(*(None,) * len(values))
        decoders = tuple(D.get(oid, bytes.decode) for oid in columns)
        second = len(data_row(*values))
        rows = scheduler.decode_rows(data, [(68, 5, second), (68, second + 5, len(data))],
                                     decoders)
        self.assertEqual(rows, [
            ("téxt", "v", "n", "c ", -2, 40, 2**63 - 1, 9, 1.5,
             float("-inf"), True, False, b"\0\xff", "2026-11-25", "1.10", '{"a": 1}'),
            (None,) * len(values)])
        self.assertEqual([type(value) for value in rows[0]],
                         [str] * 4 + [int] * 4 + [float] * 2 + [bool] * 2 + [bytes] + [str] * 3)

    MALFORMED_ROWS = [  # (name, DataRow message, decoders, words in the PGProtocolError)
        ("a column too few", data_row(b"1"), (int, int), "not the 2 columns"),
        ("a column too many", data_row(b"1", b"2"), (int,), "not the 1 columns"),
        ("a length past the row", backend(b"D", b"\0\x01\0\0\0\x09abc"), (bytes.decode,),
         "do not fill its length"),
        ("bytes left over", backend(b"D", b"\0\x01\0\0\0\x01ab"), (bytes.decode,),
         "do not fill its length"),
        ("a length cut short", backend(b"D", b"\0\x01\0\0"), (bytes.decode,), "malformed"),
        ("an int that is not", data_row(b"x1"), (int,), "malformed"),
        ("a bool that is not", data_row(b"yes"), (scheduler.PG_DECODERS[16],), "malformed"),
        ("bytea not in hex", data_row(b"\\000"), (scheduler.PG_DECODERS[17],), "hex format"),
        ("odd hex", data_row(b"\\x0"), (scheduler.PG_DECODERS[17],), "malformed"),
    ]

    def test_malformed_rows_are_refused(self):
        for name, message, decoders, words in self.MALFORMED_ROWS:
            with self.subTest(name):
                with self.assertRaisesRegex(scheduler.PGProtocolError, words):
                    scheduler.decode_rows(message, [(68, 5, len(message))], decoders)
        with self.assertRaises(UnicodeDecodeError):  # the caller's to report: see its test
            scheduler.decode_rows(data_row(b"\xff"), [(68, 5, 12)], (bytes.decode,))

    PLACEHOLDERS = [  # (SQL with ?, SQL with $n)
        ("SELECT 1", "SELECT 1"),
        ("SELECT ?, ?", "SELECT $1, $2"),
        ("INSERT INTO t VALUES (?, '?', ?)", "INSERT INTO t VALUES ($1, '?', $2)"),
        ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', $1"),
        ("SELECT E'\\' ?', ?", "SELECT E'\\' ?', $1"),
        ('SELECT "odd ?name", ?', 'SELECT "odd ?name", $1'),
        ("SELECT ? -- why?\n, ?", "SELECT $1 -- why?\n, $2"),
        ("SELECT /* ? */ ?", "SELECT /* ? */ $1"),
        ("SELECT $$ ? $$, $q$ it's ? $q$, ?", "SELECT $$ ? $$, $q$ it's ? $q$, $1"),
        ("SELECT a$b, ? FROM t", "SELECT a$b, $1 FROM t"),
    ]

    def test_question_marks_become_numbered_placeholders(self):
        for sql, expected in self.PLACEHOLDERS:
            with self.subTest(sql):
                self.assertEqual(scheduler.numbered_placeholders(sql), expected)


class PostgresAuthenticationTest(unittest.TestCase):
    # RFC 7677 section 3: user "user", password "pencil", and these messages.
    CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

    def rfc_exchange(self) -> scheduler.ScramSHA256:
        scram = scheduler.ScramSHA256("pencil", "rOprNGfwEbeRWgbNEkqO", user="user")
        self.assertEqual(scram.client_first(), self.CLIENT_FIRST)
        self.assertEqual(scram.client_final(self.SERVER_FIRST), self.CLIENT_FINAL)
        return scram

    def test_scram_sha_256_as_rfc_7677_section_3(self):
        self.rfc_exchange().check_server_final(self.SERVER_FINAL)  # the server proved itself

    def test_the_salted_password_is_made_once_for_a_password_salt_and_count(self):
        # RFC 5802 section 3: a client MAY cache SaltedPassword. Another salt (the
        # password set again), count or password is another computation.
        first, made = self.SERVER_FIRST, []
        pbkdf2 = hashlib.pbkdf2_hmac

        def counted(*args):
            made.append(args)
            return pbkdf2(*args)

        other_salt = first.replace(b"W22ZaJ0SNY7soEsUEjb6gQ==", base64.b64encode(b"another salt"))
        with mock.patch.object(scheduler.hashlib, "pbkdf2_hmac", counted):
            scheduler._salted_password.cache_clear()
            for password, server_first, computed in (
                    ("pencil", first, 1), ("pencil", first, 1), ("pencil", other_salt, 2),
                    ("pencil", first.replace(b"i=4096", b"i=4097"), 3), ("pen", first, 4),
                    ("pencil", first, 4)):
                with self.subTest(password=password, server_first=server_first):
                    scram = scheduler.ScramSHA256(password, "rOprNGfwEbeRWgbNEkqO", user="user")
                    scram.client_final(server_first)
                    self.assertEqual(len(made), computed)
        self.rfc_exchange().check_server_final(self.SERVER_FINAL)  # the kept one is right

    def test_a_server_that_cannot_prove_it_knows_the_password_is_refused(self):
        wrong = base64.b64encode(bytes(32)).decode()
        for final, words in ((f"v={wrong}".encode(), "signature is wrong"),
                             (self.SERVER_FINAL[:-6] + b"G4=", "signature is wrong"),
                             (b"v=", "signature is wrong"), (b"", "signature is wrong"),
                             (b"v=abc", "signature is wrong"),
                             (b"e=invalid-proof", "SCRAM authentication failed: invalid-proof")):
            with self.subTest(final=final):
                scram = self.rfc_exchange()
                with self.assertRaisesRegex(scheduler.PGConnectionError, words):
                    scram.check_server_final(final)

    def test_a_malformed_first_message_is_refused(self):
        for first, words in (
                (b"r=someone-elses-nonce,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),
                (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),
                (b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "0"),
                (b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999",
                 "99999999999"),
                (b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=x", "'x'"),
                (b"r=rOprNGfwEbeRWgbNEkqOx,s=!!!,i=4096", "not base64"),
                (b"r=rOprNGfwEbeRWgbNEkqOx,i=4096", "r=...,s=...,i=..."),
                (b"m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                 "r=...,s=...,i=...")):
            with self.subTest(first=first):
                scram = scheduler.ScramSHA256("pencil", "rOprNGfwEbeRWgbNEkqO")
                with self.assertRaisesRegex(scheduler.PGProtocolError, re.escape(words)):
                    scram.client_final(first)
        with self.assertRaisesRegex(scheduler.PGProtocolError, "before the client's proof"):
            scheduler.ScramSHA256("pencil").check_server_final(self.SERVER_FINAL)

    def test_md5_password(self):
        # md5(md5("penciluser") as hex + salt) as hex, by openssl md5
        self.assertEqual(scheduler.md5_password("user", "pencil", b"\x9f\x1a\x3c\x55"),
                         b"md55dd4d3c3d44c8dc47fdf8b81766fb0d4")

    SASLPREP = [  # (text, prepared; None where SASLprep prohibits it): RFC 4013 section 3
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),
        ("\u0007", "\u0007"),  # RFC: prohibited; ASCII is left alone, as PostgreSQL does
        ("\u0627\u0031", None),  # right-to-left text must end right-to-left
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),
        ("a\u00a0b\u2003", "a b "),  # non-ASCII spaces become spaces
        ("é\u0007", None),  # a control character, with non-ASCII
        ("é\U000e0001", None),  # a tagging character
        ("pässwörd", "pässwörd"),
    ]

    def test_saslprep(self):
        for text, expected in self.SASLPREP:
            with self.subTest(text=text):
                self.assertEqual(scheduler.saslprep(text), expected)


def scripted_connection(testcase: unittest.TestCase, answers: bytes = b"", started: bool = True,
                        **settings) -> Tuple[scheduler.PGConnection, socket.socket]:
    """A PGConnection over a socket pair, and the other end, where a test plays the
    server: answers is what the server sends (before the client asks: the pair keeps
    it). started: the session already begun (STARTED, its bytes read off)."""
    client, server = socket.socketpair()
    testcase.addCleanup(server.close)
    settings = scheduler.PGSettings(**{"hosts": (("db.test", 5432),), "user": "alice",
                                       "password": "secret", "database": "app",
                                       "sslmode": "disable", **settings})
    connection = scheduler.PGConnection(client, settings, "db.test", 5432)
    testcase.addCleanup(connection.close)
    if started:
        server.sendall(STARTED)
        connection.start(time.monotonic() + 10)
        sent_by(connection, server)
    server.sendall(answers)
    return connection, server


def sent_by(connection: scheduler.PGConnection, server: socket.socket) -> bytes:
    """What the client has sent the server so far (and not yet read)."""
    server.setblocking(False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while True:
            chunk = server.recv(65536)
            if not chunk:
                break
            data += chunk
    server.setblocking(True)
    return data


def play_server(testcase: unittest.TestCase, listener: socket.socket,
                *scripts: Callable[[socket.socket], None]) -> None:
    """Accept a connection on listener for each script, one after the other, and run
    the script on it, in a thread: the test plays the server. Each connection is
    closed when its script ends."""
    listener.listen()
    testcase.addCleanup(listener.close)

    def serve():
        for script in scripts:
            sock, _ = listener.accept()
            with sock, contextlib.suppress(OSError):
                sock.settimeout(10)
                script(sock)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    testcase.addCleanup(thread.join, 10)


def receive_startup(sock: socket.socket) -> bytes:
    """A startup-phase message (StartupMessage, SSLRequest), read whole from sock."""
    data = sock.recv(4)
    while len(data) < 4 or len(data) < struct.unpack("!i", data[:4])[0]:
        data += sock.recv(65536)
    return data


STARTUP = scheduler.startup_message({"user": "alice", "database": "app",
                                     "application_name": "scheduler", **scheduler._PG_SESSION})
SERVER_FIRST = b"r=clientnonce+servernonce,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"


class PostgresStartupTest(unittest.TestCase):
    """PGConnection.start() over a socket pair, the test playing the server: what the
    client sends, and what it refuses."""

    def start(self, answers: bytes, tls: str = "no", **settings) -> Tuple[
            scheduler.PGConnection, socket.socket]:
        connection, server = scripted_connection(self, answers, started=False, **settings)
        connection.start(time.monotonic() + 10, tls)
        return connection, server

    def refused(self, answers: bytes, error=scheduler.PGConnectionError, tls: str = "no",
                **settings) -> str:
        connection, server = scripted_connection(self, answers, started=False, **settings)
        with self.assertRaises(error) as refused:
            connection.start(time.monotonic() + 10, tls)
        self.assertEqual(connection.state, "broken")
        message = str(refused.exception)
        self.assertTrue(message.startswith("db.test:5432: "), message)
        self.assertNotIn("secret", message)
        return message

    def test_trust(self):
        connection, server = self.start(STARTED)
        self.assertEqual(sent_by(connection, server), STARTUP)
        self.assertEqual((connection.state, connection.transaction_status, connection.backend_pid,
                          connection.secret_key, connection.tls), ("ready", "I", 4242, 7, False))
        self.assertEqual(connection.parameters, {"server_version": "15.4",
                                                 "in_hot_standby": "off"})

    def test_md5(self):
        connection, server = self.start(authentication(5, b"salt") + STARTED)
        self.assertEqual(sent_by(connection, server), STARTUP + scheduler.password_message(
            scheduler.md5_password("alice", "secret", b"salt")))

    def test_scram_until_the_server_signature(self):
        with mock.patch.object(scheduler, "_scram_nonce", return_value="clientnonce"):
            message = self.refused(
                authentication(10, b"SCRAM-SHA-256\0\0") + authentication(11, SERVER_FIRST)
                + authentication(12, b"v=" + base64.b64encode(bytes(32))) + STARTED)
        self.assertIn("SCRAM signature is wrong", message)
        scram = scheduler.ScramSHA256("secret", "clientnonce")
        connection, server = scripted_connection(self, started=False)
        with mock.patch.object(scheduler, "_scram_nonce", return_value="clientnonce"):
            server.sendall(authentication(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
                           + authentication(11, SERVER_FIRST))
            server.shutdown(socket.SHUT_WR)  # and hangs up before its last message
            with self.assertRaisesRegex(scheduler.PGConnectionLost, "closed the connection"):
                connection.start(time.monotonic() + 10)
        self.assertEqual(sent_by(connection, server), STARTUP + scheduler.sasl_initial_response(
            "SCRAM-SHA-256", b"n,,n=,r=clientnonce") + scheduler.sasl_response(
            scram.client_final(SERVER_FIRST)))

    REFUSED = [  # (name, what the server sends, words in the PGConnectionError)
        ("a FATAL", backend(b"E", error_message("28P01", 'password authentication failed for '
                                                         'user "alice"', "FATAL")),
         'password authentication failed for user "alice" (SQLSTATE 28P01)'),
        ("cleartext without TLS", authentication(3), "clear text over a connection without TLS"),
        ("GSSAPI", authentication(7), "GSSAPI authentication, which this service does not"),
        ("SSPI", authentication(9), "SSPI"),
        ("SASL without SCRAM-SHA-256", authentication(10, b"SCRAM-SHA-1\0\0"),
         "offers SASL mechanisms SCRAM-SHA-1"),
        ("Ok in the middle of SCRAM: the server signature unchecked",
         authentication(10, b"SCRAM-SHA-256\0\0") + authentication(11, SERVER_FIRST)
         + authentication(0), "authentication request 0 out of turn"),
        ("SCRAM's last message first", authentication(12, b"v=x"), "request 12 out of turn"),
        ("SCRAM's first message skipped", authentication(10, b"SCRAM-SHA-256\0\0")
         + authentication(12, b"v=x"), "request 12 out of turn"),
        ("a second md5 request", authentication(5, b"salt") + authentication(5, b"salt"),
         "request 5 out of turn"),
        ("an unknown request", authentication(99), "request 99 out of turn"),
        ("a DataRow", data_row(b"1"), "message 'D' during authentication"),
        ("a DataRow after Ok", authentication(0) + data_row(b"1"),
         "message 'D' after authentication"),
        ("a second Ok", authentication(0) + authentication(0), "message 'R' after"),
        ("a malformed length", b"R\0\0\0\x01", "claims a length of 1"),
        ("NegotiateProtocolVersion", backend(b"v", b"\0\0\0\0\0\0\0\0"), "protocol 3.0"),
        ("a FATAL after Ok", authentication(0) + backend(b"E", error_message(
            "53300", "sorry, too many clients already", "FATAL")), "too many clients"),
    ]

    def test_refusals(self):
        with mock.patch.object(scheduler, "_scram_nonce", return_value="clientnonce"):
            for name, answers, words in self.REFUSED:
                with self.subTest(name):
                    self.assertIn(words, self.refused(answers + STARTED))

    def test_no_password_to_give(self):
        self.assertIn("put it in the URI or in PGPASSWORD",
                      self.refused(authentication(5, b"salt"), password=None))

    def test_the_error_a_server_refuses_with(self):
        connection, server = scripted_connection(self, backend(b"E", error_message(
            "3D000", 'database "app" does not exist', "FATAL")), started=False)
        with self.assertRaises(scheduler.PGConnectionError) as refused:
            connection.start(time.monotonic() + 10)
        self.assertEqual((refused.exception.sqlstate, refused.exception.error.severity,
                          refused.exception.host, refused.exception.port),
                         ("3D000", "FATAL", "db.test", 5432))

    def test_the_answer_to_sslrequest_is_one_byte(self):
        """CVE-2021-23222: bytes after the S, before the TLS handshake, are not the
        server's (a man in the middle's), and would be read as if sent under TLS."""
        message = self.refused(b"S" + STARTED, scheduler.PGProtocolError, tls="must")
        self.assertIn("more than the one byte that answers the TLS request", message)
        self.assertIn("CVE-2021-23222", message)
        self.assertIn("does not accept TLS", self.refused(b"N", tls="must",
                                                          sslmode="require"))
        self.assertIn("answered the TLS request with b'H'", self.refused(b"HTTP/1.1 400",
                                                                       tls="must"))
        self.assertIn("with an error", self.refused(b"E", tls="must"))
        connection, server = self.start(b"N" + STARTED, tls="try")  # prefer: without TLS
        self.assertEqual(sent_by(connection, server), scheduler.SSL_REQUEST + STARTUP)
        self.assertFalse(connection.tls)

    def test_a_silent_server_is_a_timeout_by_the_deadline(self):
        connection, server = scripted_connection(self, started=False)
        started = time.monotonic()
        with self.assertRaisesRegex(scheduler.PGTimeout, "did not answer"):
            connection.start(started + 0.2)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(connection.state, "broken")

    def test_a_unix_domain_socket_has_no_tls(self):
        """As with libpq: TLS is never asked for there, whatever the sslmode."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(os.path.join(folder, ".s.PGSQL.5433"))
        sent = queue.Queue()

        def trusting(sock):
            sent.put(receive_startup(sock))
            sock.sendall(STARTED)
            sock.recv(1)

        play_server(self, listener, trusting)
        settings = scheduler.PGSettings(((folder, 5433),), "alice", database="app",
                                        sslmode="require")
        connection = scheduler.PGConnection.connect(settings, folder, 5433,
                                                    time.monotonic() + 10)
        self.addCleanup(connection.close)
        self.assertEqual((connection.state, connection.tls), ("ready", False))
        self.assertEqual(sent.get(timeout=10), STARTUP)

    def test_prefer_tries_again_without_tls_when_tls_fails(self):
        """libpq's sslmode=prefer: a failed TLS handshake, or a server that refuses
        the session over TLS, is tried once more without."""
        def failed_handshake(sock):
            self.assertEqual(receive_startup(sock), scheduler.SSL_REQUEST)
            sock.sendall(b"S")
            sock.recv(65536)  # the ClientHello
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        def trusting(sock):
            self.assertEqual(receive_startup(sock), STARTUP)
            sock.sendall(STARTED)
            sock.recv(1)

        for sslmode, scripts in (("prefer", (failed_handshake, trusting)),
                                 ("require", (failed_handshake,))):
            with self.subTest(sslmode):
                listener = socket.socket()
                listener.bind(("127.0.0.1", 0))
                play_server(self, listener, *scripts)
                settings = scheduler.PGSettings((listener.getsockname(),), "alice",
                                                database="app", sslmode=sslmode)
                connect = functools.partial(scheduler.PGConnection.connect, settings,
                                            *listener.getsockname(), time.monotonic() + 10)
                if sslmode == "require":
                    with self.assertRaisesRegex(scheduler.PGConnectionError,
                                                "the TLS handshake failed"):
                        connect()
                    continue
                connection = connect()
                self.addCleanup(connection.close)
                self.assertEqual((connection.state, connection.tls), ("ready", False))

    def test_a_connection_starts_once(self):
        connection, server = scripted_connection(self)
        with self.assertRaisesRegex(RuntimeError, r"start\(\) on a PostgreSQL connection that "
                                                  "is ready"):
            connection.start(time.monotonic() + 10)


def answers_to_a_first_query(*rows: bytes, tag: str = "SELECT 1",
                             columns=(("n", 23),)) -> bytes:
    return PARSED + BOUND + row_description(*columns) + b"".join(rows) + complete(tag) + ready()


class PostgresQueryTest(unittest.TestCase):
    """query() over a socket pair: what it sends, what it makes of the answers, and
    the answers out of turn it refuses (breaking the connection)."""

    def test_a_statement_is_prepared_once_then_bound_and_run(self):
        connection, server = scripted_connection(self, answers_to_a_first_query(data_row(b"42")))
        result = connection.query("SELECT ?::int", (42,))
        self.assertEqual(result, scheduler.Result([(42,)], 1, "SELECT 1"))
        self.assertEqual(sent_by(connection, server),
                         scheduler.parse_message("s1", "SELECT $1::int")
                         + scheduler.bind_message("s1", (42,)) + scheduler.DESCRIBE_PORTAL
                         + scheduler.EXECUTE + scheduler.SYNC)
        server.sendall(BOUND + data_row(b"7") + data_row(None) + complete("SELECT 2") + ready())
        self.assertEqual(connection.query("SELECT ?::int", (7,)).rows, [(7,), (None,)])
        self.assertEqual(sent_by(connection, server), scheduler.bind_message("s1", (7,))
                         + scheduler.EXECUTE + scheduler.SYNC)
        self.assertEqual((connection.state, connection.transaction_status), ("ready", "I"))

    def test_a_statement_without_rows(self):
        connection, server = scripted_connection(
            self, PARSED + BOUND + NO_DATA + complete("INSERT 0 1") + ready(b"T"))
        self.assertEqual(connection.query("INSERT INTO t VALUES (?)", ("a",)),
                         scheduler.Result([], 1, "INSERT 0 1"))
        self.assertEqual(connection.transaction_status, "T")

    def test_an_error_is_raised_once_the_server_is_ready_and_the_connection_goes_on(self):
        connection, server = scripted_connection(self, PARSED + BOUND + NO_DATA + backend(
            b"E", error_message("23505", "duplicate key value violates unique constraint",
                                D="Key (user_id)=(alice) already exists.", n="t_pkey"))
            + ready(b"E"))
        with self.assertRaises(scheduler.PGError) as refused:
            connection.query("INSERT INTO t VALUES (?)", ("alice",))
        error = refused.exception
        self.assertEqual((error.sqlstate, error.constraint, error.severity, str(error)),
                         ("23505", "t_pkey", "ERROR",
                          "ERROR: duplicate key value violates unique constraint"))
        self.assertNotIn("alice", str(error))  # the detail, with the row's values, is not shown
        self.assertEqual((connection.state, connection.transaction_status), ("ready", "E"))
        server.sendall(BOUND + complete("ROLLBACK") + ready())  # kept, though it failed
        self.assertEqual(connection.query("INSERT INTO t VALUES (?)", ("bob",)).tag, "ROLLBACK")

    def test_a_failed_statement_is_not_kept(self):
        connection, server = scripted_connection(self, backend(b"E", error_message(
            "42601", 'syntax error at or near "SELEC"')) + ready())
        with self.assertRaisesRegex(scheduler.PGError, "syntax error"):
            connection.query("SELEC 1")
        server.sendall(answers_to_a_first_query(data_row(b"1")))
        connection.query("SELEC 1")  # prepared again: it was never kept
        self.assertIn(scheduler.parse_message("s2", "SELEC 1"),
                      sent_by(connection, server))

    def test_statements_pipelined_in_one_round_trip(self):
        connection, server = scripted_connection(
            self, PARSED + BOUND + NO_DATA + complete("BEGIN")
            + answers_to_a_first_query(data_row(b"1"), data_row(b"2"), tag="SELECT 2")[:-6]
            + ready(b"T"))
        self.assertEqual(connection.queries((("BEGIN", ()), ("SELECT ?::int", (1,)))),
                         [scheduler.Result([], -1, "BEGIN"),
                          scheduler.Result([(1,), (2,)], 2, "SELECT 2")])
        self.assertEqual(sent_by(connection, server),  # one Sync, at the end
                         scheduler.parse_message("s1", "BEGIN")
                         + scheduler.bind_message("s1", ()) + scheduler.DESCRIBE_PORTAL
                         + scheduler.EXECUTE + scheduler.parse_message("s2", "SELECT $1::int")
                         + scheduler.bind_message("s2", (1,)) + scheduler.DESCRIBE_PORTAL
                         + scheduler.EXECUTE + scheduler.SYNC)
        self.assertEqual((connection.state, connection.transaction_status), ("ready", "T"))
        server.sendall(PARSED + BOUND + NO_DATA + complete("COMMIT") + BOUND + complete("BEGIN")
                       + ready(b"T"))
        self.assertEqual([result.tag for result in connection.queries(
            (("COMMIT", ()), ("BEGIN", ())))], ["COMMIT", "BEGIN"])
        self.assertEqual(sent_by(connection, server),  # BEGIN was kept: bound alone
                         scheduler.parse_message("s3", "COMMIT") + scheduler.bind_message("s3", ())
                         + scheduler.DESCRIBE_PORTAL + scheduler.EXECUTE
                         + scheduler.bind_message("s1", ()) + scheduler.EXECUTE + scheduler.SYNC)

    def test_the_first_failing_statement_of_a_pipeline_is_raised_and_the_rest_skipped(self):
        connection, server = scripted_connection(
            self, PARSED + BOUND + NO_DATA + complete("BEGIN") + PARSED + BOUND + NO_DATA
            + backend(b"E", error_message("23505", "duplicate key value")) + ready(b"E"))
        with self.assertRaisesRegex(scheduler.PGError, "duplicate key value"):
            connection.queries((("BEGIN", ()), ("INSERT INTO t VALUES (?)", ("a",)),
                                ("SELECT 1", ())))
        self.assertEqual((connection.state, connection.transaction_status), ("ready", "E"))
        server.sendall(answers_to_a_first_query(data_row(b"1")))
        connection.query("SELECT 1")  # skipped, so never kept: prepared now
        self.assertIn(scheduler.parse_message("s4", "SELECT 1"), sent_by(connection, server))
        connection, server = scripted_connection(  # answers that end too soon
            self, PARSED + BOUND + NO_DATA + complete("BEGIN") + ready(b"T"))
        with self.assertRaises(scheduler.PGProtocolError):
            connection.queries((("BEGIN", ()), ("SELECT 1", ())))
        self.assertTrue(connection.broken)

    def test_commit_of_a_failed_transaction_raises(self):
        connection, server = scripted_connection(
            self, PARSED + BOUND + NO_DATA + complete("ROLLBACK") + ready())
        with self.assertRaises(scheduler.PGError) as refused:
            connection.query("commit")
        self.assertEqual(refused.exception.sqlstate, "25P02")
        self.assertEqual((connection.state, connection.transaction_status), ("ready", "I"))

    def test_a_fatal_error_breaks_the_connection(self):
        connection, server = scripted_connection(self, backend(b"E", error_message(
            "57P01", "terminating connection due to administrator command", "FATAL")))
        server.shutdown(socket.SHUT_WR)
        with self.assertRaises(scheduler.PGConnectionLost) as lost:
            connection.query("SELECT 1")
        self.assertEqual(lost.exception.sqlstate, "57P01")
        self.assertIn("db.test:5432: the server ended the session: FATAL: terminating",
                      str(lost.exception))
        self.assertIs(lost.exception.ran, False)  # its first answer: the query never began
        self.assertTrue(connection.broken)
        with self.assertRaisesRegex(scheduler.PGConnectionLost, "broke earlier") as again:
            connection.query("SELECT 1")
        self.assertIs(again.exception.ran, False)

    def test_a_fatal_error_after_the_query_began_leaves_its_outcome_unknown(self):
        for name, answers in (("after BindComplete", PARSED + BOUND),
                              ("after CommandComplete", PARSED + BOUND + NO_DATA
                               + complete("INSERT 0 1"))):
            with self.subTest(name):
                connection, server = scripted_connection(self, answers + backend(
                    b"E", error_message("57P01", "terminating connection", "FATAL")))
                with self.assertRaises(scheduler.PGConnectionLost) as lost:
                    connection.query("INSERT INTO t VALUES (1)")
                self.assertIsNone(lost.exception.ran)  # it may have committed

    OUT_OF_TURN = [  # (name, what the server answers a first query with, words)
        ("a DataRow before the RowDescription", PARSED + BOUND + data_row(b"1")
         + row_description(("n", 23)) + complete("SELECT 1") + ready(), "message 'D' in answer"),
        ("no BindComplete", PARSED + row_description(("n", 23)) + complete("SELECT 0") + ready(),
         "message 'T' in answer"),
        ("ReadyForQuery before the end", PARSED + BOUND + ready(), "before the query's end"),
        ("an Authentication request", PARSED + authentication(0) + ready(), "message 'R'"),
        ("a second CommandComplete", answers_to_a_first_query()[:-6] + complete("SELECT 0")
         + ready(), "message 'C' in answer"),
        ("two errors", backend(b"E", error_message("XX000", "a")) + backend(
            b"E", error_message("XX000", "b")) + ready(), "message 'E' in answer"),
        ("rows after an error", PARSED + BOUND + row_description(("n", 23)) + backend(
            b"E", error_message("22012", "division by zero")) + data_row(b"1") + ready(),
         "message 'D' in answer"),
        ("a row of the wrong width", answers_to_a_first_query(data_row(b"1", b"2")),
         "not the 1 columns"),
        ("a malformed length", PARSED + b"2\0\0\0\x02" + ready(), "claims a length of 2"),
        ("an unknown transaction status", answers_to_a_first_query()[:-1] + b"X",
         "transaction status b'X'"),
    ]

    def test_answers_out_of_turn_break_the_connection(self):
        for name, answers, words in self.OUT_OF_TURN:
            with self.subTest(name):
                connection, server = scripted_connection(self, answers)
                with self.assertRaises(scheduler.PGProtocolError) as refused:
                    connection.query("SELECT 1")
                self.assertIn(words, str(refused.exception))
                self.assertTrue(str(refused.exception).startswith("db.test:5432: "))
                self.assertTrue(connection.broken)

    def test_what_may_arrive_at_any_time_is_taken_in_its_stride(self):
        connection, server = scripted_connection(self, PARSED + backend(
            b"N", error_message("01000", "a warning", "WARNING")) + BOUND + backend(
            b"S", b"TimeZone\0UTC\0") + row_description(("n", 23)) + data_row(b"1") + backend(
            b"A", b"\0\0\0\x01channel\0payload\0") + complete("SELECT 1") + ready())
        self.assertEqual(connection.query("SELECT 1").rows, [(1,)])
        self.assertEqual(connection.parameters["TimeZone"], "UTC")

    def test_text_that_is_not_utf_8_is_an_error_of_the_query(self):
        connection, server = scripted_connection(self, answers_to_a_first_query(
            data_row(b"\xff"), columns=(("t", 25),)))
        with self.assertRaises(scheduler.PGError) as refused:
            connection.query("SELECT t FROM t")
        self.assertEqual(refused.exception.sqlstate, "22021")
        self.assertEqual(connection.state, "ready")

    def test_the_end_of_the_connection_mid_answer_is_a_lost_connection(self):
        connection, server = scripted_connection(self, PARSED + BOUND + row_description(
            ("n", 23)) + data_row(b"1"))
        server.shutdown(socket.SHUT_WR)
        with self.assertRaisesRegex(scheduler.PGConnectionLost, "closed the connection") as lost:
            connection.query("SELECT 1")
        self.assertIsNone(lost.exception.ran)
        self.assertTrue(connection.broken)

    def test_a_silent_server_is_a_timeout_by_the_deadline(self):
        connection, server = scripted_connection(self, PARSED + BOUND)
        started = time.monotonic()
        with self.assertRaisesRegex(scheduler.PGTimeout, "did not answer"):
            connection.query("SELECT 1", deadline=started + 0.2)
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(connection.broken)
        with self.assertRaisesRegex(scheduler.PGTimeout, "deadline passed before sending"):
            scripted_connection(self)[0].query("SELECT 1", deadline=started)
        connection, server = scripted_connection(self)  # a server that reads nothing
        started = time.monotonic()
        with self.assertRaisesRegex(scheduler.PGTimeout, "took no more data"):
            connection.query("SELECT ?", ("x" * 2 ** 22,), deadline=started + 1)
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(connection.broken)

    def test_one_query_at_a_time(self):
        connection, server = scripted_connection(self)
        first = threading.Thread(target=lambda: connection.query("SELECT 1"))
        first.start()
        wait_until(lambda: connection.state == "busy", what="the first query to be sent")
        with self.assertRaisesRegex(RuntimeError, "query.. on a PostgreSQL connection that is "
                                                  "busy"):
            connection.query("SELECT 2")
        server.sendall(answers_to_a_first_query(data_row(b"1")))
        first.join(timeout=10)
        self.assertEqual(connection.state, "ready")
        connection.close()
        self.assertEqual(sent_by(connection, server)[-5:], scheduler.TERMINATE)
        with self.assertRaisesRegex(RuntimeError, "that is closed"):
            connection.query("SELECT 1")

    def test_a_bad_parameter_is_refused_before_anything_is_sent(self):
        connection, server = scripted_connection(self)
        with self.assertRaisesRegex(TypeError, "not dict"):
            connection.query("SELECT ?", ({},))
        with self.assertRaisesRegex(ValueError, "NUL"):
            connection.run_script("SELECT '\0'")
        self.assertEqual((connection.state, sent_by(connection, server)), ("ready", b""))

    def test_an_answer_left_half_read_breaks_the_connection(self):
        connection, server = scripted_connection(self, PARSED)
        with mock.patch.object(connection, "_receive", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):
                connection.query("SELECT 1")
        self.assertTrue(connection.broken)

    def test_the_oldest_statements_are_closed_past_the_cap(self):
        connection, server = scripted_connection(self)
        with mock.patch.object(scheduler, "MAX_PREPARED_STATEMENTS", 2):
            for n in (1, 2, 3):
                server.sendall(PARSED + BOUND + NO_DATA + complete("SET") + ready())
                connection.query(f"SET a.b = {n}")
            self.assertEqual(list(connection._statements), ["SET a.b = 2", "SET a.b = 3"])
            server.sendall(backend(b"3") + PARSED + BOUND + NO_DATA + complete("SET") + ready())
            connection.query("SET a.b = 4")
        self.assertTrue(sent_by(connection, server).endswith(
            scheduler.close_statement_message("s1") + scheduler.parse_message("s4", "SET a.b = 4")
            + scheduler.bind_message("s4", ()) + scheduler.DESCRIBE_PORTAL + scheduler.EXECUTE
            + scheduler.SYNC))
        self.assertEqual((connection._to_close, len(connection._statements)), (["s2"], 2))

    def test_a_script_by_the_simple_protocol(self):
        script = "CREATE TABLE t (a int, b text); SELECT * FROM t"
        connection, server = scripted_connection(self, complete("CREATE TABLE") + row_description(
            ("a", 23), ("b", 25)) + data_row(b"1", b"x") + complete("SELECT 1") + ready())
        self.assertEqual(connection.run_script(script),
                         [scheduler.Result([], -1, "CREATE TABLE"),
                          scheduler.Result([(1, "x")], 1, "SELECT 1")])
        self.assertEqual(sent_by(connection, server), scheduler.query_message(script))
        connection, server = scripted_connection(self, backend(b"I") + ready())
        self.assertEqual(connection.run_script(""), [scheduler.Result([], -1, "")])

    def test_an_idle_connection_checked_without_waiting(self):
        connection, server = scripted_connection(self, backend(b"S", b"in_hot_standby\0on\0"))
        wait_until(lambda: select.select([connection._sock], [], [], 0)[0])
        self.assertTrue(connection.check_idle())  # a parameter is news, not a fault...
        self.assertEqual(connection.parameters["in_hot_standby"], "on")
        connection, server = scripted_connection(self, backend(b"S", b"in_hot_standby\0on\0"),
                                                 target_session_attrs="read-write")
        wait_until(lambda: select.select([connection._sock], [], [], 0)[0])
        self.assertFalse(connection.check_idle())  # ...unless the session must write
        for name, answers in (
                ("a FATAL, then the end", backend(b"E", error_message(
                    "57P01", "terminating connection due to administrator command", "FATAL"))),
                ("a message out of turn", data_row(b"1")),
                ("part of a message", b"E\0\0")):
            with self.subTest(name):
                connection, server = scripted_connection(self, answers)
                server.shutdown(socket.SHUT_WR)
                wait_until(lambda: select.select([connection._sock], [], [], 0)[0])
                self.assertFalse(connection.check_idle())
                self.assertTrue(connection.broken)
        connection, server = scripted_connection(self)
        self.assertTrue(connection.check_idle())
        server.close()
        self.assertFalse(connection.check_idle())  # closed: end of file



def on_ports(uri: str, *ports: int) -> str:
    """uri with its hosts replaced by 127.0.0.1 at each of ports, tried in that order."""
    return re.sub(r"@[^/]*/", "@" + ",".join(f"127.0.0.1:{port}" for port in ports) + "/", uri,
                  count=1)


def pg_connection(testcase: unittest.TestCase, uri: str, seconds: float = 10,
                  environ: Optional[dict] = None) -> scheduler.PGConnection:
    """pg_connect() by uri, within seconds; closed when the test ends."""
    connection = scheduler.pg_connect(scheduler.parse_postgres_uri(uri, environ or {}),
                                      time.monotonic() + seconds)
    testcase.addCleanup(connection.close)
    return connection


@requires_postgres
class PostgresConnectionTest(unittest.TestCase):
    """PGConnection and pg_connect() against a real PostgreSQL: each way to log in,
    and each refusal; text and types; errors; deadlines."""

    def setUp(self):
        self.cluster = PostgresCluster.shared()

    def refusal(self, uri: str, seconds: float = 10) -> scheduler.PGConnectionError:
        started = time.monotonic()
        with self.assertRaises(scheduler.PGConnectionError) as refused:
            pg_connection(self, uri, seconds)
        self.assertLess(time.monotonic() - started, seconds + 2)
        for password in PostgresCluster.PASSWORDS.values():
            self.assertNotIn(str(password), str(refused.exception))
        return refused.exception

    def test_each_way_to_log_in(self):
        cluster = self.cluster
        ways = [("scheduler", "disable", False), ("md5_user", "disable", False),
                ("trust_user", "disable", False)]
        if cluster.ca_file:
            ways += [("scheduler", "require", True), ("plain_user", "require", True),
                     ("md5_user", "prefer", True)]
        for user, sslmode, tls in ways:
            with self.subTest(user=user, sslmode=sslmode):
                connection = pg_connection(self, cluster.uri(user, sslmode=sslmode))
                self.assertEqual(connection.tls, tls)
                self.assertEqual(connection.query("SELECT current_user, ?::int + 1", (41,)).rows,
                                 [(user, 42)])
                self.assertEqual(connection.parameters["client_encoding"], "UTF8")
                self.assertIn("in_hot_standby", connection.parameters)  # PostgreSQL 14 and later
                self.assertGreater(connection.backend_pid, 0)

    def test_refusals_name_the_host_and_the_reason(self):
        cluster, here = self.cluster, f"127.0.0.1:{self.cluster.port}: "
        wrong = self.refusal(cluster.uri(password="wrong-password-81", sslmode="disable"))
        self.assertEqual(wrong.sqlstate, "28P01")
        self.assertEqual(str(wrong), here + 'the server refused the connection: FATAL: password '
                                            'authentication failed for user "scheduler" '
                                            "(SQLSTATE 28P01)")
        self.assertNotIn("wrong-password-81", str(wrong))
        missing = self.refusal(cluster.uri(database="no_such_database"))
        self.assertEqual(missing.sqlstate, "3D000")
        self.assertIn('database "no_such_database" does not exist', str(missing))
        nothing = self.refusal(f"postgresql://scheduler:pw@127.0.0.1:{free_port()}/scheduler")
        self.assertRegex(str(nothing), r"^127\.0\.0\.1:\d+: connection refused$")
        rejected = self.refusal(cluster.uri("plain_user", sslmode="disable"))
        self.assertEqual(rejected.sqlstate, "28000")  # pg_hba.conf: not without TLS
        self.assertIn("asks for a password and none was given",
                      str(self.refusal(cluster.uri(password=None))))

    @requires_tls
    def test_tls_as_sslmode_says(self):
        cluster = self.cluster
        for host in ("127.0.0.1", "localhost"):  # the certificate names both
            uri = cluster.uri(sslmode="verify-full", sslrootcert=cluster.ca_file).replace(
                "@127.0.0.1:", f"@{host}:")
            self.assertTrue(pg_connection(self, uri).tls)
        for sslmode in ("verify-ca", "verify-full", "require"):  # require: as libpq, with a CA
            with self.subTest(sslmode):
                other = self.refusal(cluster.uri(sslmode=sslmode,
                                                 sslrootcert=cluster.other_ca_file))
                self.assertIn(f"the server's certificate does not verify (sslmode={sslmode})",
                              str(other))
        self.assertIn("cannot be read", str(self.refusal(cluster.uri(
            sslmode="verify-full", sslrootcert="/no/such/ca.crt"))))
        for sslmode, tls in (("require", True), ("prefer", True), ("allow", False),
                             ("disable", False)):
            with self.subTest(sslmode):
                self.assertEqual(pg_connection(self, cluster.uri(sslmode=sslmode)).tls, tls)
        # allow: refused without TLS (pg_hba.conf), plain_user is let in with it
        self.assertTrue(pg_connection(self, cluster.uri("plain_user", sslmode="allow")).tls)

    @requires_tls
    def test_tls_refused_by_a_server_with_ssl_off(self):
        cluster = self.cluster
        cluster.sql("ALTER SYSTEM SET ssl = off")  # (not in a transaction: one at a time)
        cluster.sql("SELECT pg_reload_conf()")
        self.addCleanup(wait_until, lambda: ssl_request(cluster.port, 10) == b"S")
        self.addCleanup(cluster.sql, "SELECT pg_reload_conf()")
        self.addCleanup(cluster.sql, "ALTER SYSTEM RESET ssl")
        wait_until(lambda: ssl_request(cluster.port, 10) == b"N", what="ssl off")
        refused = self.refusal(cluster.uri(sslmode="require"))
        self.assertIn("does not accept TLS (its ssl is off), and sslmode=require requires it",
                      str(refused))
        self.assertFalse(pg_connection(self, cluster.uri(sslmode="prefer")).tls)

    def test_a_frozen_server_is_a_timeout_by_the_deadline(self):
        cluster = self.cluster
        connection = pg_connection(self, cluster.uri(sslmode="disable"))
        os.kill(connection.backend_pid, signal.SIGSTOP)  # the session's own process

        def resume():  # unless thawing the cluster has, and it has ended
            with contextlib.suppress(ProcessLookupError):
                os.kill(connection.backend_pid, signal.SIGCONT)
        self.addCleanup(resume)
        started = time.monotonic()
        with self.assertRaisesRegex(scheduler.PGTimeout, "did not answer"):
            connection.query("SELECT 1", deadline=started + 0.3)
        self.assertLess(time.monotonic() - started, 3)
        self.assertTrue(connection.broken)
        cluster.freeze()  # all of it: the kernel accepts connections, nothing answers
        self.addCleanup(cluster.thaw)
        timeout = self.refusal(cluster.uri(), seconds=0.3)
        self.assertIsInstance(timeout, scheduler.PGTimeout)

    def test_each_host_gets_connect_timeout(self):
        """A URI's connect_timeout is 2 s at least (libpq's rule: PostgresURITest); set
        here to 0.3 s, to be quick."""
        silent = socket.socket()  # listens, never answers: a frozen server
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        settings = scheduler.parse_postgres_uri(on_ports(
            self.cluster.uri(sslmode="disable"), silent.getsockname()[1], self.cluster.port), {})
        connection = scheduler.pg_connect(settings._replace(connect_timeout=0.3),
                                          time.monotonic() + 30)
        self.addCleanup(connection.close)
        self.assertEqual(connection.port, self.cluster.port)

    def test_several_hosts_tried_in_order_each_failure_told(self):
        dead, port = free_port(), self.cluster.port
        self.assertEqual(pg_connection(self, on_ports(self.cluster.uri(), dead, port)).port, port)
        refused = self.refusal(on_ports(self.cluster.uri(database="no_such_database"), dead,
                                        port))
        self.assertIn(f"127.0.0.1:{dead}: connection refused; 127.0.0.1:{self.cluster.port}: "
                      "the server refused the connection: FATAL: database", str(refused))

    TEXTS = ["it's", 'say "hi"', "back\\slash\\", "$1", "?", "$$ $q$", "emoji 🎉👩‍💻",
             "e\u0301 (combining) é", "ﬁ", "\u202etext", "tab\tnew\nline", "", " ", "x" * 10000,
             "%s %d {}", "null", "\\x00", "\\N"]

    def test_text_round_trips_exactly(self):
        connection = pg_connection(self, self.cluster.uri())
        for text in self.TEXTS:
            with self.subTest(text=text[:40]):
                self.assertEqual(connection.query("SELECT ?::text, length(?::text)",
                                                  (text, text)).rows, [(text, len(text))])
        connection.query("CREATE TEMP TABLE notes (n int PRIMARY KEY, note text NOT NULL)")
        for n, text in enumerate(self.TEXTS):
            connection.query("INSERT INTO notes VALUES (?, ?)", (n, text))
        self.assertEqual(connection.query("SELECT note FROM notes ORDER BY n").rows,
                         [(text,) for text in self.TEXTS])
        with self.assertRaises(scheduler.PGError) as refused:  # NUL: text cannot hold it
            connection.query("SELECT ?::text", ("a\0b",))
        self.assertEqual(refused.exception.sqlstate, "22021")
        self.assertEqual(connection.query("SELECT 1").rows, [(1,)])

    def test_types_round_trip(self):
        connection = pg_connection(self, self.cluster.uri())
        values = (None, True, False, 0, -2**63, 2**63 - 1, 1.5, float("inf"), -0.0,
                  b"\0\x01\xff" * 100, b"", "tëxt")
        casts = ("int", "bool", "bool", "int2", "int8", "int8", "float8", "float8", "float4",
                 "bytea", "bytea", "varchar")
        sql = "SELECT " + ", ".join(f"?::{cast}" for cast in casts)
        (row,) = connection.query(sql, values).rows
        self.assertEqual(row, values)
        self.assertEqual([type(value) for value in row], [type(value) for value in values])
        self.assertEqual(connection.query(
            "SELECT 1.10::numeric, DATE '2026-11-25', 'NaN'::float8 <> 'NaN'::float8, "
            "'{1,2}'::int[], 'x'::char(3), 42::oid").rows,
            [("1.10", "2026-11-25", False, "{1,2}", "x  ", 42)])

    def test_errors_leave_the_connection_usable(self):
        connection = pg_connection(self, self.cluster.uri())
        connection.query("CREATE TEMP TABLE t (k text CONSTRAINT t_key PRIMARY KEY)")
        self.assertEqual(connection.query("INSERT INTO t VALUES (?)", ("a",)).rowcount, 1)
        with self.assertRaises(scheduler.PGError) as refused:
            connection.query("INSERT INTO t VALUES (?)", ("a",))
        self.assertEqual((refused.exception.sqlstate, refused.exception.constraint),
                         ("23505", "t_key"))
        self.assertNotIn("(a)", str(refused.exception))  # the detail quotes the row
        self.assertIn("(k)=(a)", refused.exception.fields["D"])
        connection.query("BEGIN")
        self.assertEqual(connection.transaction_status, "T")
        with self.assertRaisesRegex(scheduler.PGError, "division by zero"):
            connection.query("SELECT 1 / ?::int", (0,))
        self.assertEqual(connection.transaction_status, "E")
        with self.assertRaises(scheduler.PGError) as aborted:
            connection.query("SELECT 1")
        self.assertEqual(aborted.exception.sqlstate, "25P02")
        with self.assertRaises(scheduler.PGError) as commit:  # answered ROLLBACK, not an error
            connection.query("COMMIT")
        self.assertEqual(commit.exception.sqlstate, "25P02")
        self.assertEqual(connection.transaction_status, "I")
        self.assertEqual(connection.query("SELECT count(*) FROM t").rows, [(1,)])
        self.assertEqual(connection.query("UPDATE t SET k = k || ?", ("!",)),
                         scheduler.Result([], 1, "UPDATE 1"))

    def test_a_statement_whose_table_changed_is_prepared_again(self):
        connection = pg_connection(self, self.cluster.uri())
        connection.query("CREATE TEMP TABLE t (a int)")
        connection.query("INSERT INTO t VALUES (1)")
        self.assertEqual(connection.query("SELECT * FROM t").rows, [(1,)])
        connection.query("ALTER TABLE t ADD COLUMN b text DEFAULT 'x'")
        self.assertEqual(connection.query("SELECT * FROM t").rows, [(1, "x")])  # 0A000, retried
        connection.query("BEGIN")
        connection.query("ALTER TABLE t ADD COLUMN c int DEFAULT 2")
        with self.assertRaises(scheduler.PGError) as changed:  # not retried in a transaction
            connection.query("SELECT * FROM t")
        self.assertEqual(changed.exception.sqlstate, "0A000")
        connection.query("ROLLBACK")
        self.assertEqual(connection.query("SELECT * FROM t").rows, [(1, "x")])

    def test_prepared_statements_are_capped(self):
        connection = pg_connection(self, self.cluster.uri())
        with mock.patch.object(scheduler, "MAX_PREPARED_STATEMENTS", 3):
            for n in range(6):
                self.assertEqual(connection.query(f"SELECT {n}").rows, [(n,)])
            counted = connection.query("SELECT count(*) FROM pg_prepared_statements").rows
            self.assertEqual(counted, [(4,)])  # 3 kept; the 4th closed with the next query
            self.assertEqual(connection.query("SELECT count(*) FROM pg_prepared_statements").rows,
                             [(3,)])

    def test_a_script_of_several_statements(self):
        connection = pg_connection(self, self.cluster.uri())
        results = connection.run_script("CREATE TEMP TABLE s (a int); INSERT INTO s VALUES (1), "
                                        "(2); SELECT sum(a) FROM s")
        self.assertEqual([(result.tag, result.rows) for result in results],
                         [("CREATE TABLE", []), ("INSERT 0 2", []), ("SELECT 1", [(3,)])])
        with self.assertRaisesRegex(scheduler.PGError, 'relation "nowhere" does not exist'):
            connection.run_script("SELECT 1; SELECT * FROM nowhere")
        self.assertEqual(connection.transaction_status, "I")

    def test_a_password_prepared_by_saslprep(self):
        """PostgreSQL stores a SCRAM password after SASLprep (RFC 4013): written with
        U+2168 (ROMAN NUMERAL NINE), it is the password "IX" too."""
        cluster, role = self.cluster, f"role_{os.getpid()}_sasl"
        cluster.sql(f"CREATE ROLE {role} LOGIN PASSWORD 'p\u2168\u00ad-é'")
        self.addCleanup(cluster.sql, f"DROP ROLE {role}")
        for password in ("p\u2168\u00ad-é", "pIX-é", "pIX-e\u0301"):
            with self.subTest(password=password):
                connection = pg_connection(self, cluster.uri(role, password))
                self.assertEqual(connection.query("SELECT current_user").rows, [(role,)])
        self.assertEqual(self.refusal(cluster.uri(role, "pix-é")).sqlstate, "28P01")


@requires_postgres
class PostgresReadWriteTest(unittest.TestCase):
    """target_session_attrs=read-write over several hosts: a standby skipped, and
    after a failover, the promoted standby found."""

    def test_a_server_before_postgresql_14_is_asked(self):
        """It reports neither in_hot_standby nor default_transaction_read_only: libpq
        asks it SHOW transaction_read_only."""
        cluster = PostgresCluster.shared()

        def read_only_before_14(sock):
            receive_startup(sock)
            sock.sendall(authentication(0) + backend(b"S", b"server_version\x0013.0\0")
                         + ready())
            asked = b""
            while not asked.endswith(scheduler.SYNC):
                asked += sock.recv(65536)
            self.assertIn(b"SHOW transaction_read_only", asked)
            sock.sendall(PARSED + BOUND + row_description(("transaction_read_only", 25))
                         + data_row(b"on") + complete("SHOW") + ready())
            sock.recv(65536)  # Terminate

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        play_server(self, listener, read_only_before_14, read_only_before_14)
        old = listener.getsockname()[1]
        uri = cluster.uri(target_session_attrs="read-write", sslmode="disable")
        self.assertEqual(pg_connection(self, on_ports(uri, old, cluster.port)).port,
                         cluster.port)
        with self.assertRaisesRegex(scheduler.PGConnectionError,
                                    f"127.0.0.1:{old}: transaction_read_only is on, "
                                    "and target_session_attrs=read-write"):
            pg_connection(self, on_ports(uri, old))

    def test_a_host_that_never_answers_leaves_the_next_its_share_of_the_deadline(self):
        """Without connect_timeout each host gets a share of what is left: one that
        never answers (a lost machine: here a socket that nobody accepts on) does not
        take it all, and the next (after a failover, the new primary) is reached."""
        cluster = PostgresCluster.shared()
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nothing answers
        uri = on_ports(cluster.uri(), silent.getsockname()[1], cluster.port)
        self.assertEqual(pg_connection(self, uri, seconds=1).port, cluster.port)
        with self.assertRaisesRegex(scheduler.PGTimeout, "no host of .* will do: 127.0.0.1:"
                                    f"{silent.getsockname()[1]}: the server did not answer"):
            pg_connection(self, on_ports(uri, silent.getsockname()[1], silent.getsockname()[1]),
                          seconds=0.4)

    def test_a_standby_is_skipped_until_it_is_promoted(self):
        """Slower than most (about 1.5 s): a standby, a stop, a promotion."""
        primary = PostgresCluster.shared()
        standby = primary.standby(synchronous=False)
        self.addCleanup(standby.cleanup)
        uri = on_ports(primary.uri(target_session_attrs="read-write"), standby.port, primary.port)
        self.assertEqual(pg_connection(self, uri).port, primary.port)
        self.assertEqual(pg_connection(self, uri.replace("read-write", "any")).port, standby.port)
        with self.assertRaisesRegex(scheduler.PGConnectionError, "the server is a hot standby "
                                    r"\(read-only\), and target_session_attrs=read-write"):
            pg_connection(self, on_ports(uri, standby.port))
        pool = scheduler.PGPool(scheduler.parse_postgres_uri(uri, {}), size=2, timeout=10)
        self.addCleanup(pool.close)
        with pool.connection() as connection:
            self.assertEqual(connection.port, primary.port)
        self.addCleanup(primary.start)
        primary.stop()  # the failover: the primary goes, the standby is promoted
        standby.promote()
        with pool.connection() as connection:  # the pool's idle connection is dead: noticed
            self.assertEqual(connection.port, standby.port)
            self.assertEqual(connection.query("SELECT pg_is_in_recovery()").rows, [(False,)])


@requires_postgres
class PostgresPoolTest(unittest.TestCase):
    def setUp(self):
        self.cluster = PostgresCluster.shared()
        self.pool = scheduler.PGPool(scheduler.parse_postgres_uri(self.cluster.uri(), {}),
                                     size=2, timeout=10)
        self.addCleanup(self.pool.close)

    def terminate(self, pid: int) -> None:
        """End a session from outside, as an administrator or a shutdown does."""
        self.cluster.sql(f"SELECT pg_terminate_backend({pid})")
        wait_until(lambda: self.cluster.sql(
            f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0",
            what=f"the end of {pid}")

    def test_a_fatal_to_an_idle_connection_is_noticed_before_use(self):
        with self.pool.connection() as connection:
            first, pid = connection, connection.backend_pid
        self.terminate(pid)  # its FATAL waits, unread, in the idle connection's socket
        with self.pool.connection() as connection:
            self.assertNotEqual(connection.backend_pid, pid)
            self.assertEqual(connection.query("SELECT 1").rows, [(1,)])
        self.assertEqual(first.state, "closed")
        bare = pg_connection(self, self.cluster.uri())  # without the pool's check:
        self.terminate(bare.backend_pid)
        with self.assertRaises(scheduler.PGConnectionLost) as lost:  # read at its next use
            bare.query("SELECT 1")
        self.assertEqual(lost.exception.sqlstate, "57P01")

    def test_a_connection_that_breaks_in_use_is_replaced(self):
        with self.assertRaises(scheduler.PGConnectionLost):
            with self.pool.connection() as connection:
                connection.query("SELECT pg_terminate_backend(pg_backend_pid())")
        self.assertEqual((connection.state, self.pool._open), ("closed", 0))
        with self.pool.connection() as again:
            self.assertEqual(again.query("SELECT 1").rows, [(1,)])

    def test_a_busy_pool_answers_by_the_deadline(self):
        taken = queue.Queue()

        def wait_for_one():
            with self.pool.connection(time.monotonic() + 10) as connection:
                taken.put(connection)

        with self.pool.connection() as first, self.pool.connection() as second:
            started = time.monotonic()
            with self.assertRaisesRegex(scheduler.PGTimeout, "pool busy: all 2 connections to "
                                                             "postgresql://scheduler@"):
                with self.pool.connection(started + 0.2):
                    pass
            self.assertLess(time.monotonic() - started, 3)
            waiter = threading.Thread(target=wait_for_one)
            waiter.start()
        waiter.join(10)
        self.assertIn(taken.get(timeout=1), (first, second))  # one given back, not a third

    def test_a_connection_given_back_in_a_transaction_is_rolled_back(self):
        with self.pool.connection() as connection:
            connection.query("BEGIN")
            connection.query("CREATE TEMP TABLE t (a int)")
        with self.pool.connection() as again:
            self.assertIs(again, connection)
            self.assertEqual(again.transaction_status, "I")
            self.assertEqual(again.query("SELECT count(*) FROM pg_class WHERE relname = 't' AND "
                                         "relpersistence = 't'").rows, [(0,)])
        self.pool.close()
        self.assertEqual(connection.state, "closed")
        with self.assertRaisesRegex(scheduler.PGConnectionError, "closed"):
            with self.pool.connection():
                pass


class MetricsTableTest(unittest.TestCase):
    """The table the workers' metrics meet in, without processes: what one slot
    holds, what a writer killed halfway leaves, and what a reader sees meanwhile."""

    LAYOUT = scheduler.SeriesLayout([("/healthz", "GET", 200), ("unmatched", "GET", 404)])

    def totals(self, requests: int, open_now: int = 0) -> tuple:
        """A worker's layout, numbers (requests of /healthz, in the first bucket, and
        half a second in all) and samples."""
        numbers = [0.0] * self.LAYOUT.size
        numbers[0] = numbers[self.LAYOUT.histogram["/healthz", "GET"]] = requests
        numbers[self.LAYOUT.histogram["/healthz", "GET"] + scheduler._HISTOGRAM - 1] = 0.5
        return self.LAYOUT, numbers, {
            "scheduler_connections_open": ["gauge", "Open.", open_now],
            "scheduler_log_lines_dropped_total": ["counter", "Dropped.", 3]}

    def assertHolds(self, reading: scheduler.Reading, totals: tuple):
        self.assertEqual((reading.layout.series, list(reading.numbers), reading.samples),
                         (totals[0].series, totals[1], totals[2]))

    def test_a_slot_holds_the_last_totals_written(self):
        table = scheduler.MetricsTable(2)
        self.assertIsNone(table.read(0))
        for requests in (1, 2, 3):
            self.assertTrue(table.put(0, *self.totals(requests)))
        self.assertHolds(table.read(0), self.totals(3))
        self.assertIsNone(table.read(1))

    def test_a_layout_is_read_from_the_slot_by_a_process_that_has_not_seen_it(self):
        table = scheduler.MetricsTable(1)
        table.put(0, *self.totals(5))
        table._layouts.clear()  # as in another process
        reading = table.read(0)
        self.assertIsNot(reading.layout, self.LAYOUT)
        self.assertHolds(reading, self.totals(5))

    def test_a_write_of_what_the_slot_holds_is_skipped(self):
        table = scheduler.MetricsTable(1)
        table.put(0, *self.totals(1))
        generation = table.generation(0)
        table.put(0, *self.totals(1))
        self.assertEqual(table.generation(0), generation)
        table.put(0, *self.totals(2))
        self.assertEqual(table.generation(0), generation + 1)

    def test_a_writer_killed_halfway_leaves_the_last_whole_copy(self):
        table = scheduler.MetricsTable(1)
        table.put(0, *self.totals(1))
        generation = struct.unpack_from("<Q", table._map, 0)[0]
        copy = 8 + ((generation + 1) % 2) * table.COPY_BYTES  # the copy the next write fills
        table._map[copy:copy + 80] = b"\xff" * 80  # torn, and never published
        self.assertHolds(table.read(0), self.totals(1))
        table.put(0, *self.totals(2))
        self.assertHolds(table.read(0), self.totals(2))

    def test_totals_too_large_are_refused_not_written_past_the_slot(self):
        table = scheduler.MetricsTable(2)
        table.put(1, *self.totals(1))
        layout, numbers, _ = self.totals(1)
        self.assertFalse(table.put(0, layout, numbers, {"x": ["y" * table.COPY_BYTES]}))
        self.assertHolds(table.read(1), self.totals(1))

    def test_a_reader_while_another_thread_writes_sees_whole_totals_that_never_go_down(self):
        table, seen, done = scheduler.MetricsTable(1), [], threading.Event()

        def write():
            for requests in range(1, 3001):
                table.put(0, *self.totals(requests))
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        while not done.is_set():
            reading = table.read(0)
            if reading is not None:
                seen.append(reading.numbers[0])
                self.assertEqual(reading.numbers[self.LAYOUT.histogram["/healthz", "GET"]],
                                 reading.numbers[0])  # whole: both numbers of one write
                self.assertEqual(reading.samples, self.totals(1)[2])
        writer.join()
        self.assertEqual(seen, sorted(seen))
        self.assertHolds(table.read(0), self.totals(3000))

    def test_a_table_opened_by_its_descriptor_is_the_same_table(self):
        table = scheduler.MetricsTable(2)  # a worker gets table.fd, which survives exec
        other = scheduler.MetricsTable(2, table.fd)
        other.put(1, *self.totals(5))
        self.assertHolds(table.read(1), self.totals(5))
        with self.assertRaises(ValueError):  # the slots must match the file's size
            scheduler.MetricsTable(3, table.fd)

    def test_retiring_a_dead_workers_slot_keeps_its_counters_and_zeroes_its_gauges(self):
        table = scheduler.MetricsTable(1)
        table.put(0, *self.totals(7, open_now=5))
        table.retire(0)
        reading = table.read(0)
        self.assertEqual(list(reading.numbers), self.totals(7)[1])
        self.assertEqual(reading.samples["scheduler_connections_open"][2], 0)
        self.assertEqual(reading.samples["scheduler_log_lines_dropped_total"][2], 3)


class SharedMetricsTest(unittest.TestCase):
    """Metrics that share a table, as the workers do: a scrape of any adds up all,
    and the one started in a dead one's slot carries on from its counts."""

    def worker(self, table: scheduler.MetricsTable, slot: int, dropped=0, open_now=0):
        metrics = scheduler.Metrics()
        metrics.process_collectors.append(lambda: [
            ("scheduler_connections_open", "gauge", "Open.", open_now),
            ("scheduler_log_lines_dropped_total", "counter", "Dropped.", dropped)])
        metrics.collectors.append(lambda: [("scheduler_appointments", "gauge", "Stored.", 4)])
        metrics.share(table, slot)
        return metrics

    def scrape(self, metrics: scheduler.Metrics) -> Dict[Tuple[str, frozenset], float]:
        return parse_metrics(metrics.exposition())

    def requests(self, sample, method="GET", status="200", route="/healthz") -> float:
        return sample[("scheduler_requests_total", frozenset(
            {"route": route, "method": method, "status": status}.items()))]

    def test_a_scrape_of_either_worker_adds_up_both(self):
        table = scheduler.MetricsTable(2)
        first, second = self.worker(table, 0, dropped=1, open_now=2), \
            self.worker(table, 1, dropped=10, open_now=3)
        for _ in range(3):
            first.observe("/healthz", "GET", 200, 0.001)
        second.observe("/healthz", "GET", 200, 0.001)
        second.observe("/appointments", "POST", 201, 0.002)
        second.publish()  # as its watchdog does every tick
        for metrics in (first, second):
            with self.subTest(scraped=metrics is first and "first" or "second"):
                sample = self.scrape(metrics)
                self.assertEqual(self.requests(sample), 4)
                self.assertEqual(self.requests(sample, "POST", "201", "/appointments"), 1)
                self.assertEqual(sample[("scheduler_log_lines_dropped_total", frozenset())], 11)
                self.assertEqual(sample[("scheduler_connections_open", frozenset())], 5)
                self.assertEqual(sample[("scheduler_appointments", frozenset())], 4)  # once
                self.assertEqual(sample[("scheduler_request_duration_seconds_count", frozenset(
                    {"route": "/healthz", "method": "GET"}.items()))], 4)

    def test_a_slot_nobody_has_written_adds_nothing(self):
        table = scheduler.MetricsTable(4)  # 2 workers, a spare for a reload, the supervisor's
        first, second = self.worker(table, 0), self.worker(table, 1)
        first.observe("/healthz", "GET", 200, 0.001)
        second.observe("/healthz", "GET", 200, 0.001)
        second.publish()
        self.assertEqual(self.requests(self.scrape(first)), 2)

    def test_a_worker_started_in_a_dead_ones_slot_carries_on_from_its_counts(self):
        table = scheduler.MetricsTable(2)
        dead, other = self.worker(table, 0, dropped=2, open_now=7), self.worker(table, 1)
        for _ in range(5):
            dead.observe("/healthz", "GET", 200, 0.001)
        dead.publish()
        before = self.scrape(other)  # what a scrape saw before it died
        table.retire(0)  # the supervisor, once it has reaped the dead one
        again = self.worker(table, 0, dropped=0, open_now=1)
        self.assertEqual(self.requests(self.scrape(other)), 5)  # carried on, at once
        again.observe("/healthz", "GET", 200, 0.001)
        again.publish()
        after = self.scrape(other)
        self.assertEqual(self.requests(after), 6)
        self.assertGreaterEqual(self.requests(after), self.requests(before))
        self.assertEqual(after[("scheduler_log_lines_dropped_total", frozenset())], 2)
        self.assertEqual(after[("scheduler_connections_open", frozenset())], 1)


    def test_workers_that_lay_out_other_series_add_up_by_series(self):
        # Two generations of the code (a worker started after an upgrade, say) need not
        # declare the same series: each adds up the other's by name.
        table = scheduler.MetricsTable(2)
        old, new = (scheduler.Metrics(lambda series=series: series) for series in (
            (("/healthz", "GET", 200),), (("/appointments", "POST", 201), ("/healthz", "GET", 200))))
        for slot, metrics in enumerate((old, new)):
            metrics.share(table, slot)
        for _ in range(2):
            old.observe("/healthz", "GET", 200, 0.001)
        old.observe("/appointments", "POST", 201, 0.001)  # one it did not declare
        new.observe("/appointments", "POST", 201, 0.001)
        new.observe("/metrics", "GET", 200, 0.001)  # nor this one
        for metrics in (old, new):
            metrics.publish()
        for metrics in (old, new):
            with self.subTest(scraped=metrics is old and "old" or "new"):
                sample = self.scrape(metrics)
                self.assertEqual(self.requests(sample), 2)
                self.assertEqual(self.requests(sample, "POST", "201", "/appointments"), 2)
                self.assertEqual(self.requests(sample, route="/metrics"), 1)
                self.assertEqual(sample[("scheduler_request_duration_seconds_count", frozenset(
                    {"route": "/appointments", "method": "POST"}.items()))], 2)

    def test_a_scrape_reuses_the_others_numbers_until_one_publishes(self):
        table = scheduler.MetricsTable(2)
        first, second = self.worker(table, 0), self.worker(table, 1)
        second.observe("/healthz", "GET", 200, 0.001)
        second.publish()
        self.assertEqual(self.requests(self.scrape(first)), 1)
        with mock.patch.object(table, "read", side_effect=AssertionError("read again")):
            first.observe("/healthz", "GET", 200, 0.001)
            self.assertEqual(self.requests(self.scrape(first)), 2)  # its own, counted at once
        second.observe("/healthz", "GET", 200, 0.001)
        second.publish()
        self.assertEqual(self.requests(self.scrape(first)), 3)


# --- Routes: through Service.begin() and respond(), without a socket ---------------


class MatchTest(unittest.TestCase):
    ROUTES = (
        scheduler.Route("GET", "/things", "list"),
        scheduler.Route("POST", "/things", "create"),
        scheduler.Route("GET", "/things/{name}/{date}", "show"),
    )
    FOUND = [
        ("GET", "/things", "list", {}),
        ("HEAD", "/things", "list", {}),
        ("POST", "/things", "create", {}),
        ("GET", "/things/a%2Fb%20c/2026", "show", {"name": "a/b c", "date": "2026"}),
        ("GET", "/things/%C3%A9/x", "show", {"name": "é", "date": "x"}),
    ]
    NOT_FOUND = ["/", "/thing", "/things/", "/things/a", "/things/a/b/c", "/THINGS",
                 "/things/x://y/z"]

    def test_found(self):
        for method, path, handler, params in self.FOUND:
            with self.subTest(method=method, path=path):
                route, got = scheduler.match(self.ROUTES, method, path)
                self.assertEqual((route.handler, got), (handler, params))

    def assertRaisesStatus(self, status: int, method: str, path: str) -> scheduler.HTTPError:
        with self.assertRaises(scheduler.HTTPError) as caught:
            scheduler.match(self.ROUTES, method, path)
        self.assertEqual(caught.exception.status, status)
        return caught.exception

    def test_not_found(self):
        for path in self.NOT_FOUND:
            with self.subTest(path=path):
                self.assertRaisesStatus(404, "GET", path)

    def test_wrong_method_lists_allowed_ones(self):
        error = self.assertRaisesStatus(405, "DELETE", "/things")
        self.assertEqual(error.headers, {"Allow": "GET, HEAD, POST, OPTIONS"})

    def test_path_that_is_not_utf8_is_a_bad_request(self):
        self.assertRaisesStatus(400, "GET", "/things/%ff/x")


class Client:
    """The service without a socket, as Flask's test client is: each request is
    built as parse_head() would build it, goes through Service.begin() and
    respond() as on the wire, and its reply is rendered and read back by http.client."""

    def __init__(self, store: scheduler.Store, limits: Optional[scheduler.Limits] = None,
                 cors_origins: Tuple[str, ...] = ()):
        self.logged: List[str] = []  # what the service logged, as the text log has it
        self.fields: List[dict] = []  # and what it said more of each (request_id...)
        self.service = scheduler.Service(store, limits, cors_origins, self.log)
        self.client_gone = lambda: False  # what the service finds when it asks

    def request(self, method: str, target: str, body=None, headers=None) -> Response:
        """Send a request (a dict or list body goes as JSON) and return the response."""
        headers = {name.lower(): value for name, value in (headers or {}).items()}
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("content-type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        if body is not None:
            headers.setdefault("content-length", str(len(body)))
        request = scheduler.RequestHead(method, *scheduler.split_target(target), "HTTP/1.1",
                                        headers)
        exchange = self.service.begin(request)
        reply = self.service.respond(exchange, (body or b"")[:exchange.body_length],
                                     self.client_gone)
        response, _ = scheduler.render_response(reply, exchange.request_id,
                                                head_only=method == "HEAD")
        return read_response(_BytesSocket(response), method)

    def log(self, message: str, **fields) -> None:
        self.logged.append(scheduler.text_message(message, fields))
        self.fields.append(fields)


class RouteTestCase(HTTPTestCase):
    """Route tests: requests through the in-process Client."""

    def setUp(self):
        super().setUp()
        self.client = Client(self.store)

    def request(self, method, path, body=None, headers=None) -> Response:
        return self.assertFramed(method, self.client.request(method, path, body, headers))


@on_every_store
class BookTest(RouteTestCase):
    def test_created_with_location_and_the_appointment(self):
        response = self.book("alice", "2026-11-25", "09:30")
        self.assertEqual(response.status, 201)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertEqual(response.headers["Location"], "/appointments/alice/2026-11-25")
        self.assertEqual(response.json(), {
            "user_id": "alice", "date": "2026-11-25", "time": "09:30",
            "start": "2026-11-25T09:30:00Z", "end": ends("2026-11-25", "09:30")})
        self.assertEqual(self.stored(), [appointment()])

    def test_the_etag_is_the_one_of_its_url_and_an_edit_needs_no_get_first(self):
        for user_id, note in (("alice", None), ("a/b c+d@e.com\u00e9", "Left knee")):
            with self.subTest(user_id=user_id):
                booked = self.book(user_id, note=note)
                tag = booked.headers["ETag"]
                self.assertEqual(tag, self.request("GET", booked.headers["Location"])
                                 .headers["ETag"])
                self.assertEqual(tag, '"%s"' % hashlib.sha1(booked.body).hexdigest())
                moved = self.request("PATCH", booked.headers["Location"], {"time": "10:00"},
                                     {"If-Match": tag})
                self.assertEqual(moved.status, 200, moved.body)

    def test_location_percent_encodes_the_user_id(self):
        response = self.book("a/b c+d@e.com\u00e9", "2026-11-25", "09:30")
        self.assertEqual(response.headers["Location"],
                         "/appointments/a%2Fb%20c%2Bd%40e.com%C3%A9/2026-11-25")

    def test_the_last_slot_ends_the_next_day(self):
        response = self.book(time=LAST_START)
        self.assertEqual(response.json()["end"], "2026-11-26T00:00:00Z")

    def test_integer_user_id_is_its_decimal_string(self):
        self.assertEqual(self.book(42).json()["user_id"], "42")
        self.assertEqual(self.book("42", date="2026-11-26").status, 201)
        self.assertEqual(self.book(42.0, date="2026-11-27").json()["user_id"], "42")
        body = b'{"user_id": 4.2e1, "date": "2026-11-28", "time": "09:00"}'  # as JSON Schema
        response = self.request("POST", "/appointments", body, {"Content-Type": "application/json"})
        self.assertEqual(response.json()["user_id"], "42")
        self.assertEqual(len(self.stored("42")), 4)

    def test_charset_parameter_is_accepted(self):
        response = self.request("POST", "/appointments",
                                json.dumps({"user_id": "a", "date": "2026-11-25", "time": "09:00"}),
                                {"Content-Type": "Application/JSON; charset=utf-8"})
        self.assertEqual(response.status, 201)

    def test_second_booking_that_date_conflicts_and_shows_the_first(self):
        first = self.book(time="09:30").json()
        problem = self.assertProblem(self.book(time="14:00"), 409)
        self.assertEqual(problem["appointment"], first)
        self.assertIn("already has an appointment on 2026-11-25", problem["detail"])
        self.assertEqual(self.stored(), [appointment(time="09:30")])

    def test_other_users_share_a_slot(self):
        for user in ("alice", "bob"):
            self.assertEqual(self.book(user).status, 201)

    def test_same_user_books_different_dates(self):
        self.assertEqual(self.book(date="2026-11-25").status, 201)
        self.assertEqual(self.book(date="2026-11-26").status, 201)


@on_every_store
class ListTest(RouteTestCase):
    def test_lists_the_users_appointments_sorted_by_start(self):
        for date in ("2026-11-27", "2026-11-25", "2026-11-26"):
            self.book("alice", date)
        self.book("bob", "2026-11-25")
        response = self.request("GET", "/appointments?user_id=alice")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        body = response.json()
        self.assertEqual(body["user_id"], "alice")
        self.assertEqual([a["date"] for a in body["appointments"]],
                         ["2026-11-25", "2026-11-26", "2026-11-27"])
        self.assertEqual({a["user_id"] for a in body["appointments"]}, {"alice"})

    def test_unknown_user_gets_an_empty_list(self):
        response = self.request("GET", "/appointments?user_id=nobody")
        self.assertEqual((response.status, response.json()),
                         (200, {"user_id": "nobody", "appointments": []}))

    def test_percent_encoded_user_id(self):
        self.book("a+b/c@d e")
        body = self.request("GET", "/appointments?user_id=a%2Bb%2Fc%40d%20e").json()
        self.assertEqual(body["user_id"], "a+b/c@d e")
        self.assertEqual(len(body["appointments"]), 1)

    def test_head_has_the_headers_of_get_and_no_body(self):
        self.book()
        get = self.request("GET", "/appointments?user_id=alice")
        head = self.request("HEAD", "/appointments?user_id=alice")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertEqual(head.headers["Content-Length"], get.headers["Content-Length"])

    BAD_QUERIES = [
        ("/appointments", "required"),
        ("/appointments?", "required"),
        ("/appointments?user_id=", "required"),
        ("/appointments?userid=alice", "required"),
        ("/appointments?user_id=a&user_id=b", "once"),
        ("/appointments?user_id=%00", "control characters"),
        ("/appointments?user_id=" + "x" * 257, "at most 256"),
        ("/appointments?user_id=%ff", "UTF-8"),
    ]

    def test_bad_query_is_400(self):
        for path, message in self.BAD_QUERIES:
            with self.subTest(path=path):
                problem = self.assertProblem(self.request("GET", path), 400)
                self.assertIn(message, problem["detail"])


@on_every_store
class BadBookingTest(RouteTestCase):
    """Bad requests get the right status, say why, and never change the store."""

    def setUp(self):
        super().setUp()
        self.assertEqual(self.book("alice", "2026-11-24").status, 201)
        self.before = self.stored()

    def assertUnchanged(self):
        self.assertEqual(self.stored(), self.before)

    UNPARSEABLE_BODIES = [  # 400: the body is not a JSON object we can read
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"{'user_id': 'alice'}", "not valid JSON"),
        (b'["alice", "2026-11-25", "09:30"]', "JSON object"),
        (b'"alice"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"user_id": "a", "date": NaN}', "NaN"),
        (b'{"time": Infinity}', "Infinity"),
        (b'{"user_id": "a", "user_id": "b"}', "more than once"),
        (b'{"user_id": "\xff"}', "UTF-8"),
        (b'{"note": 9e-1000000000000000000000}', "exponent"),  # past Decimal: was a 500
    ]

    def test_unparseable_body_is_400(self):
        for body, message in self.UNPARSEABLE_BODIES:
            with self.subTest(body=body[:40]):
                response = self.request("POST", "/appointments", body,
                                        {"Content-Type": "application/json"})
                self.assertIn(message, self.assertProblem(response, 400)["detail"])
                self.assertUnchanged()

    def test_deep_nesting_is_400(self):
        depth = scheduler.Limits().max_body_bytes // 2 - 1
        body = b"[" * depth + b"]" * depth
        response = self.request("POST", "/appointments", body, {"Content-Type": "application/json"})
        self.assertIn("nested too deeply", self.assertProblem(response, 400)["detail"])
        self.assertUnchanged()

    INVALID_FIELDS = [  # 422: a JSON object whose fields are missing or invalid
        ({}, ["user_id", "date", "time"]),
        ({"user_id": "alice"}, ["date", "time"]),
        ({"user_id": True, "date": "2026-11-25", "time": "09:00"}, ["user_id"]),
        ({"user_id": None, "date": "2026-11-25", "time": "09:00"}, ["user_id"]),
        ({"user_id": 1.5, "date": "2026-11-25", "time": "09:00"}, ["user_id"]),
        ({"user_id": 1e300, "date": "2026-11-25", "time": "09:00"}, ["user_id"]),
        ({"user_id": "", "date": "2025-02-29", "time": "09:15"}, ["user_id", "date", "time"]),
        ({"user_id": "alice", "date": "2026-11-25", "time": "24:00"}, ["time"]),
        ({"user_id": "alice", "date": "2026-W45-3", "time": "09:00"}, ["date"]),
        ({"user_id": "alice", "date": "2026-11-25T09:00Z", "time": "09:00"}, ["date"]),
        ({"user_id": "alice", "date": "2026-11-25", "time": 9}, ["time"]),
    ]

    def test_invalid_fields_are_422_listing_each(self):
        for body, fields in self.INVALID_FIELDS:
            with self.subTest(body=body):
                problem = self.assertProblem(self.request("POST", "/appointments", body), 422)
                self.assertEqual([e["field"] for e in problem["errors"]], fields)
                for error in problem["errors"]:
                    self.assertTrue(error["message"])
                self.assertUnchanged()

    def test_a_time_error_says_when_appointments_start(self):
        problem = self.assertProblem(self.book(time="09:15"), 422)
        self.assertIn(scheduler.starts_in_words(), problem["errors"][0]["message"])
        self.assertUnchanged()

    def test_wrong_content_type_is_415_with_a_hint(self):
        for headers in ({}, {"Content-Type": "text/plain"},
                        {"Content-Type": "application/x-www-form-urlencoded"}):
            with self.subTest(headers=headers):
                response = self.request(
                    "POST", "/appointments",
                    json.dumps({"user_id": "bob", "date": "2026-11-25", "time": "09:00"}), headers)
                problem = self.assertProblem(response, 415)
                self.assertIn("Content-Type: application/json", problem["detail"])
                self.assertUnchanged()

    def test_body_over_the_cap_is_413(self):
        body = b'{"pad": "' + b"x" * scheduler.Limits().max_body_bytes + b'"}'
        response = self.request("POST", "/appointments", body, {"Content-Type": "application/json"})
        self.assertProblem(response, 413)
        self.assertUnchanged()


@on_every_store
class ManageBookingTest(RouteTestCase):
    def test_location_leads_to_the_appointment(self):
        booked = self.book("alice", "2026-11-25", "09:30")
        response = self.request("GET", booked.headers["Location"])
        self.assertEqual((response.status, response.json()), (200, booked.json()))
        self.assertEqual(response.headers["Content-Type"], "application/json")

    def test_no_appointment_is_404(self):
        self.book("alice", "2026-11-25")
        for path in ("/appointments/alice/2026-11-26", "/appointments/bob/2026-11-25"):
            with self.subTest(path=path):
                self.assertProblem(self.request("GET", path), 404)
                self.assertProblem(self.request("DELETE", path), 404)
        self.assertEqual(len(self.stored()), 1)

    def test_malformed_path_parameters_are_400(self):
        for path, message in (("/appointments/alice/2026-02-30", "not a real calendar date"),
                              ("/appointments/alice/tomorrow", "YYYY-MM-DD"),
                              ("/appointments/%20alice/2026-11-25", "whitespace"),
                              ("/appointments/a%00b/2026-11-25", "control characters")):
            with self.subTest(path=path):
                self.assertIn(message, self.assertProblem(self.request("GET", path), 400)["detail"])

    def test_a_percent_sign_that_encodes_nothing_is_400(self):
        # RFC 3986 section 2.1: "%" and two hex digits. "/appointments/%/..." was the
        # user "%", a second URL of /appointments/%25/...
        self.assertEqual(self.book("%").status, 201)
        for target in ("/appointments/%/2026-11-25", "/appointments/%zz/2026-11-25",
                       "/appointments/%2/2026-11-25", "/appointments?user_id=%",
                       "/appointments?user_id=%zz", "/appointments.ics?user_id=a%2"):
            with self.subTest(target=target):
                detail = self.assertProblem(self.request("GET", target), 400)["detail"]
                self.assertIn("'%' that is not followed by two hex digits; send % itself as "
                              "%25", detail)
        self.assertEqual(self.request("GET", "/appointments/%25/2026-11-25").status, 200)
        self.assertEqual(self.request("GET", "/appointments?user_id=%25").json()["user_id"], "%")

    def test_cancel_is_204_without_a_body_and_frees_the_date(self):
        location = self.book(time="09:30").headers["Location"]
        response = self.request("DELETE", location)
        self.assertEqual(response.status, 204)
        self.assertEqual(response.body, b"")
        self.assertIsNone(response.headers["Content-Length"])
        self.assertIsNone(response.headers["Content-Type"])
        self.assertEqual(self.stored(), [])
        self.assertProblem(self.request("GET", location), 404)
        self.assertEqual(self.book(time="15:00").status, 201)  # rescheduled
        self.assertEqual(self.stored(), [appointment(time="15:00")])

    def test_wrong_method_on_an_appointment_is_405(self):
        response = self.request("PUT", "/appointments/alice/2026-11-25")
        self.assertProblem(response, 405)
        self.assertEqual(response.headers["Allow"], "GET, HEAD, PATCH, DELETE, OPTIONS")


@on_every_store
class DateFilterTest(RouteTestCase):
    def setUp(self):
        super().setUp()
        for day in range(20, 31):
            self.assertEqual(self.book(date=f"2026-11-{day}").status, 201)

    def dates(self, query: str) -> list:
        response = self.request("GET", "/appointments?user_id=alice" + query)
        self.assertEqual(response.status, 200, response.body)
        return [int(a["date"][-2:]) for a in response.json()["appointments"]]

    def test_bounds_are_inclusive_and_optional(self):
        self.assertEqual(self.dates("&from=2026-11-22&to=2026-11-24"), [22, 23, 24])
        self.assertEqual(self.dates("&from=2026-11-29"), [29, 30])
        self.assertEqual(self.dates("&to=2026-11-21"), [20, 21])
        self.assertEqual(self.dates("&from=2026-11-25&to=2026-11-25"), [25])
        self.assertEqual(self.dates("&from=2026-12-01"), [])

    BAD = [("&from=2026-11-31", "not a real calendar date"),
           ("&to=20261130", "YYYY-MM-DD"),
           ("&from=", "YYYY-MM-DD"),
           ("&from=2026-11-01&from=2026-11-02", "once"),
           ("&from=2026-11-25&to=2026-11-24", "after")]

    def test_bad_bounds_are_400(self):
        for query, message in self.BAD:
            with self.subTest(query=query):
                response = self.request("GET", "/appointments?user_id=alice" + query)
                self.assertIn(message, self.assertProblem(response, 400)["detail"])


@on_every_store
class UserIdEncodingTest(RouteTestCase):
    """User IDs with reserved or non-ASCII characters work in every path and query
    when percent-encoded."""

    USER_IDS = ["a/b", "../etc", "a+b", "bob+clinic@example.com", "a b", "Zoë", "東京",
                "100%", "a?b#c&d=e", "42"]

    def test_every_endpoint(self):
        for user_id in self.USER_IDS:
            with self.subTest(user_id=user_id):
                booked = self.book(user_id, "2026-11-25")
                self.assertEqual(booked.status, 201, booked.body)
                path = f"/appointments/{urllib.parse.quote(user_id, safe='')}/2026-11-25"
                self.assertEqual(booked.headers["Location"], path)
                query = urllib.parse.urlencode({"user_id": user_id})
                listed = self.request("GET", f"/appointments?{query}").json()
                self.assertEqual(listed["user_id"], user_id)
                self.assertEqual(listed["appointments"], [booked.json()])
                self.assertEqual(self.request("GET", path).json()["user_id"], user_id)
                feed = self.request("GET", f"/appointments.ics?{query}")
                self.assertEqual(feed.body.count(b"BEGIN:VEVENT"), 1)
                self.assertEqual(self.request("DELETE", path).status, 204)
                self.assertEqual(self.stored(user_id), [])


class HealthTest(RouteTestCase):
    def test_healthy(self):
        response = self.request("GET", "/healthz")
        self.assertEqual((response.status, response.json()), (200, {"status": "ok"}))

    def test_a_worker_that_keeps_dying_young_makes_it_degraded_yet_200(self):
        table = scheduler.MetricsTable(4)  # as with --workers 2: a spare, the supervisor's last
        self.client.service.metrics.share(table, 0, supervisor_slot=3)
        self.assertEqual(self.request("GET", "/healthz").json(), {"status": "ok"})
        nothing = scheduler.SeriesLayout(())
        table.put(3, nothing, [], {}, [
            {"worker": 1, "deaths": 3, "last": "exited with status 1 before it was ready"}])
        response = self.request("GET", "/healthz")
        self.assertEqual(response.status, 200)  # this worker serves: keep sending it requests
        body = response.json()
        self.assertEqual((body["status"], body["failing_workers"]), ("degraded", [1]))
        self.assertIn("Worker 1 keeps dying young (3 times in a row; the last exited with "
                      "status 1 before it was ready)", body["detail"])
        table.put(3, nothing, [], {}, [])
        self.assertEqual(self.request("GET", "/healthz").json(), {"status": "ok"})


@on_every_store
class HealthAtCapacityTest(RouteTestCase):
    """/healthz says whether bookings can be taken: not while every one would get 507."""

    def setUp(self):
        super().setUp()
        self.store.capacity = 2  # as --max-appointments 2 opens it

    def test_503_while_the_store_is_full_and_200_once_a_cancellation_makes_room(self):
        for user_id in ("alice", "bob"):
            self.assertEqual(self.request("GET", "/healthz").status, 200)
            self.assertEqual(self.book(user_id).status, 201)
        self.assertProblem(self.book("carol"), 507)
        response = self.request("GET", "/healthz")
        detail = self.assertProblem(response, 503)["detail"]
        self.assertIn("holds its maximum of 2 appointments", detail)
        self.assertIn("Cancellations make room; or restart it with a higher --max-appointments",
                      detail)
        self.assertNotIn("Retry-After", response.headers)  # retrying soon will not help
        self.assertEqual(self.request("DELETE", "/appointments/bob/2026-11-25").status, 204)
        self.assertEqual(self.request("GET", "/healthz").json(), {"status": "ok"})
        self.assertEqual(self.book("carol").status, 201)


@on_every_store
class RescheduleTest(RouteTestCase):
    """PATCH /appointments/{user_id}/{date}: a JSON merge patch (RFC 7396) of date
    and time, applied in one step."""

    URL = "/appointments/alice/2026-11-25"

    def patch(self, body, url=URL, media_type="application/merge-patch+json") -> Response:
        return self.request("PATCH", url, body if isinstance(body, (str, bytes))
                            else json.dumps(body), {"Content-Type": media_type})

    def test_moving_to_another_date_gives_the_new_url(self):
        self.book(time="09:30")
        response = self.patch({"date": "2026-11-26", "time": "10:00"})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), appointment(date="2026-11-26", time="10:00").as_json())
        self.assertEqual(response.headers["Location"], "/appointments/alice/2026-11-26")
        self.assertEqual(response.headers["Content-Location"], "/appointments/alice/2026-11-26")
        self.assertEqual(self.stored(), [appointment(date="2026-11-26", time="10:00")])
        self.assertEqual(self.request("GET", self.URL).status, 404)

    def test_moving_within_the_date_keeps_the_url(self):
        self.book(time="09:30")
        response = self.patch({"time": "16:30"})
        self.assertEqual((response.status, response.json()["time"]), (200, "16:30"))
        self.assertNotIn("Location", response.headers)
        self.assertEqual(self.stored(), [appointment(time="16:30")])

    def test_a_patch_that_changes_nothing_is_200(self):
        self.book(time="09:30")
        for body in ({}, {"date": "2026-11-25", "time": "09:30"}, {"colour": "ignored"},
                     {"user_id": "alice"}):
            with self.subTest(body=body):
                response = self.patch(body)
                self.assertEqual((response.status, response.json()),
                                 (200, appointment(time="09:30").as_json()))
        self.assertEqual(self.stored(), [appointment(time="09:30")])

    def test_plain_json_is_accepted_too(self):
        self.book()
        self.assertEqual(self.patch({"time": "11:00"}, media_type="application/json").status, 200)

    def test_a_percent_encoded_user_id_moves(self):
        self.book("a/b c", time="09:30")
        response = self.patch({"date": "2026-11-30"}, url="/appointments/a%2Fb%20c/2026-11-25")
        self.assertEqual(response.headers["Location"], "/appointments/a%2Fb%20c/2026-11-30")
        self.assertEqual(self.stored("a/b c"), [appointment("a/b c", "2026-11-30", "09:30")])

    def test_onto_a_held_date_is_409_with_that_appointment_and_nothing_moves(self):
        self.book(date="2026-11-25", time="09:30")
        held = self.book(date="2026-11-26", time="14:00").json()
        problem = self.assertProblem(self.patch({"date": "2026-11-26"}), 409)
        self.assertEqual(problem["appointment"], held)
        self.assertEqual(self.stored(), [appointment(date="2026-11-25", time="09:30"),
                                         appointment(date="2026-11-26", time="14:00")])

    INVALID = [  # 422, with the fields named, as for a booking
        ({"date": "2025-02-29"}, ["date"]),
        ({"time": "09:15"}, ["time"]),
        ({"date": "1999-12-31", "time": "24:00"}, ["date", "time"]),
        ({"date": None}, ["date"]),  # a merge patch's null removes: a date cannot go
        ({"time": None}, ["time"]),
        ({"user_id": "bob"}, ["user_id"]),  # an appointment stays with its user
        ({"user_id": ""}, ["user_id"]),
    ]

    def test_invalid_fields_are_422_and_nothing_moves(self):
        self.book(time="09:30")
        for body, fields in self.INVALID:
            with self.subTest(body=body):
                problem = self.assertProblem(self.patch(body), 422)
                self.assertEqual([error["field"] for error in problem["errors"]], fields)
                self.assertIn("was not moved", problem["detail"])
                self.assertEqual(self.stored(), [appointment(time="09:30")])

    def test_the_appointment_sent_back_changed_is_a_patch(self):
        shown = self.book(time="09:30").json()
        response = self.patch({**shown, "note": "Left knee"})
        self.assertEqual((response.status, response.json()), (200, {**shown, "note": "Left knee"}))
        moved = {**appointment(date="2026-11-26", time="10:00").as_json(), "note": "Left knee"}
        response = self.patch(moved)
        self.assertEqual((response.status, response.json()), (200, moved))
        self.assertEqual(self.stored(), [appointment(date="2026-11-26", time="10:00")._replace(
            note="Left knee")])

    def test_a_start_or_end_that_date_and_time_do_not_make_is_422_and_nothing_moves(self):
        # RFC 5789 section 2: a patch is applied whole or not at all. Ignored, a changed
        # start would have been a 200 that moved nothing.
        shown = self.book(time="09:30").json()
        cases = [({"start": "2026-11-25T15:00:00Z"}, ["start"]),
                 ({"time": "15:00", "start": "2026-11-25T15:00:00Z"}, ["start"]),
                 ({"end": shown["end"], "note": "x"}, ["end"]),
                 ({**shown, "start": "2026-11-25T15:00:00Z", "end": None}, ["start", "end"]),
                 ({**shown, "time": "15:00"}, ["start", "end"])]
        for body, fields in cases:
            with self.subTest(body=body):
                problem = self.assertProblem(self.patch(body), 422)
                self.assertEqual([error["field"] for error in problem["errors"]], fields)
                self.assertIn("date and time", problem["errors"][0]["message"])
                self.assertEqual(self.stored(), [appointment(time="09:30")])
        # Named with every other invalid field at once; only an unreadable date or time
        # leaves nothing to hold start and end to.
        problem = self.assertProblem(self.patch({"note": "a\u0000b",
                                                 "start": "2026-11-25T15:00:00Z"}), 422)
        self.assertEqual([error["field"] for error in problem["errors"]], ["note", "start"])

    def test_what_is_not_a_merge_patch_object_is_refused(self):
        self.book(time="09:30")
        cases = [("[1]", "application/merge-patch+json", 400),
                 ('"x"', "application/json", 400),
                 ("{", "application/merge-patch+json", 400),
                 ('{"time": "10:00"}', "text/plain", 415),
                 ('{"time": "10:00"}', "application/json-patch+json", 415)]
        for body, media_type, status in cases:
            with self.subTest(body=body, media_type=media_type):
                response = self.patch(body, media_type=media_type)
                self.assertProblem(response, status)
                if status == 415:  # RFC 5789 section 2.2
                    self.assertEqual(response.headers["Accept-Patch"],
                                     "application/merge-patch+json, application/json")
        self.assertEqual(self.stored(), [appointment(time="09:30")])

    def test_nothing_to_move_is_404(self):
        self.assertProblem(self.patch({"time": "10:00"}), 404)
        self.assertProblem(self.patch({"time": "10:00"}, url="/appointments/alice/2026-02-30"),
                           400)

    def test_options_names_the_patch_formats(self):
        response = self.request("OPTIONS", self.URL)
        self.assertEqual(response.status, 204)
        self.assertEqual(response.headers["Allow"], "GET, HEAD, PATCH, DELETE, OPTIONS")
        self.assertEqual(response.headers["Accept-Patch"],
                         "application/merge-patch+json, application/json")


@on_every_store
class ConditionalWriteTest(RouteTestCase):
    """If-Match and If-None-Match on PATCH and DELETE (RFC 9110 section 13): tested
    with the appointment as the change finds it; 412 when false, nothing changed."""

    URL = "/appointments/alice/2026-11-25"

    def setUp(self):
        super().setUp()
        self.book(time="09:30")
        self.tag = self.request("GET", self.URL).headers["ETag"]

    def patch(self, body, url=URL, **conditions) -> Response:
        return self.request("PATCH", url, json.dumps(body), {
            "Content-Type": "application/merge-patch+json",
            **{name.replace("_", "-"): value for name, value in conditions.items()}})

    def assertUnchanged(self):
        self.assertEqual(self.stored(), [appointment(time="09:30")])

    def assertPreconditionFailed(self, response: Response) -> dict:
        problem = self.assertProblem(response, 412)
        self.assertEqual(response.headers["ETag"], self.tag)  # the tag it has now
        self.assertEqual(problem["appointment"], appointment(time="09:30").as_json())
        self.assertUnchanged()
        return problem

    def test_a_patch_with_the_current_tag_is_applied_and_gives_the_new_one(self):
        response = self.patch({"time": "10:00"}, If_Match=self.tag)
        self.assertEqual(response.status, 200)
        got = self.request("GET", self.URL)
        self.assertEqual(response.headers["ETag"], got.headers["ETag"])
        self.assertNotEqual(response.headers["ETag"], self.tag)
        # the new tag chains the next edit, and the old one no longer does
        moved = self.patch({"date": "2026-11-26"}, If_Match=response.headers["ETag"])
        self.assertEqual(moved.status, 200)
        self.assertEqual(moved.headers["ETag"], self.request(
            "GET", moved.headers["Location"]).headers["ETag"])

    def test_a_stale_or_weak_tag_is_412_and_changes_nothing(self):
        for condition in ('"not-the-tag"', "W/" + self.tag, '"a", "b"', self.tag[:-2] + '"'):
            with self.subTest(condition=condition):
                problem = self.assertPreconditionFailed(self.patch({"time": "10:00"},
                                                                   If_Match=condition))
                self.assertIn("If-Match", problem["detail"])
                self.assertPreconditionFailed(self.request("DELETE", self.URL,
                                                           headers={"If-Match": condition}))

    def test_star_or_a_list_holding_the_tag_matches(self):
        for condition in ("*", f'"other", {self.tag}', f' {self.tag} '):
            with self.subTest(condition=condition):
                response = self.patch({"time": "11:00"}, If_Match=condition)
                self.assertEqual(response.status, 200)
                self.patch({"time": "09:30"})  # back, and so the same tag again
        self.assertEqual(self.request("DELETE", self.URL, headers={"If-Match": "*"}).status, 204)
        self.assertEqual(self.store.count(), 0)

    def test_if_none_match_on_a_write_is_412_when_it_matches(self):
        for condition in ("*", self.tag, "W/" + self.tag):  # weak comparison here
            with self.subTest(condition=condition):
                self.assertPreconditionFailed(self.patch({"time": "10:00"},
                                                         If_None_Match=condition))
                self.assertPreconditionFailed(self.request("DELETE", self.URL, headers={
                    "If-None-Match": condition}))
        self.assertEqual(self.patch({"time": "10:00"}, If_None_Match='"other"').status, 200)

    def test_only_a_request_that_would_otherwise_succeed_is_412(self):
        # RFC 9110 section 13.2.1: without the condition it would be 404, 409 or 422.
        self.book(date="2026-11-26", time="12:00")
        stale = '"stale"'
        self.assertProblem(self.patch({"time": "10:00"}, "/appointments/alice/2026-11-27",
                                      If_Match=stale), 404)
        self.assertProblem(self.patch({"time": "10:00"}, "/appointments/alice/2026-11-27",
                                      If_Match="*"), 404)
        self.assertProblem(self.request("DELETE", "/appointments/alice/2026-11-27",
                                        headers={"If-Match": "*"}), 404)
        self.assertProblem(self.patch({"date": "2026-11-26"}, If_Match=stale), 409)
        self.assertProblem(self.patch({"time": "09:15"}, If_Match=stale), 422)
        self.assertEqual(len(self.stored()), 2)

    # RFC 9110 section 5.6.1.2: a list's empty elements are ignored, so an empty
    # value, or commas alone, is a list of no tags. T is the appointment's tag.
    EMPTY_ELEMENTS = [  # (header, value, whether the write is made)
        ("If-Match", "{T},", True), ("If-Match", '"x", , {T}', True),
        ("If-Match", ", {T} ,,", True), ("If-Match", '"x",', False), ("If-Match", "", False),
        ("If-Match", ",", False), ("If-Match", " , ,", False),
        ("If-None-Match", "", True), ("If-None-Match", ",", True),
        ("If-None-Match", '"x", ,', True), ("If-None-Match", "{T},", False),
        ("If-None-Match", '"x", , W/{T}', False),
    ]

    def test_empty_list_elements_are_ignored_and_an_empty_if_match_holds_no_tag(self):
        for header, value, made in self.EMPTY_ELEMENTS:
            condition = {header: value.format(T=self.tag)}
            with self.subTest(header=header, value=value):
                patched = self.patch({"time": "11:00"}, **{header.replace("-", "_"): condition[
                    header]})
                if made:
                    self.assertEqual(patched.status, 200, patched.body)
                    self.patch({"time": "09:30"})  # back, and so the same tag again
                else:
                    self.assertPreconditionFailed(patched)
                deleted = self.request("DELETE", self.URL, headers=condition)
                if made:
                    self.assertEqual(deleted.status, 204, deleted.body)
                    self.book(time="09:30")
                else:
                    self.assertPreconditionFailed(deleted)
        self.assertUnchanged()

    def test_a_condition_that_cannot_be_read_is_400(self):
        for header, value in (("If-Match", "not-quoted"), ("If-Match", '"a" "b"'),
                              ("If-None-Match", "W/x"), ("If-Match", '*, "a"'),
                              ("If-None-Match", '"a",, b')):
            with self.subTest(header=header, value=value):
                problem = self.assertProblem(self.request("DELETE", self.URL, headers={
                    header: value}), 400)
                self.assertIn(f"{header} must be * or a list of entity tags", problem["detail"])
        self.assertUnchanged()

    def test_if_unmodified_since_is_ignored(self):
        # An appointment has no modification date to compare (RFC 9110 section 13.1.4).
        response = self.patch({"time": "10:00"},
                              If_Unmodified_Since="Sat, 01 Jan 2000 00:00:00 GMT")
        self.assertEqual(response.status, 200)


def kept_keys(store: scheduler.Store) -> int:
    """How many idempotency keys the store keeps now."""
    if isinstance(store, scheduler.SQLiteStore):
        return query(store.path, "SELECT count(*) FROM idempotency_keys")[0][0]
    return store.count_keys()


class BlockingStore(scheduler.InMemoryStore):
    """A store whose bookings wait, once inside, until the test lets them go on."""

    def __init__(self):
        super().__init__()
        self.inside, self.go_on = threading.Event(), threading.Event()

    def _book(self, appointment):
        self.inside.set()
        self.go_on.wait(10)
        return super()._book(appointment)


@on_every_store
class IdempotencyKeyTest(RouteTestCase):
    """Idempotency-Key on POST, PATCH and DELETE (draft-ietf-httpapi-idempotency-key-
    header-07): a retry gets the first response again, and changes nothing."""

    KEY = '"8e03978e-40d5-43e8-bc93-6894a57f9324"'
    BOOKING = {"user_id": "alice", "date": "2026-11-25", "time": "09:30"}

    def keyed(self, method, path, body=None, key=KEY, **headers) -> Response:
        if body is not None:
            headers["Content-Type"] = ("application/merge-patch+json" if method == "PATCH"
                                       else "application/json")
        return self.request(method, path, None if body is None else json.dumps(body),
                            {"Idempotency-Key": key, **headers})

    def assertReplayOf(self, retry: Response, first: Response):
        self.assertEqual((retry.status, retry.body), (first.status, first.body))
        for name in ("Location", "Content-Location", "ETag", "Content-Type"):
            self.assertEqual(retry.headers[name], first.headers[name], name)
        self.assertIsNone(first.headers["Idempotent-Replayed"])
        self.assertEqual(retry.headers["Idempotent-Replayed"], "true")

    def test_a_retried_booking_gets_its_201_again_and_books_once(self):
        first = self.keyed("POST", "/appointments", self.BOOKING)
        self.assertEqual(first.status, 201)
        self.assertTrue(first.headers["ETag"])  # which the replays keep
        for _ in range(3):
            self.assertReplayOf(self.keyed("POST", "/appointments", self.BOOKING), first)
        self.assertEqual(self.stored(), [appointment()])

    def test_an_error_is_replayed_too_though_what_caused_it_has_gone(self):
        self.book(time="15:00")  # in the way, without a key
        first = self.keyed("POST", "/appointments", self.BOOKING)
        self.assertProblem(first, 409)
        self.assertEqual(self.request("DELETE", "/appointments/alice/2026-11-25").status, 204)
        self.assertReplayOf(self.keyed("POST", "/appointments", self.BOOKING), first)
        self.assertEqual(self.stored(), [])

    def test_a_retried_patch_and_delete_get_their_first_answer(self):
        self.book()
        moved = self.keyed("PATCH", "/appointments/alice/2026-11-25", {"date": "2026-11-26"})
        self.assertEqual(moved.status, 200)
        self.assertReplayOf(self.keyed("PATCH", "/appointments/alice/2026-11-25",
                                       {"date": "2026-11-26"}), moved)
        other = '"cancel-1"'
        cancelled = self.keyed("DELETE", "/appointments/alice/2026-11-26", key=other)
        self.assertEqual(cancelled.status, 204)
        retry = self.keyed("DELETE", "/appointments/alice/2026-11-26", key=other)
        self.assertEqual((retry.status, retry.headers["Idempotent-Replayed"]), (204, "true"))
        self.assertEqual(self.stored(), [])

    def test_the_key_with_another_request_is_422_and_changes_nothing(self):
        self.assertEqual(self.keyed("POST", "/appointments", self.BOOKING).status, 201)
        for method, path, body in (
                ("POST", "/appointments", {**self.BOOKING, "time": "10:00"}),
                ("POST", "/appointments", {**self.BOOKING, "date": "2026-11-26"}),
                ("DELETE", "/appointments/alice/2026-11-25", None),
                ("PATCH", "/appointments/alice/2026-11-25", {"time": "11:00"})):
            with self.subTest(method=method, body=body):
                problem = self.assertProblem(self.keyed(method, path, body), 422)
                self.assertIn("another request", problem["detail"])
        self.assertEqual(self.stored(), [appointment()])

    def test_a_key_that_is_not_one_short_string_is_400(self):
        for key in ("8e03978e", '""', '"' + "k" * 256 + '"', '"é"', '"a", "b"', '"a";x=1',
                    '"a\\x"', "'a'", '"tab\tinside"'):
            with self.subTest(key=key):
                problem = self.assertProblem(self.keyed("POST", "/appointments", self.BOOKING,
                                                        key=key), 400)
                self.assertIn("Idempotency-Key must be one quoted string", problem["detail"])
        self.assertEqual(self.stored(), [])
        for key in ('"' + "k" * 255 + '"', '"a\\"b\\\\c"', '" spaced "'):
            with self.subTest(key=key):
                self.assertEqual(self.request("DELETE", "/appointments/alice/2026-11-25",
                                              headers={"Idempotency-Key": key}).status, 404)

    def test_a_request_refused_before_the_store_or_a_5xx_is_not_kept(self):
        invalid = self.keyed("POST", "/appointments", {**self.BOOKING, "time": "09:15"})
        self.assertProblem(invalid, 422)
        self.assertEqual(self.keyed("POST", "/appointments", self.BOOKING).status, 201)

    def test_keys_expire_after_24_hours(self):
        first = self.keyed("POST", "/appointments", self.BOOKING)
        later = time.time() + scheduler.KEY_LIFETIME + 1
        with mock.patch.object(scheduler.time, "time", return_value=later):
            retry = self.keyed("POST", "/appointments", self.BOOKING)
        self.assertEqual((first.status, retry.status), (201, 409))  # done again, so a conflict

    def with_quotas(self, **quotas) -> scheduler.Store:
        """A fresh store of this class's kind, with these bounds, behind self.client."""
        store = self.make_store()
        self.addCleanup(store.close)
        for name, value in quotas.items():
            setattr(store, name, value)
        self.store, self.client = store, Client(store)
        return store

    def flood(self, user_ids, count: int, prefix: str = "flood") -> None:
        """Keyed DELETEs of appointments that do not exist: each a 404, kept."""
        for n in range(count):
            user_id = user_ids[n % len(user_ids)]
            self.assertEqual(self.keyed("DELETE", f"/appointments/{user_id}/2026-11-25",
                                        key=f'"{prefix}-{n}"').status, 404)

    def test_keys_belong_to_the_user_the_request_names(self):
        first = self.keyed("POST", "/appointments", self.BOOKING)
        bobs = self.keyed("POST", "/appointments", {**self.BOOKING, "user_id": "bob"})
        self.assertEqual((first.status, bobs.status), (201, 201))  # the same key, bob's own
        self.assertIsNone(bobs.headers["Idempotent-Replayed"])
        self.assertReplayOf(self.keyed("POST", "/appointments", self.BOOKING), first)
        self.assertReplayOf(self.keyed("POST", "/appointments",
                                       {**self.BOOKING, "user_id": "bob"}), bobs)

    def test_a_flood_of_keys_never_makes_a_retry_book_twice(self):
        store = self.with_quotas(max_keys=20, max_keys_per_user=5)
        first = self.keyed("POST", "/appointments", self.BOOKING)
        moved = self.keyed("PATCH", "/appointments/alice/2026-11-25", {"date": "2026-11-26"},
                           key='"move-1"')
        self.assertEqual((first.status, moved.status), (201, 200))
        # Keyed 404s: from one user, then from as many users as the service keeps keys.
        self.flood(["mallory"], 50, "one")
        self.assertEqual(kept_keys(store), 2 + 5)
        self.flood([f"u{n}" for n in range(60)], 60, "many")
        self.assertEqual(kept_keys(store), 20)
        self.assertReplayOf(self.keyed("POST", "/appointments", self.BOOKING), first)
        self.assertReplayOf(self.keyed("PATCH", "/appointments/alice/2026-11-25",
                                       {"date": "2026-11-26"}, key='"move-1"'), moved)
        self.assertEqual(self.stored(), [appointment(date="2026-11-26")])

    def test_at_the_total_a_users_own_unchanged_keys_make_room_before_anyone_elses(self):
        store = self.with_quotas(max_keys=3)
        self.flood(["bob"], 1, "bob")  # the oldest, unchanged
        self.flood(["alice"], 1, "alice")
        self.assertEqual(self.keyed("POST", "/appointments", {**self.BOOKING, "user_id": "carol"},
                                    key='"carol"').status, 201)
        self.assertEqual(self.keyed("POST", "/appointments", self.BOOKING).status, 201)
        retry = self.keyed("DELETE", "/appointments/bob/2026-11-25", key='"bob-0"')
        self.assertEqual((retry.status, retry.headers["Idempotent-Replayed"]), (404, "true"))
        self.assertEqual(kept_keys(store), 3)

    def test_past_a_users_bound_a_key_of_a_change_is_refused_with_429(self):
        store = self.with_quotas(max_keys_per_user=2)
        self.flood(["alice"], 1)  # unchanged: makes room when needed
        for date in ("2026-11-25", "2026-11-26"):
            self.assertEqual(self.keyed("POST", "/appointments", {**self.BOOKING, "date": date},
                                        key=f'"{date}"').status, 201)
        refused = self.keyed("POST", "/appointments", {**self.BOOKING, "date": "2026-11-27"},
                             key='"third"')
        problem = self.assertProblem(refused, 429)
        self.assertIn("User alice has made 2 changes with an Idempotency-Key", problem["detail"])
        self.assertGreater(int(refused.headers["Retry-After"]), 24 * 3600 - 60)
        self.assertEqual(len(self.stored()), 2)  # nothing done that a retry could do again
        self.assertEqual(self.keyed("POST", "/appointments", {**self.BOOKING, "user_id": "bob"},
                                    key='"third"').status, 201)  # others are not touched
        self.assertEqual(self.book(date="2026-11-27").status, 201)  # and alice, unkeyed
        later = time.time() + scheduler.KEY_LIFETIME + 1
        with mock.patch.object(scheduler.time, "time", return_value=later):
            self.assertEqual(self.keyed("POST", "/appointments", {
                **self.BOOKING, "date": "2026-11-28"}, key='"third"').status, 201)
        self.assertEqual(kept_keys(store), 1)

    def test_at_the_total_bound_a_key_of_a_change_is_refused_with_503(self):
        store = self.with_quotas(max_keys=3)
        for user_id in ("a", "b", "c"):
            self.assertEqual(self.keyed("POST", "/appointments",
                                        {**self.BOOKING, "user_id": user_id}).status, 201)
        refused = self.keyed("POST", "/appointments", {**self.BOOKING, "user_id": "d"})
        self.assertIn("keeps its maximum of 3 Idempotency-Keys",
                      self.assertProblem(refused, 503)["detail"])
        self.assertGreater(int(refused.headers["Retry-After"]), 24 * 3600 - 60)
        self.assertEqual(self.stored("d"), [])
        self.assertEqual(self.metric("scheduler_idempotency_keys_refused_total"), 1)
        self.assertEqual(self.metric("scheduler_idempotency_keys"), 3)
        self.assertEqual(kept_keys(store), 3)
        self.assertEqual(self.book("d").status, 201)  # without a key: served

    def test_racing_retries_book_once(self):
        for round in range(5):
            store = self.make_store()
            self.addCleanup(store.close)
            client, barrier, responses = Client(store), threading.Barrier(6), []

            def retry():
                barrier.wait()
                responses.append(client.request("POST", "/appointments", self.BOOKING, {
                    "Idempotency-Key": f'"race-{round}"'}))

            run_all([threading.Thread(target=retry) for _ in range(6)])
            self.assertEqual(store.list_for_user("alice"), [appointment()])
            created = {response.body for response in responses if response.status == 201}
            self.assertEqual(len(created), 1)  # one booking, its 201 replayed
            self.assertTrue({response.status for response in responses} <= {201, 409})
            for response in responses:
                if response.status == 409:
                    self.assertIn("still being processed", response.json()["detail"])


class InFlightKeyTest(HTTPTestCase):
    def test_a_retry_while_the_first_is_under_way_is_409(self):
        store = BlockingStore()
        client, answers = Client(store), {}
        headers = {"Idempotency-Key": '"slow"'}
        first = threading.Thread(target=lambda: answers.setdefault("first", client.request(
            "POST", "/appointments", IdempotencyKeyTest.BOOKING, headers)))
        first.start()
        self.addCleanup(first.join)
        self.addCleanup(store.go_on.set)
        self.assertTrue(store.inside.wait(10))
        during = client.request("POST", "/appointments", IdempotencyKeyTest.BOOKING, headers)
        self.assertIn("still being processed", self.assertProblem(during, 409)["detail"])
        self.assertEqual(during.headers["Retry-After"], "1")
        store.go_on.set()
        first.join()
        self.assertEqual(answers["first"].status, 201)
        after = client.request("POST", "/appointments", IdempotencyKeyTest.BOOKING, headers)
        self.assertEqual((after.status, after.body), (201, answers["first"].body))


def book_many(store: scheduler.Store, user_id: str, count: int,
              first: dt.date = dt.date(2026, 1, 1)) -> None:
    """Book the user count appointments, one a day from first."""
    for day in range(count):
        store.book(scheduler.Appointment(user_id, dt.datetime.combine(
            first + dt.timedelta(days=day), dt.time(9), tzinfo=UTC)))


@on_every_store
class KeptRepliesTest(RouteTestCase):
    """A user with many appointments: the listing's and the feed's replies are kept
    until the user's appointments change, so polling them costs little."""

    URLS = ["/appointments?user_id=alice", "/appointments?user_id=alice&from=2026-01-01",
            "/appointments.ics?user_id=alice"]

    def setUp(self):
        super().setUp()
        book_many(self.store, "alice", scheduler.KEPT_FROM)
        reads = self.reads = mock.Mock()  # called at each read, a listing's or a feed's
        for name in ("list_for_user", "events"):
            mock.patch.object(self.store, name, lambda *args, read=getattr(self.store, name): (
                reads(), read(*args))[1]).start()
        self.addCleanup(mock.patch.stopall)

    def polled(self, url: str, times: int = 3) -> Response:
        """The last of times GETs of url, each after the second the same as the
        second: the first two are each made (a reply is kept from the second), and a
        feed made in another second has another DTSTAMP."""
        self.request("GET", url)
        first = self.request("GET", url)
        for _ in range(times - 2):
            again = self.request("GET", url)
            self.assertEqual((again.status, again.body, again.headers["ETag"]),
                             (first.status, first.body, first.headers["ETag"]))
        return again

    def test_a_polled_reply_is_made_twice_then_kept_304_included(self):
        for url in self.URLS:
            with self.subTest(url=url):
                self.reads.reset_mock()
                tag = self.polled(url, 5).headers["ETag"]
                self.assertEqual(self.reads.call_count, 2)  # the second one is kept
                unchanged = self.request("GET", url, headers={"If-None-Match": tag})
                self.assertEqual(unchanged.status, 304)
                self.assertEqual(self.reads.call_count, 2)

    def test_every_change_of_the_user_is_seen_at_once(self):
        json_type = {"Content-Type": "application/json"}
        changes = [
            lambda: self.book(date="2027-01-01"),
            lambda: self.request("PATCH", "/appointments/alice/2026-01-01", '{"note": "x"}',
                                 json_type),
            lambda: self.request("PATCH", "/appointments/alice/2026-01-02",
                                 '{"date": "2027-01-02"}', json_type),
            lambda: self.request("DELETE", "/appointments/alice/2026-01-03")]
        for change in changes:
            kept = [self.polled(url) for url in self.URLS]
            self.book("bob")  # another user's change changes nothing here
            self.request("DELETE", "/appointments/bob/2026-11-25")
            self.assertEqual([self.request("GET", url).body for url in self.URLS],
                             [reply.body for reply in kept])
            self.assertLess(change().status, 300)
            for url, old in zip(self.URLS, kept):
                new = self.request("GET", url)
                self.assertNotEqual((new.body, new.headers["ETag"]), (old.body, old.headers["ETag"]))
                fresh = Client(self.store).request("GET", url)  # made anew, not kept
                if "ics" not in url:
                    self.assertEqual(new.body, fresh.body)
                self.assertEqual(new.headers["ETag"], fresh.headers["ETag"])

    def test_a_reply_for_a_client_that_hung_up_is_not_made(self):
        self.client.client_gone = lambda: True
        for url in self.URLS:
            with self.subTest(url=url), self.assertRaises(scheduler.ClientGone):
                self.client.request("GET", url)
        small = self.request("GET", "/appointments?user_id=bob")  # not worth asking
        self.assertEqual(small.status, 200)


class KeptAcrossProcessesTest(unittest.TestCase):
    """A kept listing is dropped when another process (another worker on the SQLite
    file, another server on PostgreSQL) changes the user's appointments."""

    def stores(self) -> Tuple[scheduler.Store, scheduler.Store]:
        path = temporary_database(self)
        mine, theirs = (scheduler.SQLiteStore(path) for _ in range(2))
        for store in (mine, theirs):
            self.addCleanup(store.close)
        return mine, theirs

    def test_a_change_made_by_another_process_is_seen_at_once(self):
        mine, theirs = self.stores()
        book_many(mine, "alice", scheduler.KEPT_FROM)
        client = Client(mine)
        kept = [client.request("GET", "/appointments?user_id=alice") for _ in range(3)][-1]
        theirs.reschedule("alice", dt.date(2026, 1, 1), scheduler.Changes(
            details={"note": "from another worker"}))
        now = client.request("GET", "/appointments?user_id=alice")
        self.assertNotEqual(now.headers["ETag"], kept.headers["ETag"])
        self.assertEqual(now.json()["appointments"][0]["note"], "from another worker")


class KeptAcrossServersTest(KeptAcrossProcessesTest):
    def stores(self) -> Tuple[scheduler.Store, scheduler.Store]:
        mine = postgres_store(self)
        return mine, postgres_store(self, schema=mine.schema)


class ListingTest(unittest.TestCase):
    def test_a_listing_joined_from_kept_texts_is_json_content_byte_for_byte(self):
        for user_id, note in (("alice", None), ("😀" * 256, "🦴" * 500), ('q"\\\n', 'a\nb"c')):
            listed = [scheduler.Appointment(user_id, dt.datetime.combine(
                dt.date(2026, 1, 1) + dt.timedelta(days=day), dt.time(9, 30), tzinfo=UTC),
                note if day % 2 else None) for day in range(scheduler.KEPT_FROM * 2)]
            for count in (0, 1, scheduler.KEPT_FROM - 1, scheduler.KEPT_FROM, len(listed)):
                with self.subTest(user_id=user_id[:8], count=count):
                    reply = scheduler.listing(user_id, listed[:count])
                    content = scheduler.json_content({"user_id": user_id, "appointments": [
                        appointment.as_json() for appointment in listed[:count]]})
                    self.assertEqual(reply.body, content)
                    self.assertEqual(dict(reply.headers)["ETag"], scheduler.entity_tag(content))

    def test_the_kept_texts_take_at_most_what_the_readme_gives(self):
        with open(README, encoding="utf-8") as file:
            row = next(line for line in file if line.startswith("| kept "))
        self.assertIn(f"{scheduler.LISTED_KEPT:,} appointments' JSON", row)
        claimed = float(re.search(r"the JSON: ([\d.]+) MiB at worst", row).group(1))
        start = appointment().start

        def largest(number: int, length: int) -> str:
            # One emoji makes a string take four bytes a character, in the key and in its
            # JSON; the rest are quotes, which JSON writes as two characters (\").
            return f"{number:06d}😀" + '"' * (length - 7)

        def keep_all() -> None:
            for number in range(scheduler.LISTED_KEPT + 100):  # past the bound: the oldest go
                scheduler._listed(scheduler.Appointment(
                    largest(number, scheduler.MAX_USER_ID_LENGTH), start,
                    largest(number, scheduler.MAX_NOTE_LENGTH)))

        self.addCleanup(scheduler._listed.cache_clear)
        measures = []
        for _ in range(2):  # the less of two measures (traced_bytes())
            scheduler._listed.cache_clear()
            measures.append(traced_bytes(keep_all)[1] / 2**20)
            self.assertEqual(scheduler._listed.cache_info().currsize, scheduler.LISTED_KEPT)
        used = min(measures)
        self.assertLessEqual(used, claimed)
        self.assertGreater(used, 0.9 * claimed, "the README gives the worst case measured")


class EntityTagTest(unittest.TestCase):
    def test_a_tag_is_its_contents_sha_1_whether_made_or_kept(self):
        sizes = (0, 1, 100, scheduler._TAG_KEPT_LENGTH, scheduler._TAG_KEPT_LENGTH + 1)
        contents = [bytes([n % 256]) * size for n, size in enumerate(sizes * 2)]
        contents += [os.urandom(1000) for _ in range(3 * scheduler._TAGS_KEPT_BYTES // 1000)]
        for content in contents + contents:  # each made, then again: kept, or made anew
            expected = f'"{hashlib.sha1(content).hexdigest()}"'
            self.assertEqual(scheduler.entity_tag(content), expected)
            self.assertEqual(scheduler.entity_tag(content, weak=True), "W/" + expected)


class KeptRepliesBoundTest(unittest.TestCase):
    def test_past_the_budget_the_least_recently_used_go_first(self):
        store = scheduler.InMemoryStore()
        kept = scheduler.KeptReplies(budget=3000)
        made = collections.Counter()

        def reply(user_id):
            def make():
                made[user_id] += 1
                return scheduler.Reply(HTTPStatus.OK, b"x" * 1000), scheduler.KEPT_FROM
            return kept.reply(store, ("list", user_id), user_id, make)

        for user_id in "abc":
            book_many(store, user_id, 1)
            for _ in range(2):  # made, then made and kept
                reply(user_id)
        reply("a")  # kept: the most recently used now
        self.assertEqual(made, {"a": 2, "b": 2, "c": 2})
        book_many(store, "d", 1)
        reply("d"), reply("d")  # 4,000 bytes: b, the least recently used, goes
        reply("a"), reply("c"), reply("b")
        self.assertEqual(made, {"a": 2, "b": 3, "c": 2, "d": 2})


@on_every_store
class ConditionalGetTest(RouteTestCase):
    """ETag and If-None-Match (RFC 9110 sections 8.8.3 and 13.1.2) on what clients poll."""

    URLS = ["/appointments?user_id=alice", "/appointments/alice/2026-11-25",
            "/appointments.ics?user_id=alice"]

    def test_a_current_tag_gets_304_without_a_body(self):
        self.book()
        for url in self.URLS:
            for method in ("GET", "HEAD"):
                with self.subTest(url=url, method=method):
                    tag = self.request(method, url).headers["ETag"]
                    response = self.request(method, url, headers={"If-None-Match": tag})
                    self.assertEqual((response.status, response.body), (304, b""))
                    self.assertEqual(response.headers["ETag"], tag)
                    self.assertNotIn("Content-Type", response.headers)

    def test_if_match_is_evaluated_on_a_read_too(self):
        # RFC 9110 section 13.1.1: before any method, a GET or HEAD too; strong comparison,
        # so a weak tag (the feed's) never matches; "*" holds any current representation.
        self.book()
        for url in self.URLS + ["/healthz"]:  # /healthz: no ETag
            for method in ("GET", "HEAD"):
                with self.subTest(url=url, method=method):
                    tag = self.request(method, url).headers.get("ETag")
                    strong = tag is not None and not tag.startswith("W/")
                    met = ["*"] + ([tag, f'"stale", {tag}'] if strong else [])
                    unmet = ['"stale"', "not a tag"] + ([tag] if tag and not strong else [])
                    for condition in met:
                        response = self.request(method, url, headers={"If-Match": condition})
                        self.assertEqual(response.status, 200, condition)
                    for condition in unmet:
                        response = self.request(method, url, headers={"If-Match": condition})
                        self.assertEqual((response.status, response.headers.get("ETag")),
                                         (412, tag), condition)
                        if method == "GET":
                            detail = self.assertProblem(response, 412)["detail"]
                            self.assertIn("If-Match", detail)
                            self.assertEqual("neither * nor" in detail, condition == "not a tag")
        # Evaluated first (section 13.2.2), and a response that is not a 2xx ignores it.
        url = self.URLS[1]
        tag = self.request("GET", url).headers["ETag"]
        self.assertEqual(self.request("GET", url, headers={"If-Match": '"stale"',
                                                           "If-None-Match": tag}).status, 412)
        self.assertEqual(self.request("GET", "/appointments/alice/2026-11-26",
                                      headers={"If-Match": '"stale"'}).status, 404)

    def test_the_tag_changes_exactly_when_the_content_does(self):
        self.book("alice", "2026-11-25", "09:30")

        def tags():
            return [self.request("GET", url).headers["ETag"] for url in self.URLS]

        first = tags()
        self.assertEqual(tags(), first)
        self.book("bob", "2026-11-25", "10:00")  # someone else's: nothing here changes
        self.assertEqual(tags(), first)
        self.request("PATCH", "/appointments/alice/2026-11-25", '{"time": "11:00"}',
                     {"Content-Type": "application/json"})
        moved = tags()
        self.assertTrue(all(new != old for new, old in zip(moved, first)), (first, moved))
        self.request("PATCH", "/appointments/alice/2026-11-25", '{"time": "09:30"}',
                     {"Content-Type": "application/json"})
        back = tags()
        self.assertEqual(back[:2], first[:2])  # the same content, the same tag
        self.assertNotIn(back[2], (first[2], moved[2]))  # the event's third version (SEQUENCE)

    def test_the_feed_tag_leaves_out_when_it_was_made(self):
        self.book()
        first = self.request("GET", self.URLS[2])
        self.assertTrue(first.headers["ETag"].startswith('W/"'))  # the bytes differ: weak

        def stamp(response):
            return next(line for line in unfold(response.body.decode())
                        if line.startswith("DTSTAMP:"))

        made = scheduler.utc_now()

        def an_hour_later() -> dt.datetime:
            return made + dt.timedelta(hours=1)

        self.client.service.now = an_hour_later  # the Service's clock
        later = self.request("GET", self.URLS[2])
        self.assertNotEqual(stamp(later), stamp(first))
        self.assertEqual(later.headers["ETag"], first.headers["ETag"])
        response = self.request("GET", self.URLS[2],
                                headers={"If-None-Match": first.headers["ETag"]})
        self.assertEqual(response.status, 304)

    CONDITIONS = [  # If-None-Match: whether it matches a current tag T
        ("{T}", True), ("W/{T}", True), ('"other", {T}', True), ("*", True),
        ("{T},", True), ('"other", , {T}', True), (", W/{T}", True),
        ('"other"', False), ("", False), (",", False), ("{T}x", False), ("junk", False),
    ]

    def test_if_none_match_compares_weakly_and_takes_lists(self):
        self.book()
        tag = self.request("GET", self.URLS[0]).headers["ETag"]
        for condition, matches in self.CONDITIONS:
            with self.subTest(condition=condition):
                response = self.request("GET", self.URLS[0],
                                        headers={"If-None-Match": condition.format(T=tag)})
                self.assertEqual(response.status, 304 if matches else 200)

    def test_only_a_success_is_conditional(self):
        response = self.request("GET", self.URLS[1], headers={"If-None-Match": "*"})
        self.assertProblem(response, 404)  # nothing is there for * to match
        self.assertNotIn("ETag", response.headers)


class RequestIdTest(RouteTestCase):
    """Every response carries its request's ID in X-Request-ID: the client's own if it
    may be kept, else one made here; a problem says it too. (In memory alone: no
    store has a part in it but for a kept reply, which IdempotencyKeyTest replays on
    every store.)"""

    def requests(self) -> List[Tuple[str, str, Optional[dict], dict, int]]:
        """A request of each kind: (method, target, body, headers, status)."""
        self.book()
        listed = self.request("GET", "/appointments?user_id=alice")
        return [("GET", "/appointments?user_id=alice", None, {}, 200),
                ("HEAD", "/appointments?user_id=alice", None, {}, 200),
                ("GET", "/appointments?user_id=alice", None,
                 {"If-None-Match": listed.headers["ETag"]}, 304),
                ("POST", "/appointments", {"user_id": "bob", "date": "2026-11-25",
                                           "time": "09:30"}, {}, 201),
                ("OPTIONS", "/appointments", None, {}, 204),
                ("OPTIONS", "*", None, {}, 204),
                ("DELETE", "/appointments/bob/2026-11-25", None, {}, 204),
                ("GET", "/nowhere", None, {}, 404),
                ("PUT", "/appointments", None, {}, 405),
                ("POST", "/appointments", {"user_id": ""}, {}, 422),
                ("POST", "/appointments", "[", {"Content-Type": "application/json"}, 400),
                ("GET", "/appointments?user_id=alice", None, {"If-None-Match": "W/"}, 200)]

    def test_a_clients_id_comes_back_on_every_response_and_in_every_problem(self):
        for method, target, body, headers, status in self.requests():
            with self.subTest(method=method, target=target, status=status):
                response = self.request(method, target, body,
                                        {**headers, "X-Request-ID": "client-7_A.b~!"})
                self.assertEqual(response.status, status)
                self.assertEqual(response.headers["X-Request-ID"], "client-7_A.b~!")
                if status >= 400:
                    problem = self.assertProblem(response, status)
                    self.assertEqual(problem["request_id"], "client-7_A.b~!")
                    self.assertNotIn("instance", problem)

    def test_without_an_id_that_may_be_kept_one_is_made(self):
        seen = set()
        for given in (None, "", "a b", "x" * (scheduler.MAX_REQUEST_ID_LENGTH + 1), 'a"b',
                      "caf\xc3\xa9"):
            for method, target, body, headers, status in self.requests():
                with self.subTest(given=given, method=method, target=target):
                    sent = {**headers, **({} if given is None else {"X-Request-ID": given})}
                    response = self.request(method, target, body, sent)
                    made = response.headers["X-Request-ID"]
                    made_request_id(self, made)
                    self.assertNotIn(made, seen)
                    seen.add(made)
                    if status >= 400:
                        problem = self.assertProblem(response, status)
                        self.assertEqual(problem["instance"], "urn:uuid:" + made)
                        self.assertNotIn("request_id", problem)

    def test_a_clients_uuid_is_the_problems_instance(self):
        given = "5E0B3C8A-2F71-4C4D-9A1E-3B6F0D2C7A15"  # a version 4, from uuid.uuid4()
        response = self.request("GET", "/nowhere", headers={"X-Request-ID": given})
        self.assertEqual(response.headers["X-Request-ID"], given)  # as sent
        self.assertEqual(self.assertProblem(response, 404)["instance"],
                         "urn:uuid:" + given.lower())

    def test_a_replayed_error_keeps_its_first_instance_and_says_its_own_id(self):
        self.book(time="15:00")
        key = {"Idempotency-Key": '"k"'}
        first = self.book(headers=key)
        again = self.book(headers=key)
        self.assertEqual(again.headers["Idempotent-Replayed"], "true")
        self.assertEqual(again.body, first.body)  # byte for byte, so the first's instance
        self.assertEqual(self.assertProblem(again, 409)["instance"],
                         "urn:uuid:" + first.headers["X-Request-ID"])
        self.assertNotEqual(again.headers["X-Request-ID"], first.headers["X-Request-ID"])

    def test_browsers_may_send_it_and_read_it(self):
        self.client = Client(self.store, cors_origins=(ORIGIN,))
        preflight = self.request("OPTIONS", "/appointments", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-request-id"})
        self.assertEqual(preflight.status, 204)
        allowed = [name.strip().lower()
                   for name in preflight.headers["Access-Control-Allow-Headers"].split(",")]
        self.assertIn("x-request-id", allowed)
        made_request_id(self, preflight.headers["X-Request-ID"])
        for response in (self.book(headers={"Origin": ORIGIN}),
                         self.request("GET", "/nowhere", headers={"Origin": ORIGIN})):
            exposed = [name.strip() for name in
                       response.headers["Access-Control-Expose-Headers"].split(",")]
            self.assertIn("X-Request-ID", exposed)
        # A script reads what a 405 and a 415 say to do next (Fetch: the headers
        # exposed are the safelisted ones and those listed).
        for response, name in ((self.request("PUT", "/appointments", headers={"Origin": ORIGIN}),
                                "Allow"),
                               (self.request("PATCH", "/appointments/alice/2026-11-25", b"{}", {
                                   "Origin": ORIGIN, "Content-Type": "text/plain"}),
                                "Accept-Patch")):
            self.assertIn(name, response.headers)
            self.assertIn(name, [exposed.strip() for exposed in
                                 response.headers["Access-Control-Expose-Headers"].split(",")])

    def test_a_500_is_logged_with_its_id_beside_the_traceback(self):
        self.client = Client(BrokenStore())
        response = self.book(headers={"X-Request-ID": "support-ticket-1234"})
        problem = self.assertProblem(response, 500)
        self.assertEqual(problem["request_id"], "support-ticket-1234")
        self.assertNotIn("disk on fire", json.dumps(problem))
        logged, = self.client.logged
        fields, = self.client.fields
        self.assertIn("support-ticket-1234", logged.partition("\n")[0])
        self.assertIn("RuntimeError: disk on fire", logged)
        self.assertEqual(fields["request_id"], "support-ticket-1234")
        self.assertIn("RuntimeError: disk on fire", fields["traceback"])


@on_every_store
class NoteTest(RouteTestCase):
    """An appointment's note for the practitioner: booked with it, shown wherever the
    appointment is, changed and removed by PATCH."""

    NOTE = "Knee, left; see the X-ray\\2026.\nA second line, with a comma, and more: " + "é" * 40

    def test_shown_wherever_the_appointment_is(self):
        response = self.book(note=self.NOTE)
        self.assertEqual((response.status, response.json()["note"]), (201, self.NOTE))
        for path in ("/appointments/alice/2026-11-25", "/appointments?user_id=alice"):
            with self.subTest(path=path):
                shown = self.request("GET", path).json()
                self.assertEqual(shown.get("note", shown.get("appointments", [{}])[0].get("note")),
                                 self.NOTE)
        self.book(date="2026-11-26")
        listed = self.request("GET", "/appointments?user_id=alice").json()["appointments"]
        self.assertNotIn("note", listed[1])  # none: absent

    def test_in_the_feed_as_a_description_escaped_and_folded(self):
        self.book(note=self.NOTE)
        feed = self.request("GET", "/appointments.ics?user_id=alice").body.decode()
        for line in feed.split("\r\n"):
            self.assertLessEqual(len(line.encode()), 75)
        self.assertIn("DESCRIPTION:Knee\\, left\\; see the X-ray\\\\2026.\\nA second line\\, "
                      "with a comma\\, and more: " + "é" * 40, unfold(feed))

    def test_invalid_notes_are_422_naming_note_and_nothing_is_booked(self):
        for note in (42, ["a"], "x" * 501, "a\tb", "a\u200bb", "a\u2028b"):
            with self.subTest(note=note):
                problem = self.assertProblem(self.book(note=note), 422)
                self.assertEqual([error["field"] for error in problem["errors"]], ["note"])
        self.assertEqual(self.stored(), [])

    def test_patch_sets_changes_keeps_and_removes_it(self):
        self.book()
        url = "/appointments/alice/2026-11-25"
        cases = [({"note": "first"}, 200, "first"), ({"note": "second"}, 200, "second"),
                 ({"time": "10:00"}, 200, "second"),  # left out: kept
                 ({"note": "x" * 501}, 422, "second"),  # refused: unchanged
                 ({"note": None}, 200, None),  # RFC 7396: null removes it
                 ({"note": "again"}, 200, "again"), ({"note": ""}, 200, None)]
        for body, status, note in cases:
            with self.subTest(body=body):
                response = self.request("PATCH", url, body,
                                        {"Content-Type": "application/merge-patch+json"})
                self.assertEqual(response.status, status, response.body)
                self.assertEqual(self.request("GET", url).json().get("note"), note)

    def test_documented_with_its_limit(self):
        schemas = self.request("GET", "/openapi.json").json()["components"]["schemas"]
        for schema in ("NewAppointment", "AppointmentPatch", "Appointment"):
            with self.subTest(schema=schema):
                note = schemas[schema]["properties"]["note"]
                self.assertEqual(note["maxLength"], scheduler.MAX_NOTE_LENGTH)
                self.assertNotIn("note", schemas[schema].get("required", []))


class SQLiteHealthTest(OnSQLite, RouteTestCase):
    def test_healthy_while_the_database_answers(self):
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        self.store.close()
        problem = self.assertProblem(self.request("GET", "/healthz"), 503)
        self.assertIn("database", problem["detail"])


def unfold(feed: str) -> list:
    """The content lines of an iCalendar object (RFC 5545 section 3.1)."""
    return feed.replace("\r\n ", "").replace("\r\n\t", "").split("\r\n")[:-1]


@on_every_store
class CalendarFeedTest(RouteTestCase):
    def feed(self, user_id: str) -> Response:
        query = urllib.parse.urlencode({"user_id": user_id})
        response = self.request("GET", f"/appointments.ics?{query}")
        self.assertEqual(response.status, 200)
        # RFC 5545 section 8.1: a stream whose objects have one METHOD names it in its
        # media type's method parameter too.
        self.assertEqual(response.headers["Content-Type"],
                         "text/calendar; charset=utf-8; method=PUBLISH")
        self.assertEqual([line for line in unfold(response.body.decode())
                          if line.startswith("METHOD:")], ["METHOD:PUBLISH"])
        return response

    def events(self, lines: list) -> list:
        events, current = [], None
        for line in lines:
            if line == "BEGIN:VEVENT":
                current = {}
            elif line == "END:VEVENT":
                events.append(current)
                current = None
            elif current is not None:
                name, _, value = line.partition(":")
                current[name] = value
        return events

    def test_feed_has_one_event_per_appointment(self):
        booked_from = dt.datetime.now(UTC).replace(microsecond=0)
        self.book("alice", "2026-11-26", "23:30")
        self.book("alice", "2026-11-25", "09:00")
        self.book("bob", "2026-11-25", "09:00")
        before = dt.datetime.now(UTC).replace(microsecond=0)
        lines = unfold(self.feed("alice").body.decode("utf-8"))
        after = dt.datetime.now(UTC)
        self.assertEqual(lines[:2], ["BEGIN:VCALENDAR", "VERSION:2.0"])
        self.assertTrue(any(line.startswith("PRODID:") for line in lines))
        self.assertEqual(lines[-1], "END:VCALENDAR")
        events = self.events(lines)
        self.assertEqual([(e["DTSTART"], e["DTEND"]) for e in events],
                         [("20261125T090000Z", ends("2026-11-25", "09:00", ICALENDAR_INSTANT)),
                          ("20261126T233000Z", ends("2026-11-26", "23:30", ICALENDAR_INSTANT))])
        for event in events:
            self.assertEqual(event["SUMMARY"], scheduler.CALENDAR_SUMMARY)
            stamp = dt.datetime.strptime(event["DTSTAMP"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            self.assertTrue(before <= stamp <= after)
            # As booked: the first version (RFC 5545 section 3.8.7.4), changed when booked.
            self.assertEqual(event["SEQUENCE"], "0")
            changed = dt.datetime.strptime(event["LAST-MODIFIED"], "%Y%m%dT%H%M%SZ").replace(
                tzinfo=UTC)
            self.assertTrue(booked_from <= changed <= before)
        self.assertEqual(len({e["UID"] for e in events}), 2)

    def test_uids_are_stable_and_differ_between_users(self):
        self.book("alice")
        self.book("bob")
        first = self.events(unfold(self.feed("alice").body.decode()))[0]["UID"]
        again = self.events(unfold(self.feed("alice").body.decode()))[0]["UID"]
        other = self.events(unfold(self.feed("bob").body.decode()))[0]["UID"]
        self.assertEqual(first, again)
        self.assertNotEqual(first, other)

    def test_a_moved_appointment_is_the_same_event_with_its_changes_counted(self):
        clock = [dt.datetime(2026, 11, 20, 8, 0, tzinfo=UTC)]  # the store's
        self.store.clock = lambda: int(clock[0].timestamp()) * 10**9
        self.client.service.now = lambda: dt.datetime(2026, 11, 21, tzinfo=UTC)  # DTSTAMP
        self.book("alice", "2026-11-25", "09:30")
        (booked,) = self.events(unfold(self.feed("alice").body.decode()))
        self.assertEqual((booked["SEQUENCE"], booked["LAST-MODIFIED"], booked["DTSTART"]),
                         ("0", "20261120T080000Z", "20261125T093000Z"))
        url = "/appointments/alice/2026-11-25"
        for sequence, (patch, start) in enumerate(((
                {"date": "2026-11-26", "time": "10:00"}, "20261126T100000Z"),
                ({"note": "Left knee"}, "20261126T100000Z")), 1):
            clock[0] += dt.timedelta(hours=1)
            response = self.request("PATCH", url, patch)
            self.assertEqual(response.status, 200, response.body)
            url = response.headers.get("Location", url)
            (event,) = self.events(unfold(self.feed("alice").body.decode()))
            self.assertEqual(event["UID"], booked["UID"])  # the same event, moved or changed
            self.assertEqual((event["SEQUENCE"], event["LAST-MODIFIED"], event["DTSTART"]),
                             (str(sequence), f"{clock[0]:%Y%m%dT%H%M%SZ}", start))
        unchanged = self.feed("alice")
        clock[0] += dt.timedelta(hours=1)
        self.assertEqual(self.request("PATCH", url, {"note": "Left knee"}).status, 200)
        again = self.feed("alice")  # a change to what it is changes nothing, nor its tag
        self.assertEqual((again.body, again.headers["ETag"]),
                         (unchanged.body, unchanged.headers["ETag"]))
        self.assertEqual(self.request("DELETE", url).status, 204)
        self.book("alice", "2026-11-26", "10:00")  # the same slot again: a new event
        (rebooked,) = self.events(unfold(self.feed("alice").body.decode()))
        self.assertNotEqual(rebooked["UID"], booked["UID"])
        self.assertEqual((rebooked["SEQUENCE"], rebooked["LAST-MODIFIED"]),
                         ("0", f"{clock[0]:%Y%m%dT%H%M%SZ}"))

    def test_lines_end_in_crlf_and_fold_at_75_octets(self):
        user_id = "Zoë, née; Ünïcödé \\ " + "東京" * 40  # long, multi-byte, to escape
        self.book(user_id)
        raw = self.feed(user_id).body
        self.assertTrue(raw.endswith(b"\r\n"))
        self.assertNotIn(b"\n", raw.replace(b"\r\n", b""))  # no bare line feeds
        physical = raw.split(b"\r\n")[:-1]
        self.assertTrue(all(len(line) <= 75 for line in physical))
        self.assertTrue(any(line.startswith(b" ") for line in physical), "nothing was folded")
        for line in physical:
            line.decode("utf-8")  # no character was split by folding
        name = next(line for line in unfold(raw.decode()) if line.startswith("X-WR-CALNAME:"))
        self.assertEqual(name, "X-WR-CALNAME:Appointments of Zoë\\, née\\; Ünïcödé \\\\ "
                         + "東京" * 40)

    def components(self, lines: list) -> list:
        """The names of the calendar's components (RFC 5545 section 3.6), in order."""
        depth, names = 0, []
        for line in lines:
            if line.startswith("BEGIN:"):
                depth += 1
                if depth == 2:
                    names.append(line[6:])
            elif line.startswith("END:"):
                depth -= 1
        self.assertEqual(depth, 0)
        return names

    def test_user_without_appointments_gets_a_calendar_with_no_events(self):
        lines = unfold(self.feed("nobody").body.decode())
        self.assertEqual(self.events(lines), [])
        self.assertEqual((lines[0], lines[-1]), ("BEGIN:VCALENDAR", "END:VCALENDAR"))
        # Still a valid calendar: "1*component" (RFC 5545 section 3.6). Its one
        # component describes UTC, which no time in the feed refers to by TZID.
        self.assertEqual(self.components(lines), ["VTIMEZONE"])
        self.assertIn("TZID:UTC", lines)
        self.assertIn("TZOFFSETTO:+0000", lines)
        self.assertFalse(any(";TZID=" in line for line in lines))

    def test_a_calendar_with_events_holds_only_them(self):
        self.book("alice")
        lines = unfold(self.feed("alice").body.decode())
        self.assertEqual(self.components(lines), ["VEVENT"])

    def test_user_id_is_required(self):
        self.assertProblem(self.request("GET", "/appointments.ics"), 400)


class NegotiateTest(unittest.TestCase):
    """negotiate(): which of a resource's media types an Accept header prefers
    (RFC 9110 section 12.5.1), for one that is HTML by default, or JSON (as GET / is)."""

    OFFERED = HTML, JSON = ("text/html; charset=utf-8", "application/json")
    CASES = [  # (Accept, the type chosen; None: neither, a 406)
        (None, HTML), ("", HTML), ("*/*", HTML), ("text/html", HTML), ("TEXT/HTML", HTML),
        ("application/json", JSON), ("application/*", JSON), ("text/*", HTML),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", HTML),  # Chrome's
        ("application/json, text/html;q=0.9", JSON), ("text/html;q=0.5, application/*", JSON),
        ("text/*;q=0.1, application/json;q=0.2", JSON), ("application/json;q=0, */*", HTML),
        ("text/html;q=0, */*", JSON), ("*/*;q=0.5, text/html;q=0.4", JSON),  # the specific wins
        ("text/html;charset=UTF-8", HTML), ("text/html;charset=latin1", None),
        ('text/html;level="a,b", application/json;q=0.2', JSON),  # a comma in quotes
        ("application/json; q=0.5; ext=1, text/html;q=0.4", JSON),  # an extension after q
        ("image/png", None), ("text/plain, image/*", None), ("*/*;q=0", None),
        # Ranges that cannot be read are skipped; with none left, Accept is as if absent.
        ("application/json;q=abc", HTML), ("application/json;q=1.5, text/html;q=0.1", HTML),
        ("*/json", HTML), ("json", HTML), ("image/png, nonsense", None)]

    def test_cases(self):
        for accept, chosen in self.CASES:
            with self.subTest(accept=accept):
                self.assertEqual(scheduler.negotiate(accept, self.OFFERED), chosen)


class PagesTest(RouteTestCase):
    """GET / and the API reference at /docs (a page and its script): what they are
    sent as, their tags and 304s, HEAD, and the security headers that let the
    reference run its own script alone."""

    PAGES = ("/", "/docs", "/docs.js")

    def test_the_root_page_names_the_service_and_links_to_the_rest(self):
        response = self.request("GET", "/")
        self.assertEqual((response.status, response.headers["Content-Type"]),
                         (200, "text/html; charset=utf-8"))
        self.assertEqual(response.headers["Vary"], "Accept")
        page = response.body.decode()
        self.assertIn(f"<title>Appointment scheduler {scheduler.__version__}</title>", page)
        for path in ("/docs", "/openapi.json", "/healthz", "/metrics"):
            self.assertIn(f'<a href="{path}">', page)

    def test_as_json_it_says_the_same_and_its_links_work(self):
        response = self.request("GET", "/", headers={"Accept": "application/json"})
        self.assertEqual((response.status, response.headers["Content-Type"],
                          response.headers["Vary"]), (200, "application/json", "Accept"))
        self.assertEqual(response.json(), {
            "name": "Appointment scheduler", "version": scheduler.__version__,
            "links": {"docs": "/docs", "openapi": "/openapi.json", "health": "/healthz",
                      "metrics": "/metrics"}})
        self.assertEqual(response.json(), scheduler.openapi_document()["paths"]["/"]["get"][
            "responses"]["200"]["content"]["application/json"]["examples"]["home"]["value"])
        for url in response.json()["links"].values():
            with self.subTest(url=url):
                self.assertEqual(self.request("GET", url).status, 200)

    def test_accept_chooses_and_one_that_takes_neither_gets_406(self):
        chrome = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        for accept, media_type in ((chrome, "text/html; charset=utf-8"),
                                   ("application/json, text/html;q=0.5", "application/json"),
                                   ("text/html;q=0, */*", "application/json")):
            with self.subTest(accept=accept):
                response = self.request("GET", "/", headers={"Accept": accept})
                self.assertEqual(response.headers["Content-Type"], media_type)
        refused = self.request("GET", "/", headers={"Accept": "image/png"})
        problem = self.assertProblem(refused, 406)
        self.assertEqual(refused.headers["Vary"], "Accept")
        self.assertIn("text/html or application/json", problem["detail"])

    def test_each_carries_its_etag_and_answers_if_none_match_with_304(self):
        for path, accept in (("/", "text/html"), ("/", "application/json"), ("/docs", None),
                             ("/docs.js", None)):
            with self.subTest(path=path, accept=accept):
                headers = {"Accept": accept} if accept else {}
                first = self.request("GET", path, headers=headers)
                tag = first.headers["ETag"]
                self.assertEqual(tag, scheduler.entity_tag(first.body))
                for method in ("GET", "HEAD"):
                    again = self.request(method, path, headers={**headers, "If-None-Match": tag})
                    self.assertEqual((again.status, again.body, again.headers["ETag"]),
                                     (304, b"", tag))
                    self.assertEqual(again.headers.get("Vary"), first.headers.get("Vary"))
                other = self.request("GET", path, headers={**headers, "If-None-Match": '"x"'})
                self.assertEqual((other.status, other.body), (200, first.body))
        html = self.request("GET", "/").headers["ETag"]  # each representation has its own
        as_json = self.request("GET", "/", headers={"Accept": "application/json",
                                                    "If-None-Match": html})
        self.assertEqual(as_json.status, 200)

    def test_head_sends_the_headers_of_get_alone(self):
        for path in self.PAGES:
            with self.subTest(path=path):
                got, head = self.request("GET", path), self.request("HEAD", path)
                self.assertEqual((head.status, head.body), (200, b""))
                self.assertEqual(without_varying_lines(str(head.headers)),
                                 without_varying_lines(str(got.headers)))

    def test_the_reference_runs_its_own_script_alone(self):
        page = self.request("GET", "/docs")
        self.assertEqual(page.headers["Content-Type"], "text/html; charset=utf-8")
        policy = dict(part.strip().split(" ", 1) for part in
                      page.headers["Content-Security-Policy"].split(";"))
        html = page.body.decode()
        style = re.search(r"<style>(.*?)</style>", html, re.DOTALL).group(1)
        style_hash = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        self.assertEqual(policy, {
            "default-src": "'none'", "script-src": "'self'", "connect-src": "'self'",
            "style-src": f"'sha256-{style_hash}'", "base-uri": "'none'",
            "form-action": "'none'", "frame-ancestors": "'none'",
            "require-trusted-types-for": "'script'"})
        self.assertEqual(re.findall(r"<script[^>]*>", html),
                         ['<script src="/docs.js" defer>'])  # no script written inline
        self.assertNotRegex(html, r"\son[a-z]+=")  # nor in attributes
        script = self.request("GET", "/docs.js")
        self.assertEqual(script.headers["Content-Type"], "text/javascript; charset=utf-8")
        home = self.request("GET", "/").headers["Content-Security-Policy"]
        self.assertEqual(home, "; ".join(f"{name} {value}" for name, value in policy.items()
                                         if name not in ("script-src", "connect-src",
                                                         "require-trusted-types-for")))
        for response in (page, script, self.request("GET", "/")):
            with self.subTest(content_type=response.headers["Content-Type"]):
                self.assertEqual((response.headers["X-Content-Type-Options"],
                                  response.headers["X-Frame-Options"],
                                  response.headers["Referrer-Policy"]),
                                 ("nosniff", "DENY", "no-referrer"))

    def test_nothing_comes_from_elsewhere(self):
        for path in self.PAGES:
            with self.subTest(path=path):
                text = self.request("GET", path).body.decode()
                self.assertNotRegex(text, r"(?i)(?:https?:|[\"'(=\s])//[a-z0-9]")  # no origin
                self.assertNotRegex(text, r"\binnerHTML\b|\beval\(|document\.write")

    def test_the_pages_are_made_once(self):
        first = [self.request("GET", path).body for path in self.PAGES]
        with mock.patch.object(scheduler, "home_page", side_effect=AssertionError("made again")), \
                mock.patch.object(scheduler, "_page_reply",
                                  side_effect=AssertionError("made again")):
            self.assertEqual([self.request("GET", path).body for path in self.PAGES], first)


def as_in_examples(problem: dict) -> dict:
    """A problem with the instance of the API description's examples in place of its
    own (a request's X-Request-ID, new each time), if it has one."""
    if not re.fullmatch(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-"
                        r"[0-9a-f]{12}", problem.get("instance", "")):
        return problem
    return {**problem, "instance": "urn:uuid:" + scheduler._REQUEST_ID_EXAMPLE}


class OpenAPITest(RouteTestCase):
    def document(self) -> dict:
        response = self.request("GET", "/openapi.json")
        self.assertEqual(response.status, 200)
        return response.json()

    def test_it_carries_its_etag_and_answers_if_none_match_with_304(self):
        first = self.request("GET", "/openapi.json")
        tag = first.headers["ETag"]
        self.assertEqual(tag, scheduler.entity_tag(first.body))
        again = self.request("GET", "/openapi.json", headers={"If-None-Match": tag})
        self.assertEqual((again.status, again.body, again.headers["ETag"]), (304, b"", tag))
        other = self.request("GET", "/openapi.json", headers={"If-None-Match": '"other"'})
        self.assertEqual(other.status, 200)

    def test_paths_and_methods_are_exactly_the_routes(self):
        document = self.document()
        self.assertEqual(document["openapi"], "3.1.0")
        paths = document["paths"]
        described = {(path, method.upper()) for path, item in paths.items()
                     for method in item if method not in ("head", "options")}
        self.assertEqual(described, {(route.path, route.method) for route in scheduler.ROUTES})
        for path, item in paths.items():
            with self.subTest(path=path):
                self.assertIn("options", item)
                self.assertEqual("head" in item, "get" in item)

    def test_every_reference_resolves(self):
        document = self.document()

        def walk(node):
            if isinstance(node, dict):
                if "$ref" in node:
                    self.assertTrue(node["$ref"].startswith("#/"), node["$ref"])
                    target = document
                    for part in node["$ref"][2:].split("/"):
                        target = target[part]  # a KeyError fails the test
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(document)

    def examples(self, content: dict) -> dict:
        return {name: example["value"] for name, example in content.get("examples", {}).items()}

    def documented_response(self, operation: dict, name: str):
        """The status and body of the response example called name."""
        for status, response in operation["responses"].items():
            for content in response.get("content", {}).values():
                if name in self.examples(content):
                    return int(status), self.examples(content)[name]
        self.fail(f"no response example is called {name!r}")

    def test_request_examples_get_the_response_example_of_the_same_name(self):
        operation = self.document()["paths"]["/appointments"]["post"]
        requests = self.examples(operation["requestBody"]["content"]["application/json"])
        self.assertEqual(set(requests), {"book", "with-a-note"})
        for name, body in requests.items():
            with self.subTest(example=name):
                fresh = Client(scheduler.InMemoryStore())  # an empty store
                response = fresh.request("POST", "/appointments", body)
                self.assertEqual((response.status, response.json()),
                                 self.documented_response(operation, name))
                self.assertEqual(response.status, 201)  # tools offer them as valid requests

    def test_the_invalid_fields_example_is_what_such_a_booking_gets(self):
        operation = self.document()["paths"]["/appointments"]["post"]
        response = Client(scheduler.InMemoryStore()).request("POST", "/appointments", {
            "user_id": "", "date": "2025-02-29", "time": scheduler.example_unbookable_time()})
        self.assertEqual((response.status, as_in_examples(response.json())),
                         self.documented_response(operation, "invalid-fields"))

    def test_every_operation_has_a_unique_id(self):
        ids = [operation["operationId"] for item in self.document()["paths"].values()
               for operation in item.values()]
        self.assertEqual(len(ids), 30)
        self.assertEqual(len(set(ids)), len(ids))
        self.assertTrue(all(re.fullmatch(r"[a-z][A-Za-z]+", name) for name in ids), ids)
        paths = self.document()["paths"]
        self.assertEqual(paths["/appointments"]["post"]["operationId"], "bookAppointment")
        self.assertEqual(paths["/appointments"]["head"]["operationId"], "headListAppointments")
        names = {tag["name"] for tag in self.document()["tags"]}
        for item in paths.values():
            for operation in item.values():
                self.assertTrue(operation["tags"] and set(operation["tags"]) <= names)

    def test_head_responses_have_no_content(self):
        heads = {path: item["head"] for path, item in self.document()["paths"].items()
                 if "head" in item}
        self.assertEqual(len(heads), 9)
        for path, operation in heads.items():
            for status, response in operation["responses"].items():
                with self.subTest(path=path, status=status):
                    self.assertNotIn("content", response)
                    self.assertNotIn("$ref", response)
                    self.assertTrue(response["description"])

    def test_the_document_is_made_once_and_tagged(self):
        first = self.request("GET", "/openapi.json")
        tag = first.headers["ETag"]
        self.assertEqual(tag, '"%s"' % hashlib.sha1(first.body).hexdigest())
        with mock.patch.object(scheduler, "openapi_document",
                               side_effect=AssertionError("made again")):
            again = self.request("GET", "/openapi.json")
            self.assertEqual((again.status, again.body, again.headers["ETag"]),
                             (200, first.body, tag))
            for method in ("GET", "HEAD"):
                unchanged = self.request(method, "/openapi.json", headers={"If-None-Match": tag})
                self.assertEqual((unchanged.status, unchanged.body), (304, b""))
        operation = self.document()["paths"]["/openapi.json"]["get"]
        self.assertIn("304", operation["responses"])
        self.assertIn("ETag", operation["responses"]["200"]["headers"])

    def test_servers_and_the_version(self):
        document = self.document()
        self.assertEqual(document["servers"][0]["url"], "/")
        self.assertEqual(document["info"]["version"], scheduler.__version__)
        self.assertEqual(self.request("GET", "/healthz").headers["Server"],
                         f"scheduler/{scheduler.__version__}")

    def test_reschedule_example_gets_the_response_example(self):
        document = self.document()
        book = self.examples(document["paths"]["/appointments"]["post"]["requestBody"][
            "content"]["application/json"])["book"]
        operation = document["paths"]["/appointments/{user_id}/{date}"]["patch"]
        for media_type, content in operation["requestBody"]["content"].items():
            with self.subTest(media_type=media_type):
                fresh = Client(scheduler.InMemoryStore())
                self.assertEqual(fresh.request("POST", "/appointments", book).status, 201)
                response = fresh.request("PATCH", "/appointments/alice/2026-11-25",
                                         json.dumps(self.examples(content)["reschedule"]),
                                         {"Content-Type": media_type})
                self.assertEqual((response.status, response.json()),
                                 self.documented_response(operation, "reschedule"))

    def test_conflict_example_is_what_a_second_booking_gets(self):
        operation = self.document()["paths"]["/appointments"]["post"]
        book = self.examples(operation["requestBody"]["content"]["application/json"])["book"]
        conflict = self.examples(operation["responses"]["409"]["content"][
            "application/problem+json"])["conflict"]
        self.assertEqual(self.request("POST", "/appointments", book).status, 201)
        response = self.request("POST", "/appointments", book)
        self.assertEqual((response.status, as_in_examples(response.json())), (409, conflict))

    def test_a_reused_key_gets_the_documented_422_whose_errors_name_it(self):
        # The 422 schema requires errors: a generated client reads them (KeyError before).
        document, booking, url = self.document(), IdempotencyKeyTest.BOOKING, \
            "/appointments/alice/2026-11-25"
        writes = [  # (method, path, the first request, another with the same key)
            ("post", "/appointments", ("/appointments", booking),
             ("/appointments", {**booking, "time": "10:00"})),
            ("patch", "/appointments/{user_id}/{date}", (url, {"time": "10:00"}),
             (url, {"time": "11:00"})),
            ("delete", "/appointments/{user_id}/{date}", (url, None),
             ("/appointments/alice/2026-11-26", None))]
        for method, path, first, another in writes:
            with self.subTest(method=method):
                operation = document["paths"][path][method]
                content = operation["responses"]["422"]["content"]["application/problem+json"]
                self.assertEqual(content["schema"], {"$ref": "#/components/schemas/"
                                                             "ValidationProblem"})
                client = Client(scheduler.InMemoryStore())
                if method != "post":
                    self.assertEqual(client.request("POST", "/appointments", booking).status, 201)
                key = {"Idempotency-Key": '"k"'}
                self.assertLess(client.request(method.upper(), *first, key).status, 300)
                again = client.request(method.upper(), *another, key)
                self.assertEqual((again.status, as_in_examples(again.json())),
                                 self.documented_response(operation, "key-reused"))
                self.assertEqual(again.json()["errors"][0]["field"], "Idempotency-Key")

    def test_every_operation_takes_x_request_id_and_every_response_carries_it(self):
        document = self.document()
        components = document["components"]
        for path, item in document["paths"].items():
            for method, operation in item.items():
                with self.subTest(path=path, method=method):
                    self.assertIn({"$ref": "#/components/parameters/RequestId"},
                                  operation["parameters"])
                    for status, response in operation["responses"].items():
                        if "$ref" in response:
                            response = components["responses"][response["$ref"].rsplit("/")[-1]]
                        self.assertEqual(response["headers"]["X-Request-ID"],
                                         {"$ref": "#/components/headers/XRequestID"}, status)
        self.assertIn("instance", components["schemas"]["Problem"]["properties"])
        self.assertIn("X-Request-ID", document["info"]["description"])  # exposed to scripts
        key = components["parameters"]["RequestId"]
        self.assertFalse({"example", "examples"} & set(key) | {"example", "examples"} & set(
            key["schema"]), key)

    def test_headers_that_must_be_new_each_time_have_no_example(self):
        key = self.document()["components"]["parameters"]["IdempotencyKey"]
        self.assertFalse({"example", "examples"} & set(key) | {"example", "examples"} & set(
            key["schema"]), key)
        self.assertIn("new for each request", key["description"])
        self.assertIn("uuid", key["description"])

    def test_a_patch_is_described_as_a_merge_patch_alone(self):
        # Two media types with one schema: generated clients send the first, always.
        body = self.document()["paths"]["/appointments/{user_id}/{date}"]["patch"][
            "requestBody"]
        self.assertEqual(list(body["content"]), ["application/merge-patch+json"])
        self.assertIn("as application/json, it is taken too", body["description"])
        self.assertEqual(set(scheduler.PATCH_TYPES), {"application/merge-patch+json",
                                                      "application/json"})

    def test_parameter_examples_get_the_documented_responses(self):
        document = self.document()
        book = self.examples(document["paths"]["/appointments"]["post"]["requestBody"][
            "content"]["application/json"])["book"]
        self.assertEqual(self.request("POST", "/appointments", book).status, 201)
        parameters = document["components"]["parameters"]
        operations = [(path, method, operation) for path, item in document["paths"].items()
                      for method, operation in item.items() if "requestBody" not in operation]
        operations.sort(key=lambda op: op[1] == "delete")  # read before deleting
        for path, method, operation in operations:
            with self.subTest(method=method, path=path):
                query = {}
                for parameter in operation.get("parameters", []):
                    if "$ref" in parameter:
                        parameter = parameters[parameter["$ref"].rsplit("/", 1)[1]]
                    if parameter["in"] == "header":  # optional, and without examples
                        continue
                    value = parameter["example"]
                    if parameter["in"] == "path":
                        path = path.replace("{%s}" % parameter["name"],
                                            urllib.parse.quote(value, safe=""))
                    else:
                        query[parameter["name"]] = value
                url = path + ("?" + urllib.parse.urlencode(query) if query else "")
                status = min(int(code) for code in operation["responses"] if code[0] == "2")
                content = operation["responses"][str(status)].get("content", {None: {}})
                for media_type, documented in content.items():  # each, as Accept asks
                    response = self.request(method.upper(), url, headers={
                        "Accept": media_type} if len(content) > 1 else None)
                    self.assertEqual(response.status, status, response.body)
                    if media_type is not None:
                        self.assertEqual(response.headers["Content-Type"], media_type)
                    for example in self.examples(documented).values():
                        self.assertEqual(response.json(), example)


class SchemaStrictnessTest(unittest.TestCase):
    """The document's schemas accept exactly what the parsers accept: a client that
    follows them (a schema-based fuzzer, a generated client) never gets a 422 or
    400 for a value they call valid, nor the other way round."""

    @classmethod
    def setUpClass(cls):
        schemas = scheduler.openapi_document()["components"]["schemas"]
        cls.user_id = schemas["UserId"]
        properties = schemas["NewAppointment"]["properties"]
        cls.date, cls.time = properties["date"], properties["time"]
        cls.note = properties["note"]

    def assertSameVerdict(self, schema: dict, parse, value: str):
        if parse is scheduler.parse_user_id:  # the schema describes IDs in NFC (see below)
            value = unicodedata.normalize("NFC", value)
        by_schema = (schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10 ** 9)
                     and self.compiled(schema["pattern"]).search(value) is not None)
        try:
            parse(value)
            by_parser = True
        except ValueError:
            by_parser = False
        if by_schema != by_parser:  # not assertEqual(), which costs more: this runs per value
            self.fail(f"{value!r}: schema {by_schema}, parser {by_parser}")

    # A pattern compiled once: re.search() looks it up in re's own cache at each call.
    compiled = staticmethod(functools.lru_cache(maxsize=None)(re.compile))

    # Every character class the rules tell apart, at the start, inside and at the end.
    USER_ID_PIECES = ["a", "Z", "0", " ", "\t", "\n", "\x00", "\x7f", "\x85", "\xa0", "é", "東",
                      "\u0645", "\u06cc", "\U0001F469", "\U0001F4BB", "\ufe0f", "\u0301",
                      "\u200b", "\u200c", "\u200d", "\u2028", "\u2029", "\u2060", "\u202e",
                      "\ufeff", "\u00ad", "\u3000", "\U000E0067", "\ud800", "\u0663", "«",
                      "\ue000", "-", "+", "/", "%", "\u3164", "\u2800", "\u034f", "\u17b4",
                      "\u180b", "\U000E0100", "\ufe0e", "\u2695", "\u203c", "1", "#", "\u20e3",
                      "e\u0301", "\u212a", "\u1100\u1161"]
    # Variation selectors and keycaps, which take three pieces and more.
    SEQUENCES = ["1\ufe0f\u20e3", "#\ufe0f\u20e3", "*\ufe0f\u20e3", "a1\ufe0f\u20e3b",
                 "1\ufe0e\u20e3", "1\ufe0f", "1\u20e3", "\ufe0f\u20e3", "a\ufe0f\u20e3",
                 "\U0001F469\u200d\u2695\ufe0f", "\u2695\ufe0f\ufe0f", "\u2695\ufe0f\u200d\u00e9",
                 "\u3030\ufe0f", "\u2139\ufe0e", "\u2800\ufe0f", "\u00e9\ufe0f",
                 "\U0001F3F3\ufe0f\u200d\U0001F308"]

    def test_user_id(self):
        pieces = self.USER_ID_PIECES
        values = ["", "x" * 256, "x" * 257, "alice\n", " alice", "alice "] + self.SEQUENCES
        values += [a + b + c for a in pieces for b in pieces for c in pieces[:12]]
        values += ["".join(random.Random(seed).choices(pieces, k=5)) for seed in range(3000)]
        for value in values:
            self.assertSameVerdict(self.user_id, scheduler.parse_user_id, value)

    @staticmethod
    def as_code_units(text: str) -> str:
        """text as ECMA-262 without its u flag reads it: UTF-16 code units, each
        character past U+FFFF a surrogate pair (here, two lone surrogates)."""
        return "".join(chr(0xD800 + ((ord(c) - 0x10000) >> 10)) + chr(0xDC00 + (ord(c) & 0x3FF))
                       if ord(c) > 0xFFFF else c for c in text)

    def test_the_patterns_read_alike_as_code_units_and_as_code_points(self):
        # Spectral compiles patterns without the u flag, ajv and Python's re as code points.
        pieces = [piece for piece in self.USER_ID_PIECES if piece != "\ud800"] + [
            "\U0001D7CE", "\U000F0000", "\U000E0001", "\U000110BD", "\U00030000", "\U0001D159",
            "\U000E0500"]
        values = [a + b + c for a in pieces for b in pieces for c in pieces[:12]]
        values_as_units = [self.as_code_units(value) for value in values]
        for schema in (self.user_id, self.note):
            as_points = re.compile(schema["pattern"])
            as_units = re.compile(self.as_code_units(schema["pattern"]))
            differing = [value for value, units in zip(values, values_as_units)
                         if bool(as_points.search(value)) != bool(as_units.search(units))]
            self.assertEqual(differing, [])

    def test_past_the_bmp_the_pattern_takes_more_than_the_service(self):
        # Past the BMP the pattern cannot tell visible characters, or emoji, from others
        # in both readings: a joiner beside an astral digit or private-use character,
        # or a variation selector after one, passes it; so does a reserved
        # default-ignorable code point (written out, the 3,759 would make the pattern
        # 20 KB longer). The service refuses them (a 422). Nothing it takes fails it.
        pattern = re.compile(self.user_id["pattern"])
        for value in ("\U0001D7CE\u200d\u00e9", "\U000F0000\u200c\u6771", "\U0001D7CE\ufe0f",
                      "alice\U000E0500"):
            with self.subTest(value=value):
                self.assertTrue(pattern.search(value))
                with self.assertRaises(ValueError):
                    scheduler.parse_user_id(value)

    def test_the_schema_describes_user_ids_in_nfc(self):
        # The service brings an ID to NFC, then checks it; a pattern cannot normalize,
        # so the schema holds for the NFC form (as its description says). Text in
        # another form can fail the schema and be taken, or pass it and be refused.
        pattern = re.compile(self.user_id["pattern"])

        def schema(text: str) -> bool:
            return len(text) <= self.user_id["maxLength"] and bool(pattern.search(text))

        for value, as_sent, taken in (
                ("e\u0301" * 200, False, True),  # 400 code points, 200 characters in NFC
                ("\u00e9\u200da\u0301", False, True),  # a joiner beside a, then beside \u00e1
                ("\ufb2c" * 100, True, False),  # 300 characters in NFC
                ("\u212a\u200d\u00e9", True, False)):  # KELVIN SIGN, then K: beside ASCII
            with self.subTest(value=value):
                self.assertEqual(schema(value), as_sent)
                self.assertEqual(schema(unicodedata.normalize("NFC", value)), taken)
                try:
                    scheduler.parse_user_id(value)
                    self.assertTrue(taken)
                except ValueError:
                    self.assertFalse(taken)

    def test_note(self):
        pieces = self.USER_ID_PIECES + ["\r", "\r\n", ","]
        values = ["x" * 500, "x" * 501, "a\rb", "a\r\nb"]
        values += [a + b + c for a in pieces for b in pieces for c in pieces[:12]]
        values += ["".join(random.Random(seed).choices(pieces, k=5)) for seed in range(3000)]
        for value in values:
            self.assertSameVerdict(self.note, scheduler.parse_note, value)

    # Probes of a detail's text: every class of character the rules tell apart, line
    # breaks among them, each in the pieces of three.
    TEXT_PIECES = USER_ID_PIECES + ["\r", "\r\n", ",", "a\nb"]

    def test_every_detail_has_the_pattern_of_its_own_rule(self):
        # A new detail's schema is made from its own rule (FreeText), never another's.
        schemas = scheduler.openapi_document()["components"]["schemas"]
        values = [a + b + c for a in self.TEXT_PIECES for b in self.TEXT_PIECES
                  for c in self.TEXT_PIECES[:12]]
        for detail in scheduler.DETAILS:
            with self.subTest(detail=detail.name):
                schema = schemas["NewAppointment"]["properties"][detail.name]
                self.assertEqual(schemas["AppointmentPatch"]["properties"][detail.name]["pattern"],
                                 schema["pattern"])
                self.assertEqual(schemas["Appointment"]["properties"][detail.name]["pattern"],
                                 schema["pattern"])
                length = detail.text.max_length
                for value in values + ["x" * length, "x" * (length + 1), "\r\n" * length]:
                    self.assertSameVerdict(schema, detail.parse, value)

    def test_a_rule_of_text_on_one_line_has_a_pattern_of_its_own(self):
        # As a detail that is not a note would have it: no line breaks.
        for text in (scheduler.FreeText(20, line_breaks=False),
                     scheduler.FreeText(20, line_breaks=True)):
            with self.subTest(text=text):
                schema = {"maxLength": text.max_length, "pattern": scheduler.text_pattern(text)}
                for value in [a + b for a in self.TEXT_PIECES for b in self.TEXT_PIECES]:
                    self.assertSameVerdict(schema, text.parse, value)
        self.assertNotEqual(scheduler.text_pattern(scheduler.FreeText(20, line_breaks=False)),
                            scheduler.note_pattern())

    def test_date(self):
        day = dt.date(1999, 12, 1)
        values = ["0000-01-01", "2026-02-30", "2026-11-25\n", "2026-1-05", "２０２６-11-25"]
        while day <= dt.date(2100, 1, 31):
            values.append(day.isoformat())
            day += dt.timedelta(days=1)
        values += [f"{year}-02-{day}" for year in range(1999, 2101) for day in ("29", "30")]
        values += [f"2026-{month:02d}-{day:02d}" for month in range(14) for day in range(33)]
        for value in values:
            self.assertSameVerdict(self.date, scheduler.parse_date, value)

    def test_date_under_other_ranges(self):
        # The pattern is made for any range of whole years: centuries whole or in part.
        for first, last in ((1990, 2149), (2024, 2030), (1900, 1999), (2000, 2000), (1601, 1700)):
            with self.subTest(first=first, last=last), other_rules(
                    FIRST_DATE=dt.date(first, 1, 1), LAST_DATE=dt.date(last, 12, 31)):
                schema = {"pattern": scheduler.date_pattern()}
                values = [f"{year:04d}-{month:02d}-{day:02d}"
                          for year in range(first - 2, last + 3)
                          for month, day in ((1, 1), (2, 28), (2, 29), (2, 30), (12, 31), (13, 1))]
                for value in values:
                    self.assertSameVerdict(schema, scheduler.parse_date, value)
        with other_rules(FIRST_DATE=dt.date(2000, 3, 1)):
            with self.assertRaisesRegex(ValueError, "whole years"):
                scheduler.date_pattern()

    def test_time_under_other_starts(self):
        for starts in ((0,), (0, 15, 30, 45), (5, 35)):
            with self.subTest(starts=starts), other_rules(START_MINUTES=starts):
                schema = scheduler.openapi_document()["components"]["schemas"][
                    "NewAppointment"]["properties"]["time"]
                for value in [f"{hour:02d}:{minute:02d}" for hour in (0, 9, 23, 24)
                              for minute in range(61)]:
                    self.assertSameVerdict(schema, scheduler.parse_time, value)

    def test_time(self):
        values = [f"{hour:02d}:{minute:02d}" for hour in range(26) for minute in range(61)]
        values += ["9:00", "09:00\n", "09:00:00", "０９:００"]
        for value in values:
            self.assertSameVerdict(self.time, scheduler.parse_time, value)

    @staticmethod
    def parse_condition(value: str) -> None:
        try:
            scheduler.write_condition({"if-match": value})
        except scheduler.HTTPError as error:
            raise ValueError(error.detail) from None

    def test_conditions(self):
        parameters = scheduler.openapi_document()["components"]["parameters"]
        schema = parameters["IfMatch"]["schema"]
        self.assertEqual(parameters["IfNoneMatch"]["schema"], schema)
        pieces = ['"a"', 'W/"b"', '""', '"a,b"', '"\xe9"', "*", ",", " ", "\t", '"', "W/", "x",
                  '"\x7f"', '"\x00"', "\n", "W", '"a b"', "\u0100"]
        values = ["", '"a", , "b"', '"a",', " * ", "*,", '*, "a"', '"a" "b"', ", ,"]
        values += [a + b + c for a in pieces for b in pieces for c in pieces[:9]]
        values += ["".join(random.Random(seed).choices(pieces, k=6)) for seed in range(3000)]
        for value in values:
            self.assertSameVerdict(schema, self.parse_condition, value)

    def test_integer_user_ids_have_the_parsers_bounds(self):
        integer = scheduler.openapi_document()["components"]["schemas"]["NewAppointment"][
            "properties"]["user_id"]["oneOf"][1]
        for value in (integer["minimum"], integer["maximum"]):
            self.assertEqual(scheduler.parse_user_id(value), str(value))
        for value in (integer["minimum"] - 1, integer["maximum"] + 1):
            with self.assertRaises(ValueError):
                scheduler.parse_user_id(value)


class RoutingErrorTest(RouteTestCase):
    def test_unknown_path_is_404(self):
        for path in ("//", "/doc", "/docs/", "/appointment", "/appointments/",
                     "/appointments/alice"):
            with self.subTest(path=path):
                problem = self.assertProblem(self.request("GET", path), 404)
                self.assertEqual(problem["detail"],
                                 f"There is no resource at {path}; /docs lists the API's paths.")

    def test_wrong_method_is_405_with_allow(self):
        for method in ("PUT", "PATCH", "DELETE"):
            with self.subTest(method=method):
                response = self.request(method, "/appointments")
                self.assertProblem(response, 405)
                self.assertEqual(response.headers["Allow"], "GET, HEAD, POST, OPTIONS")

    def test_absolute_form_is_recognised_only_without_a_leading_slash(self):
        self.book()
        response = self.request("GET", "http://scheduler.test/appointments?user_id=alice")
        self.assertEqual((response.status, len(response.json()["appointments"])), (200, 1))
        self.assertProblem(self.request("GET", "/healthz/x://y/appointments?user_id=alice"), 404)


class HugeNumberTest(RouteTestCase):
    def test_an_integer_past_pythons_digit_limit_is_400_not_500(self):
        for body in ('{"user_id": %s, "date": "2026-11-25", "time": "09:30"}' % ("9" * 5000),
                     '{"user_id": "a", "date": "2026-11-25", "time": "09:30", "n": %s}'
                     % ("1" * 5000)):
            with self.subTest(body=body[:30]):
                problem = self.assertProblem(self.request("POST", "/appointments", body, {
                    "Content-Type": "application/json"}), 400)
                self.assertIn("too many digits", problem["detail"])
        self.assertEqual(self.store.count(), 0)


class FullStoreTest(RouteTestCase):
    def make_store(self):
        return scheduler.InMemoryStore(capacity=1)

    def test_past_the_capacity_507_says_what_to_do(self):
        self.assertEqual(self.book("alice").status, 201)
        problem = self.assertProblem(self.book("bob"), 507)
        self.assertIn("maximum of 1 appointments", problem["detail"])
        self.assertIn("--max-appointments", problem["detail"])
        self.assertProblem(self.book("alice", time="15:00"), 409)  # a conflict is still one
        self.assertEqual(self.store.count(), 1)


@on_every_store
class FullUserTest(RouteTestCase):
    def setUp(self):
        super().setUp()
        self.store.user_capacity = 2

    def test_past_a_users_capacity_409_says_what_to_do_and_others_book_on(self):
        for date in ("2026-11-25", "2026-11-26"):
            self.assertEqual(self.book(date=date).status, 201)
        problem = self.assertProblem(self.book(date="2026-11-27"), 409)
        self.assertEqual(problem["detail"], "User alice holds 2 appointments, the most one user "
                                            "may; cancel one (past ones count too) to book "
                                            "another.")
        self.assertNotIn("appointment", problem)
        self.assertEqual(self.book("bob").status, 201)
        self.assertEqual(self.request("DELETE", "/appointments/alice/2026-11-25").status, 204)
        self.assertEqual(self.book(date="2026-11-27").status, 201)
        self.assertEqual(len(self.stored()), 2)


@on_every_store
class BookableDatesTest(RouteTestCase):
    def test_a_date_that_cannot_be_shown_is_422_and_stores_nothing(self):
        # It was: 500, yet stored, and every later request for the user a 500.
        problem = self.assertProblem(self.book("u3", "9999-12-31", "23:30"), 422)
        self.assertEqual([error["field"] for error in problem["errors"]], ["date"])
        self.assertIn("2000-01-01 to 2099-12-31", problem["errors"][0]["message"])
        self.assertEqual(self.store.count(), 0)
        self.assertEqual(self.request("GET", "/appointments?user_id=u3").json()["appointments"],
                         [])

    def test_the_first_and_the_last_slot_show_in_every_form(self):
        for date, start in (("2000-01-01", "00:00"), ("2099-12-31", LAST_START)):
            with self.subTest(date=date):
                booked = self.book("edge", date, start)
                self.assertEqual(booked.status, 201)
                self.assertEqual(self.request("GET", booked.headers["Location"]).json(),
                                 booked.json())
                listed = self.request("GET", "/appointments?user_id=edge").json()
                self.assertIn(booked.json(), listed["appointments"])
                feed = self.request("GET", "/appointments.ics?user_id=edge").body.decode()
                self.assertIn(f"DTEND:{ends(date, start, ICALENDAR_INSTANT)}\r\n", feed)


class InvisibleUserIdTest(RouteTestCase):
    def test_refused_in_the_body_the_query_and_the_path(self):
        user, quoted = "alice\u200b", urllib.parse.quote("alice\u200b", safe="")
        problem = self.assertProblem(self.book(user), 422)
        self.assertIn("U+200B", problem["errors"][0]["message"])
        for path in (f"/appointments?user_id={quoted}", f"/appointments.ics?user_id={quoted}",
                     f"/appointments/{quoted}/2026-11-25"):
            with self.subTest(path=path):
                self.assertIn("U+200B", self.assertProblem(self.request("GET", path), 400)["detail"])
        self.assertEqual(self.store.count(), 0)


    def test_look_alikes_are_refused_in_the_body_the_query_and_the_path(self):
        for char in ("\u3164", "\uffa0", "\u115f", "\u2800", "\ufe0f", "\u034f", "\u17b4",
                     "\U000E0100"):
            code = f"U+{ord(char):04X}"
            with self.subTest(code=code):
                quoted = urllib.parse.quote("alice" + char, safe="")
                problem = self.assertProblem(self.book("alice" + char), 422)
                self.assertIn(f"{code} ({unicodedata.name(char)})", problem["errors"][0]["message"])
                for path in (f"/appointments?user_id={quoted}",
                             f"/appointments/{quoted}/2026-11-25"):
                    problem = self.assertProblem(self.request("GET", path), 400)
                    self.assertIn(code, problem["detail"])
        self.assertEqual(self.store.count(), 0)


@on_every_store
class OneFormOneUserTest(RouteTestCase):
    """An ID sent in another form than NFC (NFD, say, as macOS file names and some
    keyboards write it) names the user of its NFC form, who is shown in NFC."""

    NFC, NFD = "Jos\u00e9", "Jose\u0301"

    def test_either_form_books_finds_and_shows_the_one_user(self):
        booked = self.book(self.NFD)
        self.assertEqual(booked.status, 201, booked.body)
        self.assertEqual(booked.json()["user_id"], self.NFC)
        self.assertEqual(booked.headers["Location"], "/appointments/Jos%C3%A9/2026-11-25")
        feeds = []
        for user in (self.NFC, self.NFD):
            quoted = urllib.parse.quote(user, safe="")
            with self.subTest(user=ascii(user)):
                listed = self.request("GET", f"/appointments?user_id={quoted}")
                self.assertEqual(listed.json(), {"user_id": self.NFC,
                                                 "appointments": [booked.json()]})
                self.assertEqual(self.request("GET", f"/appointments/{quoted}/2026-11-25").json(),
                                 booked.json())
                feed = self.request("GET", f"/appointments.ics?user_id={quoted}").body.decode()
                self.assertIn("X-WR-CALNAME:Appointments of Jos\u00e9\r\n", feed)
                feeds.append(re.findall(r"UID:\S+", feed))
                self.assertProblem(self.book(user, time="15:00"), 409)  # one a date
        self.assertEqual(feeds[0], feeds[1])  # one event, whichever form asked
        moved = self.request("PATCH", f"/appointments/{urllib.parse.quote(self.NFD)}/2026-11-25",
                             {"user_id": self.NFC, "date": "2026-11-26"})  # its own user
        self.assertEqual((moved.status, moved.json()["user_id"]), (200, self.NFC))
        self.assertEqual(moved.headers["Location"], "/appointments/Jos%C3%A9/2026-11-26")
        self.assertEqual(self.request("DELETE", f"/appointments/{urllib.parse.quote(self.NFD)}"
                                                "/2026-11-26").status, 204)
        self.assertEqual(self.store.count(), 0)


class RowsThatBreakTheRulesTest(RouteTestCase):
    """A file from an older release holding rows that break today's rules: set
    aside at start, so what each member sees and can do is what the rules allow."""

    def make_store(self):
        self.path = unversioned_database(self, "2026-11-30", [row[:3] for row in BROKEN_ROWS]
                                         + good_rows())
        return scheduler.SQLiteStore(self.path)

    def test_members_see_their_other_appointments_and_can_book_the_date_again(self):
        for user_id, date, _, field in BROKEN_ROWS:
            if field == "user_id":
                continue  # set aside; the log names them (CommandLineTest)
            with self.subTest(user_id=user_id, date=date):
                listed = self.request("GET", f"/appointments?user_id={user_id}")
                self.assertEqual([(a["date"], a["time"]) for a in listed.json()["appointments"]],
                                 [(GOOD_DATE, "10:00")])
                self.assertEqual(self.request("GET", f"/appointments.ics?user_id={user_id}")
                                 .status, 200)
                try:
                    day = scheduler.parse_date(date.strip()).isoformat()
                except ValueError:
                    continue  # not a date anyone can ask for
                self.assertEqual(self.request("GET", f"/appointments/{user_id}/{day}").status, 404)
                self.assertEqual(self.book(user_id, day, "09:00").status, 201)
        self.assertEqual(self.request("PATCH", f"/appointments/late/{GOOD_DATE}",
                                      {"date": "2026-11-24"}).status, 200)
        self.assertEqual(self.metric("scheduler_appointments"), self.store.count())

    def test_rows_written_past_the_constraints_are_never_a_500(self):
        plant_rows(self.path, [("mallory", "2026-11-25", "25:00"),
                               ("mallory", "2026-11-27", "09:15"), ("trent", "2026-11-25", "xx:yy")])
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as db:
            db.execute("PRAGMA ignore_check_constraints = ON")  # text that is not UTF-8
            db.execute("INSERT INTO appointments (user_id, date, time) "
                       "VALUES ('dave', '2026-11-25', CAST(X'30393AFF' AS TEXT))")
        cases = [("GET", "/appointments?user_id=mallory", None, 200),
                 ("GET", "/appointments/mallory/2026-11-25", None, 404),
                 ("GET", "/appointments.ics?user_id=mallory", None, 200),
                 ("PATCH", "/appointments/mallory/2026-11-27", {"time": "10:00"}, 404),
                 ("POST", "/appointments", {"user_id": "mallory", "date": "2026-11-25",
                                            "time": "09:00"}, 201),  # sets the 25:00 aside
                 ("PATCH", "/appointments/mallory/2026-11-25", {"date": "2026-11-27"}, 200),
                 ("DELETE", "/appointments/trent/2026-11-25", None, 404),  # as GET says
                 ("GET", "/appointments?user_id=dave", None, 200),
                 ("GET", "/appointments/dave/2026-11-25", None, 404),
                 ("POST", "/appointments", {"user_id": "dave", "date": "2026-11-25",
                                            "time": "09:00"}, 201)]
        for method, path, body, status in cases:
            with self.subTest(method=method, path=path):
                response = self.request(method, path, body)
                self.assertEqual(response.status, status, response.body)
        self.assertEqual([a["date"] for a in self.request(
            "GET", "/appointments?user_id=mallory").json()["appointments"]], ["2026-11-27"])
        self.assertEqual(sorted(user_id for user_id, in query(
            self.path, "SELECT user_id FROM set_aside WHERE user_id IN ('dave', 'mallory', "
                       "'trent')")),
            ["dave", "mallory", "mallory", "trent"])


class TruthfulHealthTest(RouteTestCase):
    """/healthz with --db: 503 whenever a booking would fail now, and no read waits
    for it."""

    def make_store(self):
        return scheduler.SQLiteStore(made_database(self), busy_timeout=0.2)

    def test_503_while_another_process_holds_the_writers_lock_past_the_deadline(self):
        release = hold_writers_lock(self, self.store.path)
        for request in (lambda: self.request("GET", "/healthz"), self.book):
            response = request()
            self.assertIn("busy", self.assertProblem(response, 503)["detail"])
            self.assertEqual(response.headers["Retry-After"], "1")
        release()
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        self.assertEqual(self.book().status, 201)

    def test_no_read_waits_for_the_health_check(self):
        self.store.busy_timeout = 30  # the check waits for SQLite's lock, held below
        self.book()
        release = hold_write_lock(self, self.store.path)
        health = queue.Queue()
        checking = threading.Thread(target=lambda: health.put(self.request("GET", "/healthz")))
        checking.start()
        self.addCleanup(checking.join)
        wait_until(lambda: self.metric("scheduler_sqlite_writes_queued") == 1,
                   what="the check to wait")  # and /metrics, a read, answered meanwhile
        self.assertEqual(len(self.request("GET", "/appointments?user_id=alice").json()
                             ["appointments"]), 1)
        self.assertTrue(checking.is_alive())  # the read was answered while it waited
        release()
        self.assertEqual(health.get(timeout=10).status, 200)

    def damage(self, pages: Callable[[int, Dict[str, int]], Set[int]]) -> None:
        """Store 3,000 users' appointments in the file itself, then overwrite the pages
        that pages(the file's page count, each table's and index's root page) names."""
        path = self.store.path
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("BEGIN")
            db.executemany("INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)",
                           [(f"user-{n:04d}", "2026-11-25", "09:00") for n in range(3000)])
            db.execute("COMMIT")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all of it in the file itself
            roots = dict(db.execute("SELECT name, rootpage FROM sqlite_master"))
        with open(path, "r+b") as file:
            for page in pages(os.path.getsize(path) // 4096, roots):
                file.seek((page - 1) * 4096)
                file.write(b"\xde\xad" * 2048)

    def test_a_damaged_file_is_503_that_retrying_will_not_fix(self):
        # Every page but the schema's and the count's.
        self.damage(lambda pages, roots: set(range(2, pages + 1)) - {roots["appointment_count"]})
        for path in ("/appointments?user_id=user-0005", "/healthz"):
            with self.subTest(path=path):
                response = self.request("GET", path)
                self.assertIn("damaged", self.assertProblem(response, 503)["detail"])
                self.assertNotIn("Retry-After", response.headers)

    def test_metrics_while_the_file_is_damaged_leave_out_what_is_stored(self):
        self.damage(lambda pages, roots: set(range(2, pages + 1)))  # the count's page too
        self.assertProblem(self.book(), 503)
        response = self.request("GET", "/metrics")
        self.assertEqual(response.status, 200)
        samples = parse_metrics(response.body.decode())
        names = {name for name, _ in samples}
        self.assertNotIn("scheduler_appointments", names)
        self.assertNotIn("scheduler_idempotency_keys", names)
        self.assertIn("scheduler_requests_total", names)  # the process's own numbers
        self.assertEqual(samples["scheduler_sqlite_transactions_total", frozenset()], 0)

    def test_once_the_file_is_found_damaged_no_write_is_taken(self):
        # The pages of the first rows (user-0000...) but the roots: a booking of a new
        # user, which SQLite writes at the right-hand end of each tree, could succeed,
        # and its 201 be lost with the file when its operator restores a backup.
        self.damage(lambda pages, roots: set(range(2, pages // 3)) - set(roots.values()))
        response = self.request("GET", "/appointments?user_id=user-0005")
        self.assertIn("damaged", self.assertProblem(response, 503)["detail"])
        for request in (self.book, lambda: self.request("DELETE", "/appointments/user-2999/"
                                                                  "2026-11-25")):
            self.assertIn("damaged", self.assertProblem(request(), 503)["detail"])

    def test_a_wal_file_deleted_is_503_and_what_was_committed_is_in_the_database_file(self):
        self.assertEqual(self.book().status, 201)
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        os.remove(self.store.path + "-wal")  # a careless clean-up; SQLite writes on, unaware
        for request in (lambda: self.request("GET", "/healthz"), lambda: self.book("bob")):
            response = request()
            detail = self.assertProblem(response, 503)["detail"]
            self.assertIn("its -wal file was deleted or replaced", detail)
            self.assertIn("until its operator starts the server again", detail)
            self.assertNotIn("Retry-After", response.headers)  # retrying will not help
        self.assertEqual(self.stored(), [appointment()])  # reads go on
        logged = [line for line in self.client.logged if self.store.path + "-wal" in line]
        self.assertTrue(logged and all("committed was copied into the database file" in line
                                       for line in logged), self.client.logged)
        # What a process opening the path sees (after a crash, say): the database file
        # alone, which the booking acknowledged before the deletion is now in.
        alone = temporary_database(self)
        shutil.copyfile(self.store.path, alone)
        self.assertEqual(query(alone, "SELECT user_id FROM appointments"), [("alice",)])

    def test_a_shm_file_deleted_is_not_made_anew_while_the_database_is_open(self):
        # A process that opened the database then (a worker started again) would make
        # a new -shm file, and it and this one would overwrite each other's commits.
        self.assertEqual(self.book().status, 201)
        os.remove(self.store.path + "-shm")
        opening = subprocess.run(
            [sys.executable, "-c", "import sys, scheduler; scheduler.SQLiteStore(sys.argv[1], "
             "busy_timeout=0.2)", self.store.path], cwd=HERE, capture_output=True, text=True,
            timeout=30)
        self.assertNotEqual(opening.returncode, 0)
        self.assertIn("DatabaseRefused: its -shm file was deleted while other processes have "
                      "it open; stop every process on it", opening.stderr)
        self.assertFalse(os.path.exists(self.store.path + "-shm"))
        self.assertEqual(self.book("bob").status, 201)  # every process shares the one deleted
        self.assertEqual(self.request("GET", "/healthz").status, 200)

    def test_a_shm_file_made_anew_by_another_program_stops_writes_at_once(self):
        self.assertEqual(self.book().status, 201)
        os.remove(self.store.path + "-shm")
        made = time.monotonic()
        subprocess.run([sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect("
                        "sys.argv[1]); db.execute(\"INSERT INTO appointments (user_id, date, "
                        "time) VALUES ('bob', '2026-11-25', '09:30')\"); db.commit()",
                        self.store.path], check=True, timeout=30)
        self.assertGreater(time.monotonic() - made, self.store.LOOK_EVERY)  # a batch looks
        for request in (lambda: self.book("carol"), lambda: self.request("GET", "/healthz")):
            response = request()  # the booking first: no health check has looked yet
            detail = self.assertProblem(response, 503)["detail"]
            self.assertIn("its -shm file was deleted or replaced", detail)
        # What another process sees: both bookings, and nothing else.
        listed = subprocess.run(
            [sys.executable, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1])."
             "execute('SELECT user_id FROM appointments ORDER BY 1').fetchall())",
             self.store.path], capture_output=True, text=True, check=True, timeout=30).stdout
        self.assertEqual(listed, "[('alice',), ('bob',)]\n")

    def test_a_database_file_moved_away_is_503(self):
        os.rename(self.store.path, self.store.path + ".moved")
        detail = self.assertProblem(self.request("GET", "/healthz"), 503)["detail"]
        self.assertIn("the database file was deleted or replaced", detail)
        self.assertProblem(self.book(), 503)


class DatabaseFailureTest(RouteTestCase):
    """An error SQLite did not foresee reaches the client as a sentence; SQLite's own
    words, which may quote the schema, go to the log alone."""

    def make_store(self):
        return scheduler.SQLiteStore(made_database(self))

    SECRET = "CREATE TABLE hidden (\n  secret_column TEXT CHECK (length(secret_column) > 0))"

    def test_the_client_gets_a_sentence_and_the_log_sqlites_words_in_one_line(self):
        with contextlib.closing(sqlite3.connect(self.store.path, isolation_level=None)) as db:
            db.execute("CREATE TRIGGER refuse_mallory BEFORE INSERT ON appointments WHEN "
                       f"NEW.user_id = 'mallory' BEGIN SELECT RAISE(ABORT, '{self.SECRET}'); END")
        response = self.book("mallory")
        problem = self.assertProblem(response, 503)
        self.assertNotIn("Retry-After", response.headers)
        for text in ("CREATE", "CHECK", "secret_column", "hidden", "RAISE", "SQL", "sqlite"):
            self.assertNotIn(text, response.body.decode())
        self.assertIn("log", problem["detail"])
        logged = [line for line in self.client.logged if "secret_column" in line]
        self.assertEqual(len(logged), 1, self.client.logged)
        self.assertNotIn("\n", logged[0])
        self.assertIn("'POST /appointments'", logged[0])
        self.assertIn(repr(self.SECRET), logged[0])
        self.assertEqual(self.book("alice").status, 201)  # the others' bookings go on


class LockedDatabaseTest(RouteTestCase):
    def make_store(self):
        return scheduler.SQLiteStore(made_database(self), busy_timeout=0.1)

    def test_a_lock_held_too_long_is_503_with_retry_after_and_nothing_written(self):
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        release = hold_write_lock(self, self.store.path)
        for method, path in (("POST", "/appointments"), ("GET", "/healthz"),
                             ("DELETE", "/appointments/alice/2026-11-25")):
            with self.subTest(method=method, path=path):
                response = (self.book() if method == "POST" else self.request(method, path))
                self.assertIn("busy", self.assertProblem(response, 503)["detail"])
                self.assertEqual(response.headers["Retry-After"], "1")
        release()
        self.assertEqual(self.store.count(), 0)
        self.assertEqual(self.book().status, 201)  # served again once the lock is gone
        self.assertEqual(self.request("GET", "/healthz").status, 200)


class PostgresFaultTestCase(RouteTestCase):
    """Faults of PostgreSQL as a server's requests meet them: a frozen database, its
    connections ended, an answer lost. Each is a 503 with Retry-After, or nothing
    the client can tell, and booking goes on once the database does."""

    DEADLINE: float  # busy_timeout: the seconds a write may wait for the database

    def make_store(self):
        return postgres_store(self, busy_timeout=self.DEADLINE)

    def setUp(self):
        super().setUp()
        self.cluster = PostgresCluster.shared()

    def end_sessions(self) -> None:
        """pg_terminate_backend() for every session of the store's role, and wait until
        they have ended: each sends its FATAL, which an idle connection reads only when
        it next looks."""
        ended = self.cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE usename = 'scheduler'")
        self.assertIn("t", ended.split())
        wait_until(lambda: self.cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE "
                                            "usename = 'scheduler'") == "0",
                   what="the sessions to end")

    def keyed_booking(self, user_id="alice") -> Response:
        return self.request("POST", "/appointments", json.dumps(
            {"user_id": user_id, "date": "2026-11-25", "time": "09:30"}),
            {"Content-Type": "application/json", "Idempotency-Key": '"first-try"'})


@requires_postgres
class PostgresFrozenTest(PostgresFaultTestCase):
    DEADLINE = 1  # short: the test waits it out

    def test_a_frozen_database_is_503_by_the_deadline_and_serves_again_once_thawed(self):
        self.assertEqual(self.book().status, 201)  # a pooled connection, as a server has
        self.cluster.freeze()  # as a frozen machine or a partition: nothing answers
        self.addCleanup(self.cluster.thaw)
        answers = {}

        def timed(name, request):
            started = time.monotonic()
            answers[name] = request(), time.monotonic() - started

        requests = {"booking": lambda: self.book("bob"),
                    "keyed booking": lambda: self.keyed_booking("carol"),
                    "health": lambda: self.request("GET", "/healthz"),
                    "listing": lambda: self.request("GET", "/appointments?user_id=alice")}
        run_all([threading.Thread(target=timed, args=item) for item in requests.items()])
        for name, (response, seconds) in answers.items():
            with self.subTest(name):
                detail = self.assertProblem(response, 503)["detail"]
                self.assertEqual(response.headers["Retry-After"], "1")
                self.assertIn(f"did not answer within {self.DEADLINE} s", detail)
                self.assertLess(seconds, self.DEADLINE + 5)  # a hang would be far longer
        self.cluster.thaw()
        # The keyed booking's transaction never reached its COMMIT: its retry books it.
        wait_until(lambda: self.keyed_booking("carol").status == 201, what="a booking once thawed")
        self.assertEqual(self.request("GET", "/healthz").status, 200)
        self.assertEqual(len(self.stored("carol")), 1)
        # The booking without a key was one statement, committed by the server once it
        # ran (a 503 may hide a committed booking): a retry finds it, never a second.
        again = self.book("bob")
        self.assertIn(again.status, (201, 409))
        if again.status == 409:
            self.assertEqual(again.json()["appointment"]["user_id"], "bob")
        self.assertEqual(len(self.stored("bob")), 1)


@requires_postgres
class PostgresFaultTest(PostgresFaultTestCase):
    # Long enough for a new connection (TCP, TLS, SCRAM) on a loaded machine: these
    # tests end sessions, and each request must get its answer on another.
    DEADLINE = 10

    def test_a_login_refused_is_503_that_waits_for_the_operator(self):
        # As after an operator changed the role's password: retrying will not help.
        self.assertEqual(self.book().status, 201)
        password = PostgresCluster.PASSWORDS["scheduler"]
        self.cluster.sql("ALTER ROLE scheduler PASSWORD 'changed-by-an-operator'")
        self.addCleanup(self.cluster.sql, f"ALTER ROLE scheduler PASSWORD '{password}'")
        self.end_sessions()
        for request in (lambda: self.book("bob"), lambda: self.request("GET", "/healthz")):
            response = request()
            detail = self.assertProblem(response, 503)["detail"]
            self.assertIn("refused this server's login", detail)
            self.assertNotIn("Retry-After", response.headers)
        self.assertNotIn(password, "\n".join(self.client.logged))

    def test_sessions_ended_while_idle_are_noticed_before_use(self):
        run_all([threading.Thread(target=self.book, args=(f"user-{n}",)) for n in range(4)])
        for request, status in ((lambda: self.book("bob"), 201),
                                (lambda: self.request("GET", "/appointments?user_id=bob"), 200),
                                (lambda: self.request("GET", "/healthz"), 200)):
            self.end_sessions()
            self.assertEqual(request().status, status)

    def test_a_session_ended_just_after_its_check_is_used_once_more_on_another(self):
        """The FATAL may arrive between the pool's check and the first query: a read
        runs again on another connection, as a write does (nothing was done yet)."""
        self.book()
        real_check = scheduler.PGConnection.check_idle
        checks = []

        def too_early(connection):  # the first check comes before the FATAL arrives
            checks.append(connection)
            return len(checks) == 1 or real_check(connection)

        for request, status in ((lambda: self.request("GET", "/appointments?user_id=alice"),
                                 200), (lambda: self.book("bob"), 201)):
            checks.clear()
            self.end_sessions()
            with mock.patch.object(scheduler.PGConnection, "check_idle", too_early):
                self.assertEqual(request().status, status)
            self.assertEqual(checks[0].state, "closed")  # the race was run: it broke in use

    def lose_commit(self, before: bool):
        """Make the next COMMIT's outcome unknown to the store: its connection drops
        before it reaches the server (the session ended first), or after the server
        committed, before its answer arrives."""
        real_query = scheduler.PGConnection.query
        lost = []

        def query(connection, sql, params=(), deadline=None):
            if sql != "COMMIT" or lost:
                return real_query(connection, sql, params, deadline)
            lost.append(connection.backend_pid)
            if before:
                self.end_sessions()
                return real_query(connection, sql, params, deadline)
            real_query(connection, sql, params, deadline)
            connection._fail(scheduler.PGConnectionLost, "the server closed the connection")

        patch = mock.patch.object(scheduler.PGConnection, "query", query)
        patch.start()
        self.addCleanup(patch.stop)
        return lost

    def test_a_booking_committed_but_unacknowledged_gets_its_201_when_retried(self):
        lost = self.lose_commit(before=False)
        first = self.keyed_booking()
        self.assertTrue(lost)
        self.assertEqual(self.assertProblem(first, 503)["detail"],
                         "The database cannot be reached now; retry shortly.")
        self.assertEqual(first.headers["Retry-After"], "1")
        self.assertEqual(self.stored(), [appointment()])  # committed, all the same
        retry = self.keyed_booking()
        self.assertEqual((retry.status, retry.headers["Idempotent-Replayed"]), (201, "true"))
        self.assertEqual(retry.json(), appointment().as_json())  # not a 409 for itself
        self.assertEqual(retry.headers["ETag"], self.request(
            "GET", "/appointments/alice/2026-11-25").headers["ETag"])

    def test_a_booking_whose_commit_met_an_ended_session_runs_again_at_once(self):
        """The server's first answer to the COMMIT is the FATAL it sent as the session
        ended: it never ran the COMMIT, so the transaction was rolled back, and the
        write runs again in a new one."""
        lost = self.lose_commit(before=True)
        first = self.keyed_booking()
        self.assertTrue(lost)
        self.assertEqual((first.status, first.headers["Idempotent-Replayed"]), (201, None))
        self.assertEqual(self.stored(), [appointment()])

    def test_retry_after_only_where_a_retry_soon_may_succeed(self):
        for sqlstate, words, retry_after in (
                ("57P01", "restarting, failing over or overloaded", 1),  # admin_shutdown
                ("57P03", "restarting, failing over or overloaded", 1),  # starting up
                ("08006", "restarting, failing over or overloaded", 1),  # connection_failure
                ("53300", "restarting, failing over or overloaded", 1),  # too many connections
                ("25006", "restarting, failing over or overloaded", 1),  # on a standby
                ("40001", "busy", 1), ("40P01", "busy", 1), ("23505", "busy", 1),
                ("53100", "its disk is full", None),
                ("42501", "its operator must look into the server's log", None),
                ("P0001", "its operator must look into the server's log", None)):
            with self.subTest(sqlstate):
                error = scheduler.PGError({"S": "ERROR", "C": sqlstate, "M": "secret words"})
                unavailable = self.store._unavailable(error)
                self.assertIn(words, str(unavailable))
                self.assertEqual(unavailable.retry_after, retry_after)
                self.assertNotIn("secret", str(unavailable))
                self.assertIn("secret words", unavailable.cause)

    def test_a_write_overtaken_every_time_is_503_busy_with_retry_after(self):
        runs = []

        def overtaken(db):
            runs.append(db.execute("SELECT 1"))
            raise scheduler.PGError({"S": "ERROR", "C": "40001",
                                     "M": "could not serialize access"})

        with self.assertRaises(scheduler.StoreUnavailable) as refused:
            self.store.transact(overtaken)
        self.assertEqual(len(runs), scheduler._PG_RETRIES)
        self.assertIn("busy", str(refused.exception))
        self.assertEqual(refused.exception.retry_after, 1)

    def test_an_error_the_operator_must_see_to_is_503_without_retry_after(self):
        schema = self.store.schema
        self.cluster.sql(
            f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$ '
            "BEGIN RAISE EXCEPTION 'secret_column'; END $$; "
            f'CREATE TRIGGER refuse BEFORE INSERT ON "{schema}".appointments FOR EACH ROW '
            f"WHEN (NEW.user_id = 'mallory') EXECUTE FUNCTION \"{schema}\".refuse()",
            self.cluster.DATABASE)
        response = self.book("mallory")
        self.assertIn("its operator must look into the server's log",
                      self.assertProblem(response, 503)["detail"])
        self.assertNotIn("Retry-After", response.headers)  # retrying will not help
        self.assertNotIn(b"secret_column", response.body)
        self.assertEqual(len([line for line in self.client.logged
                              if "secret_column" in line]), 1, self.client.logged)
        self.assertEqual(self.book("alice").status, 201)  # the others' bookings go on


# --- Wire format and connection, without a server -----------------------------------


class SplitTargetTest(unittest.TestCase):
    CASES = [  # (request target, path, query)
        ("/appointments?user_id=alice", "/appointments", "user_id=alice"),
        ("/appointments", "/appointments", ""),
        ("http://host/appointments?user_id=a", "/appointments", "user_id=a"),
        ("https://host:8000/healthz", "/healthz", ""),
        ("http://host", "/", ""),
        ("http://host?x=1", "/", "x=1"),
        # Only a target without a leading "/" is absolute (RFC 9112 section 3.2):
        ("/healthz/x://y/appointments?user_id=alice", "/healthz/x://y/appointments",
         "user_id=alice"),
        ("/a?next=http://b/c", "/a", "next=http://b/c"),
        ("*", "*", ""),
    ]

    def test_cases(self):
        for target, path, query in self.CASES:
            with self.subTest(target=target):
                self.assertEqual(scheduler.split_target(target), (path, query))


NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n"
LIMIT = scheduler.MAX_HEAD_BYTES


def head_of_size(size: int) -> bytes:
    """A GET whose head, from the request line to the empty line, is size bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def read_head(data: bytes, piece: int) -> Tuple[object, bytes]:
    """What find_head() and parse_head() make of data arriving piece bytes at a time,
    fed as a Connection feeds them: (the RequestHead, or the HTTPError raised, or
    None if the head never ended; the bytes after the head)."""
    received, searched = bytearray(), 0
    for offset in range(0, len(data), piece):
        received += data[offset:offset + piece]
        try:
            found = scheduler.find_head(received, searched)
            if found is not None:
                start, end = found
                return (scheduler.parse_head(bytes(received[start:end])),
                        bytes(received[end:]) + data[offset + piece:])
        except scheduler.HTTPError as error:
            return error, b""
        searched = len(received)
    return None, bytes(received)


class HeadGrammarTest(unittest.TestCase):
    """find_head() and parse_head(), as h11 tests its reader: each head fed whole,
    byte by byte, and with the next request's bytes behind it."""

    ACCEPTED = [  # (name, raw head, what the RequestHead holds)
        ("a GET", b"GET /appointments?user_id=a HTTP/1.1\r\nHost: t\r\n\r\n",
         {"method": "GET", "path": "/appointments", "query": "user_id=a",
          "version": "HTTP/1.1", "headers": {"host": "t"}}),
        ("bare LFs", b"GET /healthz HTTP/1.1\nHost: t\n\n", {"headers": {"host": "t"}}),
        ("blank lines first (RFC 9112 section 2.2)", b"\r\n\n\r\nGET /healthz HTTP/1.1\r\n"
         b"Host: t\r\n\r\n", {"path": "/healthz"}),
        ("HTTP/1.0 needs no Host", b"GET /healthz HTTP/1.0\r\n\r\n",
         {"version": "HTTP/1.0", "headers": {}}),
        ("the absolute form", b"GET http://s.test/appointments?user_id=a HTTP/1.1\r\n"
         b"Host: s.test\r\n\r\n", {"path": "/appointments", "query": "user_id=a"}),
        ("the absolute form, its scheme in any case", b"GET HTTPS://s.test/healthz HTTP/1.1\r\n"
         b"Host: s.test\r\n\r\n", {"path": "/healthz"}),
        ("names lower-cased, values trimmed of spaces and tabs",
         b"GET / HTTP/1.1\r\nHOST: t\r\nX-A:\t b c \t\r\nX-B:\r\n\r\n",
         {"headers": {"host": "t", "x-a": "b c", "x-b": ""}}),
        ("a repeated header, joined", b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: b\r\n" * 98
         + b"\r\n", {"headers": {"host": "t", "x-a": ", ".join(["b"] * 98)}}),
        ("a body is not part of the head", post_head(2) + b"{}",
         {"method": "POST", "headers": {"host": "test", "content-type": "application/json",
                                        "content-length": "2"}}),
        ("100 header lines", b"GET / HTTP/1.1\r\n" + b"".join(
            b"X-%d: v\r\n" % n for n in range(99)) + b"Host: t\r\n\r\n", {"method": "GET"}),
        (f"a head of {LIMIT} bytes", head_of_size(LIMIT), {"path": "/healthz"}),
        ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", {"path": "*"}),
        ("Hosts of each form (RFC 3986 section 3.2.2)", b"GET / HTTP/1.1\r\nHost: "
         b"[::1]:8000\r\n\r\n", {"headers": {"host": "[::1]:8000"}}),
        ("an IPv4 address and a port", b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n",
         {"headers": {"host": "127.0.0.1:8000"}}),
        ("an empty Host (RFC 9110 section 7.2)", b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
         {"headers": {"host": ""}}),
        ("a name percent-encoded", b"GET / HTTP/1.1\r\nHost: b%C3%BCcher.test\r\n\r\n",
         {"headers": {"host": "b%C3%BCcher.test"}}),
    ]

    REFUSED = [  # (name, raw head, status, words in the detail)
        ("a Host with a space (RFC 9112 section 3.2)", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
         400, "'a b' is not a host and port"),
        ("a Host that is a URL", b"GET / HTTP/1.1\r\nHost: http://x\r\n\r\n", 400,
         "not a host and port"),
        ("a Host beyond ASCII", b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n", 400,
         "not a host and port"),
        ("an HTTP/1.0 Host too", b"GET / HTTP/1.0\r\nHost: a/b\r\n\r\n", 400,
         "not a host and port"),
        ("a Host with a '%' that encodes nothing", b"GET / HTTP/1.1\r\nHost: a%zz\r\n\r\n",
         400, "not a host and port"),
        ("a fragment, which no target holds (RFC 9112 section 3.2)",
         b"DELETE http://x#/appointments/a/2026-11-27 HTTP/1.1\r\nHost: x\r\n\r\n", 400,
         "fragment"),
        ("a fragment in the origin form", b"GET /healthz#a HTTP/1.1\r\nHost: x\r\n\r\n", 400,
         "fragment"),
        ("the absolute form of another scheme",
         b"DELETE a/b://x/appointments/a/2026-11-27 HTTP/1.1\r\nHost: x\r\n\r\n", 400,
         "not http or https"),
        ("the absolute form with no scheme", b"GET ://x/healthz HTTP/1.1\r\nHost: x\r\n\r\n",
         400, "not http or https"),
        ("the absolute form with no host (RFC 9110 section 4.2.1)",
         b"GET http:///healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "no host"),
        ("not a request line", b"NOT A REQUEST\r\n\r\n", 400, "HTTP version"),
        ("not one either", b"NOT-A-REQUEST\r\n\r\n", 400, "request line"),
        ("HTTP/9.9", b"GET /appointments HTTP/9.9\r\n\r\n", 505, "not supported"),
        ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505, "not supported"),
        ("unknown method", b"BREW /appointments HTTP/1.1\r\nHost: x\r\n\r\n", 501, "BREW"),
        ("request line over 64 KiB", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414,
         "65536 bytes"),
        ("over 100 header lines", b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431,
         "100 header lines"),
        ("a header line over 64 KiB", b"GET / HTTP/1.1\r\nX-A: " + b"b" * 70000
         + b"\r\n\r\n", 431, "65536 bytes"),
        ("headers past 64 KiB in all", b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"".join(
            b"X-%d: %s\r\n" % (n, b"v" * 4000) for n in range(17)) + b"\r\n", 431,
         "65536 bytes"),
        (f"a head of {LIMIT + 1} bytes", head_of_size(LIMIT + 1), 431, "65536 bytes"),
        ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400,
         "request line"),
        ("HTTP/0.9", b"GET /appointments?user_id=a\r\n\r\n", 400, "request line"),
        ("a folded header line", b"GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n", 400,
         "Malformed header"),
        ("a space before the colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400,
         "Malformed header"),
        ("a header line without a colon", b"GET / HTTP/1.1\r\nHost t\r\n\r\n", 400,
         "Malformed header"),
        ("HTTP/1.1 without Host", b"GET /appointments?user_id=a HTTP/1.1\r\n\r\n", 400, "Host"),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Host"),
        ("NBSP between the parts", b"GET\xa0/healthz HTTP/1.1\r\nHost: t\r\n\r\n", 400,
         "request line"),
        ("\\x1c between the parts", b"GET\x1c/healthz HTTP/1.1\r\nHost: t\r\n\r\n", 400,
         "request line"),
        ("NEL between the parts", b"GET /healthz\x85HTTP/1.1\r\nHost: t\r\n\r\n", 400,
         "request line"),
        ("a tab between the parts", b"GET\t/healthz HTTP/1.1\r\nHost: t\r\n\r\n", 400,
         "request line"),
        ("two spaces", b"GET  /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 400, "request line"),
        ("a bare CR in the request line", b"GET /healthz HTTP/1.1\r\r\nHost: t\r\n\r\n", 400,
         "HTTP version"),
        ("NUL in a header value", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
         400, "Malformed header"),
        ("a bare CR in a header value", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n"
         b"\r\n", 400, "Malformed header"),
        ("a space inside a header name", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n",
         400, "Malformed header"),
        ("raw UTF-8 in the target", "GET /appointments?user_id=é HTTP/1.1\r\nHost: t\r\n\r\n"
         .encode(), 400, "percent-encode"),
        ("a control character in the target", b"GET /app\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
         400, "percent-encode"),
    ]

    FEEDS = [("whole", None, b""), ("byte by byte", 1, b""),
             ("with the next request behind", None, NEXT_REQUEST)]

    def test_accepted(self):
        for name, raw, expected in self.ACCEPTED:
            for feed, piece, behind in self.FEEDS:
                with self.subTest(name, feed=feed):
                    request, rest = read_head(raw + behind, piece or len(raw + behind))
                    self.assertIsInstance(request, scheduler.RequestHead)
                    self.assertEqual({field: getattr(request, field) for field in expected},
                                     expected)
                    self.assertEqual(rest, raw.partition(b"\r\n\r\n" if b"\r\n\r\n" in raw
                                                         else b"\n\n")[2] + behind)
                    if behind:  # and the next request reads as itself
                        self.assertEqual(read_head(rest[-len(behind):], len(behind))[0].path,
                                         "/next")

    def test_refused(self):
        for name, raw, status, words in self.REFUSED:
            for feed, piece, behind in self.FEEDS:
                with self.subTest(name, feed=feed):
                    error, _ = read_head(raw + behind, piece or len(raw + behind))
                    self.assertIsInstance(error, scheduler.HTTPError)
                    self.assertEqual(error.status, status)
                    self.assertIn(words, error.detail)

    def test_a_head_not_yet_ended_asks_for_more(self):
        for raw in [b"", b"\r\n", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: t\r\n",
                    b"GET / HTTP/1.1\r\nHost: t\r\n\r", b"x" * (LIMIT - 1)]:
            with self.subTest(raw=raw[:40]):
                self.assertIsNone(scheduler.find_head(raw))

    def test_the_request_line_is_what_the_log_shows(self):
        self.assertEqual(scheduler.request_line(b"GET /\x1b HTTP/1.1\r\nHost: t\r\n\r\n"),
                         "GET /\x1b HTTP/1.1")
        self.assertEqual(scheduler.request_line(b"GET / HTTP/1.1\n\n"), "GET / HTTP/1.1")


def http_request(**overrides) -> scheduler.RequestHead:
    fields = {"method": "GET", "path": "/appointments", "query": "", "version": "HTTP/1.1",
              "headers": {"host": "t"}, **overrides}
    return scheduler.RequestHead(**fields)


class KeepAliveTest(unittest.TestCase):
    """keep_alive(), the one decision whether a connection stays open, and how
    render_response() says it."""

    BODY = {"host": "t", "content-type": "application/json", "content-length": "2"}
    CASES = [  # (name, request, its body read, server draining, stays open)
        ("a plain GET", http_request(), False, False, True),
        ("a request that could not be read", None, False, False, False),
        ("Connection: close", http_request(headers={"host": "t", "connection": "Close"}),
         False, False, False),
        ("Connection: keep-alive, close", http_request(headers={
            "host": "t", "connection": "keep-alive, close"}), False, False, False),
        ("HTTP/1.0", http_request(version="HTTP/1.0", headers={}), False, False, False),
        ("HTTP/1.0 with Connection: keep-alive", http_request(
            version="HTTP/1.0", headers={"connection": "Keep-Alive"}), False, False, True),
        ("a body left unread", http_request(method="POST", headers=BODY), False, False, False),
        ("a body read whole", http_request(method="POST", headers=BODY), True, False, True),
        ("a chunked body, never read", http_request(method="POST", headers={
            "host": "t", "transfer-encoding": "chunked"}), False, False, False),
        ("Content-Length: 0 is no body", http_request(headers={"host": "t",
                                                                "content-length": "0"}),
         False, False, True),
        ("the server is draining", http_request(), False, True, False),
    ]

    def test_cases(self):
        for name, request, body_read, draining, expected in self.CASES:
            with self.subTest(name):
                self.assertIs(scheduler.keep_alive(request, body_read, draining), expected)

    def test_the_connection_header_says_it(self):
        reply = scheduler.Reply(HTTPStatus.OK, {})
        cases = [(True, False, None), (False, False, "close"), (True, True, "keep-alive"),
                 (False, True, "close")]  # (keep open, HTTP/1.0, Connection)
        for keep_open, http_1_0, expected in cases:
            with self.subTest(keep_open=keep_open, http_1_0=http_1_0):
                response, _ = scheduler.render_response(reply, keep_open=keep_open,
                                                        http_1_0=http_1_0)
                self.assertEqual(read_response(_BytesSocket(response)).headers["Connection"],
                                 expected)

    def test_a_head_response_has_the_head_alone(self):
        reply = scheduler.Reply(HTTPStatus.OK, {"a": 1})
        whole, size = scheduler.render_response(reply)
        head, head_size = scheduler.render_response(reply, head_only=True)
        self.assertEqual((size, head_size), (len(b'{"a": 1}\n'), size))
        self.assertEqual(whole, head + b'{"a": 1}\n')

    def test_who_waits_for_100_continue(self):
        expect = {"host": "t", "expect": "100-Continue"}
        self.assertTrue(scheduler.expects_continue(http_request(headers=expect)))
        self.assertFalse(scheduler.expects_continue(http_request(version="HTTP/1.0",
                                                                 headers=expect)))
        self.assertFalse(scheduler.expects_continue(http_request()))


class ReasonPhraseTest(unittest.TestCase):
    """Status lines and problem titles use RFC 9110's names (section 15), which the
    README uses too, whatever names this Python's http module has."""

    NAMES = [(400, "Bad Request"), (408, "Request Timeout"), (412, "Precondition Failed"),
             (413, "Content Too Large"), (414, "URI Too Long"), (416, "Range Not Satisfiable"),
             (422, "Unprocessable Content"), (431, "Request Header Fields Too Large"),
             (503, "Service Unavailable"), (505, "HTTP Version Not Supported")]

    def test_names(self):
        for status, name in self.NAMES:
            with self.subTest(status=status):
                reply = scheduler.error_reply(scheduler.HTTPError(status, "Why."))
                response, _ = scheduler.render_response(reply)
                self.assertTrue(response.startswith(f"HTTP/1.1 {status} {name}\r\n".encode()))
                self.assertEqual(json.loads(response.partition(b"\r\n\r\n")[2])["title"], name)


class _Unclosed(io.BytesIO):
    """Bytes that http.client reads one response at a time, and cannot close."""

    def close(self) -> None:
        pass


class _Host:
    """What a Connection asks of the server that accepted it."""

    def __init__(self, limits: scheduler.Limits):
        self.limits, self.draining, self.closing_idle, self.lines = limits, False, False, []
        self.log_line, self.access_line = self.lines.append, scheduler.access_log_line


def serve_bytes(service: scheduler.Service, data: bytes) -> Tuple[List[Response], List[str]]:
    """A Connection serving data, sent at once and followed by end of file, over a
    socket pair in this thread (no server, no watchdog: every byte is there); the
    responses it sent, read as a client would, and the lines it logged."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        host = _Host(service.limits)
        scheduler.Connection(ours, ("192.0.2.1", 50000), host).serve(service)
        ours.shutdown(socket.SHUT_WR)
        sent = _Unclosed(b"".join(iter(functools.partial(theirs.recv, 65536), b"")))
    responses = []
    while sent.tell() < len(sent.getbuffer()):
        response = http.client.HTTPResponse(_BytesSocket(b""), method="GET")
        response.fp = sent  # each response read from where the last one ended
        response.begin()
        responses.append(Response(response.status, response.headers, response.read()))
    return responses, host.lines


class ConnectionTest(HTTPTestCase):
    """A Connection's loop, over a socket pair: what arrives is answered in order,
    and a request that cannot be read is answered and ends the connection."""

    def setUp(self):
        super().setUp()
        self.service = scheduler.Service(self.store, log=lambda line, **fields: None)

    def serve(self, data: bytes) -> List[Response]:
        return serve_bytes(self.service, data)[0]

    def test_a_request_whose_body_cannot_be_framed_is_refused_whatever_its_route(self):
        # RFC 9112 section 6.3: the length of what follows cannot be known, so the request
        # is refused (411 for chunked, which is well framed but not read here) and the
        # connection ends; a DELETE with no body to read cancels nothing all the same.
        booked = appointment()
        self.store.book(booked)
        cases = [(b"Transfer-Encoding: gzip\r\n", 400), (b"Transfer-Encoding: chunked, x\r\n", 400),
                 (b"Transfer-Encoding: chunked\r\n\r\n0\r\n", 411),
                 (b"Transfer-Encoding: gzip, chunked,\r\n\r\n0\r\n", 411),  # "" is no coding
                 (b"Content-Length: abc\r\n", 400), (b"Content-Length: -1\r\n", 400),
                 (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400)]
        for method, target in (("DELETE", "/appointments/alice/2026-11-25"), ("GET", "/healthz")):
            for framing, status in cases:
                with self.subTest(method=method, framing=framing):
                    responses = self.serve(f"{method} {target} HTTP/1.1\r\nHost: t\r\n".encode()
                                           + framing + b"\r\n" + NEXT_REQUEST)
                    self.assertEqual([r.status for r in responses], [status])
                    self.assertEqual(self.store.get("alice", booked.date), booked)
        # On a route that takes a body too, before what the body is (its Content-Type).
        refused, = self.serve(b"POST /appointments HTTP/1.1\r\nHost: t\r\n"
                              b"Transfer-Encoding: gzip\r\n\r\n")
        self.assertEqual(refused.status, 400)

    def test_blank_lines_before_a_request_are_let_go_up_to_the_heads_limit(self):
        # RFC 9112 section 2.2: ignored. Each is let go as it comes, so that a trickle
        # of them is not searched again at every byte; past the limit of a head, 400.
        under = b"\r\n" * (LIMIT // 2) + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        self.assertEqual([r.status for r in self.serve(under)], [200])
        problem = self.serve(b"\n" * (LIMIT + 1) + b"GET /healthz HTTP/1.1\r\n\r\n")[0]
        self.assertEqual(problem.status, 400)
        self.assertIn("blank lines", problem.json()["detail"])

    def race_the_close(self, second: bytes) -> Response:
        """The answer to second, sent on a kept-alive connection whose wait for it
        close_if_idle() ends (at shutdown) just as its socket reads it, as the race
        would have it: a stand-in socket runs close_if_idle() at its second read."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        theirs.settimeout(10)  # the client's wait for an answer
        closed = []  # what close_if_idle() returned

        class Racing:
            reads = 0

            def __getattr__(self, name):
                return getattr(ours, name)

            def recv(self, size, *flags):
                data = ours.recv(size, *flags)
                if not flags:  # not a peek
                    Racing.reads += 1
                    if Racing.reads == 2:
                        closed.append(connection.close_if_idle())
                return data

        connection = scheduler.Connection(Racing(), ("192.0.2.1", 50000),
                                          _Host(self.service.limits))
        serving = threading.Thread(target=connection.serve, args=(self.service,))
        theirs.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        serving.start()
        self.assertEqual(read_response(theirs).status, 200)
        theirs.sendall(second)  # read by the second recv(), as the wait is ended
        answer = read_response(theirs)
        serving.join(timeout=10)
        self.assertFalse(serving.is_alive())
        self.assertEqual(closed, [True])
        return answer

    def test_a_request_read_as_the_wait_for_it_is_ended_is_answered(self):
        # Its client sent it before it could see the close: answered, not dropped.
        self.assertEqual(self.race_the_close(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                         .status, 200)
        # Only its start came: the rest is never read, and the client is told to resend
        # it (not that it was too slow, 408).
        answer = self.race_the_close(b"GET /healthz HTTP/1.1\r\nHost:")
        self.assertEqual((answer.status, answer.headers["Retry-After"]), (503, "1"))
        self.assertIn((scheduler.UNMATCHED, "other", 503), scheduler.request_series())

    def test_requests_sent_together_are_answered_in_order(self):
        responses = self.serve(post_head(len(VALID_BODY)) + VALID_BODY + b"\r\n"
                               + b"GET /appointments?user_id=alice HTTP/1.1\r\nHost: t\r\n\r\n"
                               + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + NEXT_REQUEST)
        self.assertEqual([r.status for r in responses], [201, 200, 200, 404])
        self.assertEqual(len(responses[1].json()["appointments"]), 1)

    def test_malformed_requests_get_a_problem_and_the_connection_closes(self):
        for name, raw, status, words in HeadGrammarTest.REFUSED:
            with self.subTest(name):
                responses = self.serve(raw + NEXT_REQUEST)
                self.assertEqual(len(responses), 1)  # the next one is never read
                self.assertIn(words, self.assertProblem(responses[0], status)["detail"])
                self.assertEqual(responses[0].headers["Connection"], "close")

    def test_a_head_cut_short_by_the_client_is_400(self):
        response, = self.serve(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        self.assertIn("empty line", self.assertProblem(response, 400)["detail"])

    def test_a_body_cut_short_by_the_client_is_400(self):
        response, = self.serve(post_head(100) + b'{"user_id":')
        self.assertIn("ended after 11 of 100", self.assertProblem(response, 400)["detail"])

    def test_a_refused_body_is_not_read_as_the_next_request(self):
        responses = self.serve(post_head(len(VALID_BODY), "Content-Type: text/plain\r\n")
                               + VALID_BODY + NEXT_REQUEST)
        self.assertEqual([r.status for r in responses], [415])  # two Content-Types
        responses = self.serve(post_head(10 ** 9) + VALID_BODY + NEXT_REQUEST)
        self.assertEqual([r.status for r in responses], [413])
        self.assertEqual(self.store.count(), 0)

    def test_options_trace_and_connect(self):
        cases = [(b"OPTIONS /appointments HTTP/1.1", 204, "GET, HEAD, POST, OPTIONS"),
                 (b"OPTIONS * HTTP/1.1", 204, "GET, HEAD, POST, PATCH, DELETE, OPTIONS"),
                 (b"TRACE /healthz HTTP/1.1", 405, "GET, HEAD, OPTIONS"),
                 (b"CONNECT example.com:443 HTTP/1.1", 405,
                  "GET, HEAD, POST, PATCH, DELETE, OPTIONS")]
        for line, status, allow in cases:
            with self.subTest(line):
                response, = self.serve(line + b"\r\nHost: t\r\n\r\n")
                self.assertEqual((response.status, response.headers["Allow"]), (status, allow))

    def test_a_phase_changes_only_as_the_table_allows(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        connection = scheduler.Connection(ours, ("192.0.2.1", 50000), _Host(self.service.limits))
        table = scheduler.Connection._NEXT_PHASES
        for phase, allowed in table.items():
            for target in table:
                with self.subTest(phase=phase, target=target):
                    connection._phase = phase
                    if target in allowed:
                        connection._enter(target, None)
                        self.assertEqual(connection.phase, target)
                    else:
                        with self.assertRaisesRegex(RuntimeError, f"a connection cannot go "
                                                                  f"from {phase} to {target}"):
                            connection._enter(target, None)
                        self.assertEqual(connection.phase, phase)

    def test_the_access_log_has_a_line_a_response_with_control_characters_escaped(self):
        _, lines = serve_bytes(self.service, b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: t\r\n\r\n"
                                             b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual(len(lines), 1)  # the first is refused, and ends the connection
        self.assertTrue(lines[0].startswith("192.0.2.1 - - ["))
        self.assertRegex(lines[0], r'"GET /\\x1b\[31mred\\x07 HTTP/1\.1" 400 [0-9]+ [0-9]+ '
                                   r'[0-9a-f-]{36}$')


class FuzzTest(HTTPTestCase):
    """Thousands of seeded random malformed requests through a Connection: each
    gets a 4xx problem response, and the stored appointments never change."""

    SEED = 20261125
    CASES = 2000

    BAD_VALUES = {
        "user_id": [True, None, 1.5, [], {}, "", " x", "x" * 257, "a\x00", "\ud800"],
        "date": ["2025-02-29", "2026-1-5", "20261105", "2026-W45-3", "", 20261125, None,
                 "2026-13-01", "٢٠٢٦-١١-٢٥"],
        "time": ["09:15", "9:00", "24:00", "09:00:00", "", 930, None, "09:60", "noon"],
    }

    def setUp(self):
        super().setUp()
        self.service = scheduler.Service(self.store, scheduler.Limits(max_body_bytes=4096),
                                         log=lambda line, **fields: None)
        for index in range(5):
            self.store.book(appointment(f"fuzz-{index}"))
        self.before = {f"fuzz-{i}": self.stored(f"fuzz-{i}") for i in range(5)}
        self.random = random.Random(self.SEED)

    def junk(self, alphabet: str, longest: int) -> str:
        return "".join(self.random.choice(alphabet) for _ in range(self.random.randint(0, longest)))

    def bad_json(self) -> bytes:
        text = VALID_BODY.decode()
        choice = self.random.randrange(4)
        if choice == 0:  # random bytes
            return bytes(self.random.randrange(256) for _ in range(self.random.randint(0, 80)))
        if choice == 1:  # a valid body cut short
            return text[:self.random.randrange(len(text))].encode()
        if choice == 2:  # a field replaced by a bad value
            fields = json.loads(text)
            name = self.random.choice(sorted(self.BAD_VALUES))
            fields[name] = self.random.choice(self.BAD_VALUES[name])
            return json.dumps(fields).encode()
        return self.random.choice([b"NaN", b'{"a": Infinity}', b'{"a": 1, "a": 2}', b"[" * 3000,
                                   b'"\xff"', b"null", b"[]", b"{}", b"\xef\xbb\xbf{}"])

    def bad_request(self) -> bytes:
        choice = self.random.randrange(6)
        if choice == 0:  # a JSON POST whose body is wrong
            body = self.bad_json()
            return post_head(len(body)) + body
        if choice == 1:  # wrong or broken body headers
            head = self.random.choice([
                post_head(self.junk("-+x0123456789 ,.", 8) + self.random.choice("-x.")),
                post_head(10 ** 9),
                b"POST /appointments HTTP/1.1\r\nContent-Type: application/json\r\n\r\n",
                b"POST /appointments HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
                b"POST /appointments HTTP/1.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ])
            return head
        if choice == 2:  # a query string of random percent-escapes and separators
            query = self.junk("%fFzZ0+&=user_id\x7f", 30)
            return f"GET /appointments?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode("latin-1")
        if choice == 3:  # a random path
            path = "/" + self.junk("/%abcdefghijklmnopqrstuvwxyz.?=&", 40)
            method = self.random.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
            return f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode("latin-1")
        if choice == 4:  # a request line that is not HTTP
            line = self.junk("ABCabc /\t\x00\x1b\xff%", 60).replace(" ", "").encode("latin-1")
            return line + b" / NOT-HTTP\r\n\r\n"
        header = self.junk("abc:\t\x00 \x7f\xe9", 30).encode("latin-1")  # a header line of junk
        return b"GET /appointments?user_id=a HTTP/1.1\r\nHost: t\r\n" + header + b"\r\n" * 2

    def test_malformed_requests_get_problems_and_change_nothing(self):
        for case in range(self.CASES):
            raw = self.bad_request()
            with self.subTest(case=case, raw=raw[:120]):
                response, = serve_bytes(self.service, raw)[0]
                if response.status == 200:  # a junk header line can still be a valid header,
                    method, target = raw.split(b" ")[:2]  # and a random path a page's
                    pages = (b"/", b"/docs", b"/docs.js")
                    self.assertTrue(raw.startswith(b"GET /appointments?user_id=a ") or (
                        method == b"GET" and target.split(b"?")[0] in pages))
                    continue
                self.assertGreaterEqual(response.status, 400)
                self.assertLess(response.status, 500)
                self.assertProblem(response, response.status)
        self.assertEqual(self.store.count(), 5)
        self.assertEqual({user: self.stored(user) for user in self.before}, self.before)



# --- Over sockets: the real server on a free port ----------------------------------------


def start_server(testcase: unittest.TestCase, store=None, limits=None,
                 cors_origins=(), log_format="text") -> scheduler.SchedulerServer:
    """Start the real server on a free port in a thread; stop it when the test ends."""
    server = scheduler.make_server("127.0.0.1", 0, store, log_stream=io.StringIO(),
                                   limits=limits, cors_origins=cors_origins,
                                   log_format=log_format)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    testcase.addCleanup(thread.join)
    testcase.addCleanup(server.server_close)
    testcase.addCleanup(server.shutdown)  # cleanups run last-in, first-out
    return server


class ServerTestCase(HTTPTestCase):
    """Tests that need the wire: a real server, with real connections to it."""

    limits = None  # the defaults; subclasses set short timeouts or small caps
    cors_origins = ()  # none, as without --cors-origin
    log_format = "text"  # as without --log-format

    def setUp(self):
        super().setUp()
        self.server = start_server(self, self.store, self.limits, self.cors_origins,
                                   self.log_format)
        self.host, self.port = self.server.server_address[:2]

    def sample(self, name: str) -> float:
        """A sample of /metrics, as the server makes it now, read in this process: at
        the connection cap, a request for it would be refused."""
        return parse_metrics(self.server.service.metrics.exposition())[(name, frozenset())]

    def server_log(self, until: str) -> str:
        """What the server has logged, once until is in it: the log's thread writes
        the lines out every TICK."""
        stream = self.server.log_stream
        return wait_until(lambda: until in stream.getvalue() and stream.getvalue(),
                          what=f"{until!r} in the server's log")

    def open_socket(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def raw(self, data: bytes) -> Response:
        """Send raw bytes (anything, well-formed or not) on a new connection and read
        one response."""
        with socket.create_connection((self.host, self.port), timeout=10) as sock:
            sock.sendall(data)
            return read_response(sock)

    def connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        self.addCleanup(conn.close)
        return conn

    def request(self, method, path, body=None, headers=None, conn=None) -> Response:
        """Send one request (a dict or list body goes as JSON) and read the answer."""
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        conn = conn or self.connect()
        conn.request(method, path, body=body, headers=headers)
        return self.assertFramed(method, response_of(conn))


class ProtocolTest(ServerTestCase):
    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = self.connect()
        self.assertEqual(self.book("alice", conn=conn).status, 201)
        sock = conn.sock
        statuses = [self.book("alice", conn=conn).status,              # 409
                    self.book("bob", time="9:15", conn=conn).status,   # 422
                    self.request("GET", "/nowhere", conn=conn).status,  # 404
                    self.request("HEAD", "/appointments?user_id=alice", conn=conn).status,
                    self.request("DELETE", "/appointments/alice/2026-11-25", conn=conn).status,
                    self.request("GET", "/appointments?user_id=alice", conn=conn).status]
        self.assertEqual(statuses, [409, 422, 404, 200, 204, 200])
        self.assertIs(conn.sock, sock, "the client had to reconnect")

    def test_absolute_form_request_target_is_served(self):
        self.book()
        response = self.raw(b"GET http://scheduler.test/appointments?user_id=alice HTTP/1.1\r\n"
                            b"Host: scheduler.test\r\n\r\n")
        self.assertEqual((response.status, len(response.json()["appointments"])), (200, 1))

    def test_a_path_containing_scheme_slashes_is_not_cut(self):
        # It was: a proxy allowing only /healthz would have let alice's list through.
        self.book()
        response = self.raw(b"GET /healthz/x://y/appointments?user_id=alice HTTP/1.1\r\n"
                            b"Host: t\r\n\r\n")
        self.assertProblem(response, 404)

    def test_head_sends_the_headers_of_get_and_no_body(self):
        self.book()
        get = self.request("GET", "/appointments?user_id=alice")
        conn = self.connect()
        head = self.request("HEAD", "/appointments?user_id=alice", conn=conn)
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.headers["Content-Length"], get.headers["Content-Length"])
        # A body after the headers would be read as the next response's status line.
        self.assertEqual(self.request("GET", "/healthz", conn=conn).json(), {"status": "ok"})

    def test_a_malformed_request_is_answered_then_closed(self):
        sock = self.open_socket()
        sock.sendall(b"GET / HTTP/1.1\r\nHost : t\r\n\r\n" + NEXT_REQUEST)
        response = read_response(sock)
        self.assertIn("Malformed header", self.assertProblem(response, 400)["detail"])
        self.assertEqual(response.headers["Connection"], "close")
        self.assertEqual(sock.recv(1), b"")

    def test_access_log_has_one_line_per_request(self):
        self.book()
        self.request("GET", "/appointments?user_id=alice")
        lines = self.server_log(until='"GET /appointments').splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn('"POST /appointments HTTP/1.1" 201', lines[0])
        self.assertIn('"GET /appointments?user_id=alice HTTP/1.1" 200', lines[1])


class KeepAliveOverHTTPTest(ServerTestCase):
    """What RFC 9112 says of a connection kept open, on a real one."""

    def test_a_blank_line_before_the_request_line_is_ignored(self):
        conn = self.connect()
        self.assertEqual(self.book(conn=conn).status, 201)
        conn.sock.sendall(b"\r\n")  # after a body, as some clients send
        listed = self.request("GET", "/appointments?user_id=alice", conn=conn).json()
        self.assertEqual(len(listed["appointments"]), 1)

    def test_http_1_0_keep_alive_is_said_in_the_response(self):
        sock = self.open_socket()
        for _ in range(2):  # the second request proves the connection stayed open
            sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = read_response(sock)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.headers["Connection"], "keep-alive")


class BrokenStore(scheduler.InMemoryStore):
    def book(self, appointment, keyed=None):
        raise RuntimeError("disk on fire")


class UnexpectedErrorTest(ServerTestCase):
    def make_store(self):
        return BrokenStore()

    def test_500_without_traceback_and_server_stays_up(self):
        conn = self.connect()
        response = self.book(conn=conn)
        problem = self.assertProblem(response, 500)
        self.assertNotIn("disk on fire", json.dumps(problem))
        request_id = response.headers["X-Request-ID"]
        self.assertEqual(problem["instance"], "urn:uuid:" + request_id)
        log = self.server_log(until="RuntimeError: disk on fire")  # logged, or this fails
        self.assertIn(f"Unexpected error in 'POST /appointments' (request ID {request_id}):\n"
                      "Traceback (most recent call last):\n", log)
        self.assertEqual(self.request("GET", "/appointments?user_id=a", conn=conn).status, 200)


class UnexpectedErrorInJSONTest(ServerTestCase):
    log_format = "json"

    def make_store(self):
        return BrokenStore()

    def test_the_traceback_is_a_member_of_a_line_beside_the_request_id(self):
        response = self.book(headers={"X-Request-ID": "ticket-1234"})
        self.assertEqual(self.assertProblem(response, 500)["request_id"], "ticket-1234")
        lines = [json.loads(line) for line in
                 self.server_log(until='"status": 500').splitlines()]
        error, access = lines  # one line each, whatever the traceback holds
        self.assertEqual((error["request_id"], access["request_id"], access["status"]),
                         ("ticket-1234", "ticket-1234", 500))
        self.assertTrue(error["traceback"].startswith("Traceback (most recent call last):\n"))
        self.assertIn("RuntimeError: disk on fire", error["traceback"])
        self.assertIn("'POST /appointments'", error["message"])
        self.assertRegex(error["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class RequestIdOverHTTPTest(ServerTestCase):
    """The responses the runtime makes itself, before a route is found, carry an
    X-Request-ID too (the client's, if the head it could not read holds one), and
    the access log writes it after the request's duration."""

    CASES = [  # (name, raw request, status, the X-Request-ID sent back: None, one made)
        ("a malformed header line", b"GET / HTTP/1.1\r\nHost: t\r\nX-Request-ID: bad-1\r\n"
         b"X A: b\r\n\r\n", 400, "bad-1"),
        ("101 header lines", b"GET / HTTP/1.1\r\nHost: t\r\nx-request-id: lines-1\r\n"
         + b"X: y\r\n" * 100 + b"\r\n", 431, "lines-1"),
        ("a head past 64 KiB", b"GET / HTTP/1.1\r\nHost: t\r\nX-Request-ID: long-1\r\nX-A: "
         + b"b" * 70_000 + b"\r\n\r\n", 431, None),  # not read: too long
        ("an unknown method", b"BREW / HTTP/1.1\r\nHost: t\r\nX-Request-ID: brew-1\r\n\r\n",
         501, "brew-1"),
        ("a bad ID in a bad head", b"GET /a b HTTP/1.1\r\nHost: t\r\nX-Request-ID: a\"b\r\n"
         b"\r\n", 400, None),
        ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505, None),
    ]

    def test_answers_to_heads_that_cannot_be_read_carry_one(self):
        for name, raw, status, sent_back in self.CASES:
            with self.subTest(name):
                response = self.raw(raw)
                problem = self.assertProblem(response, status)
                request_id = response.headers["X-Request-ID"]
                if sent_back is None:
                    made_request_id(self, request_id)
                    self.assertEqual(problem["instance"], "urn:uuid:" + request_id)
                else:
                    self.assertEqual((request_id, problem["request_id"]), (sent_back, sent_back))
                line = self.server_log(until=f" {request_id}\n").splitlines()[-1]
                self.assertRegex(line, rf'" {status} {len(response.body)} [0-9]+ '
                                       rf'{re.escape(request_id)}$')

    def test_the_access_log_appends_the_duration_and_the_id_to_http_servers_line(self):
        self.book()
        self.request("GET", "/appointments?user_id=alice", headers={"X-Request-ID": "t-1"})
        line = self.server_log(until=" t-1\n").splitlines()[-1]
        self.assertRegex(line, r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4} \d\d:\d\d:\d\d\] '
                               r'"GET /appointments\?user_id=alice HTTP/1\.1" 200 \d+ \d+ t-1$')


class AccessLogDurationTest(ServerTestCase):
    """The duration the access log writes runs from the request's head read to its
    response ready to send, as /metrics' histogram counts it."""

    def make_store(self):
        return BlockingStore()

    def test_it_covers_the_time_the_route_took(self):
        sent = time.perf_counter()
        client = threading.Thread(target=self.book, kwargs={"headers": {"X-Request-ID": "slow"}})
        client.start()
        self.addCleanup(client.join)
        self.assertTrue(self.store.inside.wait(10))
        inside = time.perf_counter()  # the head has been read; the reply is not made
        self.assertEqual(self.request("GET", "/healthz").status, 200)  # meanwhile, something
        released = time.perf_counter()
        self.store.go_on.set()
        client.join()
        answered = time.perf_counter()
        line = self.server_log(until=" slow\n").splitlines()[-1]
        microseconds = int(line.split()[-2])
        self.assertGreaterEqual(microseconds, int((released - inside) * 1_000_000))
        self.assertLessEqual(microseconds, (answered - sent) * 1_000_000)


class AccessLogInJSONTest(ServerTestCase):
    """--log-format json: one JSON object a line, whatever bytes a client sends."""

    log_format = "json"
    AGENT = b'Mozilla/5.0 "quoted" \\ \tand \x80\xff\xfe\xc3\xa9 obs-text }"{'
    REQUESTS = [  # (raw request, status, the request ID it carries)
        (b"GET /appointments?user_id=%22%5C HTTP/1.1\r\nHost: t\r\nUser-Agent: " + AGENT
         + b"\r\nX-Request-ID: agent\r\n\r\n", 200, "agent"),
        (b"GET /\x1b[2J\x00\x07\"}\\ HTTP/1.1\r\nHost: t\r\nX-Request-ID: control\r\n\r\n", 400,
         "control"),
        (b"GET /\xff\xfe\xc3 HTTP/1.1\r\nHost: t\r\nX-Request-ID: utf-8\r\n\r\n", 400, "utf-8"),
        (b"GET /" + b"a" * 60_000 + b"?q=\xe9 HTTP/1.1\r\nHost: t\r\nX-Request-ID: long\r\n\r\n",
         400, "long"),
        (b"GET /" + b"%22" * 20_000 + b" HTTP/1.1\r\nHost: t\r\nX-Request-ID: quotes\r\n\r\n",
         404, "quotes"),
        (b"POST /appointments HTTP/1.1\r\nHost: t\r\nX-Request-ID: cut\r\n\r\n", 415, "cut"),
    ]

    def test_each_line_is_one_object_whatever_the_client_sent(self):
        sent = {}
        for raw, status, request_id in self.REQUESTS:
            response = self.raw(raw)
            self.assertEqual((response.status, response.headers["X-Request-ID"]),
                             (status, request_id))
            sent[request_id] = (raw, response)
        text = self.server_log(until='"request_id": "cut"')
        lines = text.splitlines()
        self.assertEqual(len(lines), len(self.REQUESTS))
        for line in lines:
            self.assertTrue(line.isascii() and line.isprintable(), line[:200])
        logged = {entry["request_id"]: entry for entry in map(json.loads, lines)}
        self.assertEqual(set(logged), set(sent))
        for request_id, (raw, response) in sent.items():
            with self.subTest(request_id=request_id):
                entry = logged[request_id]
                method, target, protocol = raw.split(b"\r\n")[0].split(b" ")
                self.assertEqual(
                    (entry["client"], entry["method"], entry["target"], entry["protocol"],
                     entry["status"], entry["bytes"]),
                    ("127.0.0.1", "GET" if method == b"GET" else "POST",
                     target.decode("latin-1"), "HTTP/1.1", response.status,
                     len(response.body)))
                self.assertIsInstance(entry["duration_us"], int)
                self.assertGreaterEqual(entry["duration_us"], 0)
                self.assertRegex(entry["time"],
                                 r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        # Each byte is a character (ISO-8859-1): what was sent can be had back.
        self.assertEqual(logged["agent"]["user_agent"].encode("latin-1"), self.AGENT)
        self.assertEqual(logged["control"]["user_agent"], None)  # not read: a bad head
        self.assertEqual(logged["cut"]["user_agent"], None)  # none sent


class RaceTest(ServerTestCase):
    def test_simultaneous_bookings_for_one_date_create_exactly_one(self):
        clients = 24
        barrier = threading.Barrier(clients)
        results = [None] * clients

        def book(index):
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                conn.connect()
                barrier.wait()
                response = post_json(conn, {"user_id": "racer", "date": "2026-11-25",
                                            "time": f"{index % 24:02d}:00"})
                results[index] = (response.status, response.json())
            finally:
                conn.close()

        threads = [threading.Thread(target=book, args=(i,)) for i in range(clients)]
        run_all(threads)
        statuses = sorted(status for status, _ in results)
        self.assertEqual(statuses, [201] + [409] * (clients - 1))
        winner = next(body for status, body in results if status == 201)
        for status, body in results:
            if status == 409:
                self.assertEqual(body["appointment"], winner)
        listed = self.request("GET", "/appointments?user_id=racer").json()["appointments"]
        self.assertEqual(listed, [winner])


class BodyLimitTest(ServerTestCase):
    limits = scheduler.Limits(max_body_bytes=1000, request_timeout=2.0)

    def test_declared_length_over_the_cap_is_413_before_the_body_is_read(self):
        response = self.raw(post_head(10 ** 9))  # no body follows: it is never waited for
        self.assertIn("limit is 1000", self.assertProblem(response, 413)["detail"])
        self.assertEqual(response.headers["Connection"], "close")

    def test_a_length_of_any_number_of_digits_is_read(self):
        # Python refuses to make an int of over 4,300 digits (3.11 on): this was a 500.
        response = self.raw(post_head("9" * 5000))
        self.assertIn("(5000 digits)", self.assertProblem(response, 413)["detail"])
        response = self.raw(post_head("0" * 5000 + str(len(VALID_BODY))) + VALID_BODY)
        self.assertEqual(response.status, 201)
        self.assertEqual(self.store.count(), 1)

    def test_a_large_body_sent_anyway_still_gets_its_413(self):
        # The server closes without reading; lingering on close keeps the reset that
        # unread bytes would cause from destroying the 413 before the client reads it.
        body = b"x" * 500_000
        response = self.request("POST", "/appointments", body, {"Content-Type": "application/json"})
        self.assertProblem(response, 413)
        self.assertEqual(self.store.count(), 0)

    def test_expect_100_continue_is_refused_without_continue(self):
        sock = self.open_socket()
        sock.sendall(post_head(5000, "Expect: 100-continue\r\n"))
        self.assertProblem(read_response(sock), 413)  # not "100 Continue" first

    def test_expect_100_continue_is_honoured_for_an_acceptable_body(self):
        sock = self.open_socket()
        sock.sendall(post_head(len(VALID_BODY), "Expect: 100-continue\r\n"))
        self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(VALID_BODY)
        self.assertEqual(read_response(sock).status, 201)

    def test_post_without_content_length_is_411(self):
        head = b"POST /appointments HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\r\n"
        self.assertProblem(self.raw(head), 411)

    def test_chunked_body_is_411(self):
        head = (b"POST /appointments HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n0\r\n\r\n")
        self.assertIn("Content-Length", self.assertProblem(self.raw(head), 411)["detail"])

    BAD_LENGTHS = ["-1", "abc", "1e3", "+5", "0x10", "١٢", "5, 5"]

    def test_bad_content_length_is_400(self):
        for length in self.BAD_LENGTHS:
            with self.subTest(length=length):
                response = self.raw(post_head(length))
                self.assertIn("Content-Length", self.assertProblem(response, 400)["detail"])

    def test_two_content_lengths_are_400(self):
        head = post_head(len(VALID_BODY), f"Content-Length: {len(VALID_BODY)}\r\n")
        self.assertProblem(self.raw(head + VALID_BODY), 400)
        self.assertEqual(self.store.count(), 0)


class SlowClientTest(ServerTestCase):
    limits = scheduler.Limits(request_timeout=0.25, idle_timeout=0.25, first_byte_timeout=0.25)

    def assertClosed(self, sock: socket.socket):
        """The server closed the connection (end of file), within the socket timeout."""
        self.assertEqual(sock.recv(1), b"")

    def test_body_shorter_than_its_length_gets_408_not_a_stuck_thread(self):
        sock = self.open_socket()
        sock.sendall(post_head(100) + b'{"user_id":')
        problem = self.assertProblem(read_response(sock), 408)
        self.assertIn("0.25 seconds", problem["detail"])
        self.assertClosed(sock)
        # Its duration runs from the head read, as any request's does: the wait for the
        # body is in it (the histogram's, and so the log's, which is the same figure).
        labels = frozenset({"route": "/appointments", "method": "POST"}.items())
        waited = wait_until(lambda: parse_metrics(self.request("GET", "/metrics").body.decode())
                            .get(("scheduler_request_duration_seconds_sum", labels)),
                            what="the 408's duration observed")
        self.assertGreaterEqual(waited, 0.25 * 0.9)

    def test_headers_that_never_end_get_408(self):
        sock = self.open_socket()
        sock.sendall(b"GET /appointments?user_id=a HTTP/1.1\r\nHost: t\r\n")
        self.assertProblem(read_response(sock), 408)

    def test_slowloris_is_cut_off_while_others_are_served(self):
        slow = self.open_socket()
        request = b"GET /appointments?user_id=alice HTTP/1.1\r\n" + b"X: y\r\n" * 200
        stop = threading.Event()

        def trickle():  # a byte every 20 ms: 25 s if never cut off
            for index in range(len(request)):
                try:
                    slow.sendall(request[index:index + 1])
                except OSError:  # cut off
                    return
                if stop.wait(0.02):
                    return

        trickler = threading.Thread(target=trickle)
        trickler.start()
        self.addCleanup(trickler.join)
        self.addCleanup(stop.set)
        for _ in range(10):  # meanwhile, other clients get normal service
            self.assertEqual(self.request("GET", "/appointments?user_id=bob").status, 200)
        self.assertProblem(read_response(slow), 408)  # blocks until the server answers

    def test_idle_keep_alive_connection_is_closed(self):
        conn = self.connect()
        self.assertEqual(self.request("GET", "/appointments?user_id=a", conn=conn).status, 200)
        self.assertClosed(conn.sock)

    def test_connection_that_sends_nothing_is_closed_without_a_response(self):
        self.assertClosed(self.open_socket())

    def test_client_that_does_not_read_its_response_is_cut_off(self):
        first, many = dt.date(2026, 1, 1), "m" * 256
        self.store.user_capacity = 22_000
        for day in range(22_000):  # a listing of 8.4 MB, more than socket buffers hold
            self.store.book(scheduler.Appointment(many, dt.datetime.combine(
                first + dt.timedelta(days=day), dt.time(9), tzinfo=UTC)))
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((self.host, self.port))
        sock.sendall(f"GET /appointments?user_id={many} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        # Never read: the server's write blocks until the watchdog cuts it off,
        # and the connection's slot is given back.
        self.server_log(until="connection dropped")  # the stalled write was cut off
        self.assertEqual(self.request("GET", "/appointments?user_id=a").status, 200)


class LargeReplyTest(ServerTestCase):
    def test_a_body_sent_apart_from_its_head_arrives_whole_and_the_connection_serves_on(self):
        book_many(self.store, "alice", 600)  # a listing of over SEND_APART_BYTES
        expected = Client(self.store).request("GET", "/appointments?user_id=alice")
        self.assertGreater(len(expected.body), scheduler.SEND_APART_BYTES)
        conn = self.connect()
        for _ in range(3):  # made, made again, kept
            got = self.request("GET", "/appointments?user_id=alice", conn=conn)
            self.assertEqual((got.status, got.body), (200, expected.body))
        self.assertEqual(self.request("HEAD", "/appointments?user_id=alice", conn=conn).body, b"")
        self.assertEqual(self.request("GET", "/healthz", conn=conn).status, 200)


class HungUpClientTest(ServerTestCase):
    def make_store(self):
        store = scheduler.InMemoryStore()
        book_many(store, "alice", scheduler.KEPT_FROM)
        self.reading, self.hung_up = threading.Event(), threading.Event()
        read = store.list_for_user

        def list_for_user(*args):  # until the client has gone
            self.reading.set()
            self.hung_up.wait(10)
            return read(*args)

        store.list_for_user = list_for_user
        return store

    def test_a_large_reply_is_not_made_for_a_client_that_hung_up(self):
        sock = socket.create_connection((self.host, self.port), timeout=10)
        sock.sendall(b"GET /appointments?user_id=alice HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertTrue(self.reading.wait(10))
        sock.close()
        self.hung_up.set()
        line, = [line for line in self.server_log(until="GET /appointments").splitlines()
                 if "GET /appointments" in line]
        self.assertRegex(line, r'"GET /appointments\?user_id=alice HTTP/1\.1" 499 0 [0-9]+ \S+$')
        self.assertEqual(self.metric("scheduler_requests_total", route="/appointments",
                                     method="GET", status="499"), 1)


class ConnectionCapTest(ServerTestCase):
    limits = scheduler.Limits(max_connections=3)

    def busy_connections(self, count: int) -> List[socket.socket]:
        """Connections each in the middle of a request, once the server has seen so."""
        busy = [self.open_socket() for _ in range(count)]
        for sock in busy:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and the rest never comes
        wait_until(lambda: self.sample("scheduler_connections_reading") == count,
                   what=f"{count} connections reading requests")
        return busy

    def test_with_every_slot_busy_503_with_retry_after_then_recovery(self):
        busy = self.busy_connections(3)
        refused = self.raw(b"GET /appointments?user_id=a HTTP/1.1\r\nHost: t\r\n\r\n")
        problem = self.assertProblem(refused, 503)
        self.assertEqual(refused.headers["Retry-After"], "1")
        self.assertEqual(refused.headers["Connection"], "close")
        self.assertIn("maximum of 3", problem["detail"])
        request_id = refused.headers["X-Request-ID"]
        self.assertEqual(problem["instance"], "urn:uuid:" + request_id)
        self.server_log(until=f"- - refused: 3 connections open; 503 {request_id}\n")
        busy[0].sendall(b"Host: t\r\nConnection: close\r\n\r\n")  # one finishes
        self.assertEqual(read_response(busy[0]).status, 200)
        busy[0].close()
        # The slot frees as soon as the server has seen the close, which takes a moment.
        statuses = []
        wait_until(lambda: statuses.append(self.request("GET", "/appointments?user_id=a").status)
                   or statuses[-1] != 503, what="the freed slot to serve a new client")
        self.assertEqual(statuses[-1], 200)

    def test_at_the_cap_the_longest_idle_connection_makes_room(self):
        idle = [self.connect() for _ in range(3)]
        for conn in idle:  # oldest first: each is served, then waits for another request
            self.assertEqual(self.request("GET", "/healthz", conn=conn).status, 200)
        # A client has its response before the server's thread is back to waiting.
        wait_until(lambda: self.sample("scheduler_connections_waiting") == 3,
                   what="the three connections waiting")
        self.assertEqual(self.raw(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").status, 200)
        self.assertEqual(idle[0].sock.recv(1), b"")  # closed to make room
        for conn in idle[1:]:  # the others were not disturbed
            self.assertEqual(self.request("GET", "/healthz", conn=conn).status, 200)
        self.server_log(until="- - closed after waiting longest, to make room")
        # Asked on a connection already open: a new one might make room again.
        self.assertEqual(self.metric("scheduler_connections_evicted_total", idle[1]), 1)

    def test_metrics_count_the_refused(self):
        busy = self.busy_connections(3)
        self.assertProblem(self.raw(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"), 503)
        busy[0].close()
        wait_until(lambda: self.sample("scheduler_connections_open") < 3,
                   what="a slot to free")
        conn = self.connect()  # one connection: a second would find the server at its cap
        self.assertEqual(self.metric("scheduler_connections_refused_total", conn), 1)
        self.assertEqual(self.metric("scheduler_connections_open", conn), 3)  # 2 busy, and this


class LoadTest(ServerTestCase):
    """Mixed keep-alive traffic from many threads: every answer is right and the
    store ends holding exactly what the successful bookings created."""

    THREADS, REQUESTS = 16, 100

    def test_mixed_traffic_is_answered_correctly(self):
        failures, created = [], []  # list.append is atomic

        def client(number):
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            user, booked = f"load-{number}", 0
            try:
                conn.connect()
                sock = conn.sock
                for index in range(self.REQUESTS):
                    day = dt.date(2026, 1, 1) + dt.timedelta(days=index // 3)
                    kind = index % 3
                    if kind == 2:
                        conn.request("GET", f"/appointments?user_id={user}")
                        response = response_of(conn)
                    else:  # a new booking, then a second one that date
                        time = "09:00" if kind == 0 else "10:30"
                        response = post_json(conn, {"user_id": user, "date": day.isoformat(),
                                                    "time": time})
                    body = response.json()
                    expected = (201, 409, 200)[kind]
                    if response.status != expected:
                        failures.append((user, index, response.status, body))
                    elif kind == 0:
                        booked += 1
                        created.append(body)
                    elif kind == 2 and len(body["appointments"]) != booked:
                        failures.append((user, index, "listed", len(body["appointments"])))
                    if conn.sock is not sock:
                        failures.append((user, index, "reconnected"))
            except Exception as error:  # a dropped connection, a timeout...
                failures.append((user, repr(error)))
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(self.THREADS)]
        run_all(threads)
        self.assertEqual(failures, [])
        self.assertEqual(self.store.count(), len(created))
        stored = [a.as_json() for n in range(self.THREADS) for a in self.stored(f"load-{n}")]
        self.assertEqual(sorted(map(json.dumps, stored)), sorted(map(json.dumps, created)))


def rss_bytes(pid: int) -> int:
    """A process's resident memory, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class _StuckStream(io.StringIO):
    """A log stream whose reader has stopped reading, until released."""

    def __init__(self):
        super().__init__()
        self.blocked, self.released = threading.Event(), threading.Event()

    def write(self, text: str) -> int:
        self.blocked.set()
        self.released.wait(30)
        return super().write(text)


class StuckLogTest(unittest.TestCase):
    def test_the_backlog_is_capped_in_bytes_and_the_drops_are_counted(self):
        stream = _StuckStream()
        log = scheduler.Log(stream)
        log.start()
        self.addCleanup(log.close, 0)
        self.addCleanup(stream.released.set)
        log.add("first")
        wait_until(stream.blocked.is_set, what="the log writer to block")
        line = "x" * 999
        for _ in range(3 * scheduler.LOG_BACKLOG_BYTES // 1000):  # 3 MB for a 1 MiB backlog
            log.add(line)
        kept = 3 * scheduler.LOG_BACKLOG_BYTES // 1000 - log.dropped
        self.assertLessEqual(kept * 1000, scheduler.LOG_BACKLOG_BYTES)
        self.assertGreater(kept, 0)
        stream.released.set()
        self.assertTrue(log.close(timeout=10))
        written = stream.getvalue().splitlines()
        self.assertEqual(written[0], "first")
        self.assertEqual(len(written), 1 + kept + 1)  # the newest lines, then the count
        self.assertEqual(written[-1], f"{log.dropped} log line(s) were dropped: the log's "
                                      "reader did not keep up.")

    @unittest.skipUnless(os.path.exists("/proc/self/status"), "reads memory from /proc")
    def test_a_log_nobody_reads_holds_little_memory_and_does_not_stop_shutdown(self):
        process = subprocess.Popen([*PYTHON, *SERVICE, "--port", "0", "--shutdown-timeout",
                                    "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=HERE)  # stderr is never read: its pipe fills
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdout.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        host, port = process.stdout.readline().split()[2][len("http://"):].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        self.addCleanup(conn.close)
        before = rss_bytes(process.pid)
        for _ in range(500):  # 30 MB of access-log lines
            conn.request("GET", "/healthz?pad=" + "x" * 60_000)
            response = conn.getresponse()
            response.read()
            self.assertEqual(response.status, 200)
        self.assertLess(rss_bytes(process.pid) - before, 16 << 20)
        conn.close()
        process.send_signal(signal.SIGTERM)
        # Draining (1 s at most) and closing the log (LOG_CLOSE_SECONDS), with room to spare.
        self.assertEqual(process.wait(timeout=1 + scheduler.LOG_CLOSE_SECONDS + 5), 0)


class ConnectionSlotTest(ServerTestCase):
    limits = scheduler.Limits(first_byte_timeout=0.1)

    def test_a_new_connection_that_sends_nothing_is_closed_at_the_first_byte_deadline(self):
        self.assertEqual(self.open_socket().recv(1), b"")  # not after the 30 s idle timeout

    def test_after_a_request_the_idle_timeout_applies(self):
        conn = self.connect()
        self.assertEqual(self.request("GET", "/healthz", conn=conn).status, 200)
        # Three first-byte deadlines later the connection is still open...
        self.assertEqual(select.select([conn.sock], [], [], 0.3)[0], [])
        self.assertEqual(self.request("GET", "/healthz", conn=conn).status, 200)  # ...and serves


@unittest.skipUnless(os.path.exists("/proc/self/status"), "reads memory from /proc")
class HeaderMemoryTest(unittest.TestCase):
    """The memory a client can make the server hold with request heads: bounded by
    MAX_HEAD_BYTES a connection, whatever the client sends."""

    SLOTS = 64

    def attack(self, server: ServerProcess, connections: int, lines: int, length: int) -> None:
        """Connections that each send a request line and header lines of length
        bytes, and never finish; returns when each has sent all or been cut off."""
        def send():
            sock = socket.create_connection((server.host, server.port), timeout=10)
            self.addCleanup(sock.close)
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
                for number in range(lines):
                    sock.sendall(b"X-%03d: %s\r\n" % (number, b"v" * (length - 9)))
            except OSError:  # answered 431 and closed
                pass

        run_all([threading.Thread(target=send) for _ in range(connections)])

    def test_every_slot_full_of_the_largest_unfinished_head(self):
        server = start_process(self, [*SERVICE, "--port", "0", "--max-connections",
                                      str(self.SLOTS)], keep_log=False)
        before = rss_bytes(server.process.pid)
        self.attack(server, self.SLOTS, lines=63, length=1000)  # just under 64 KiB each
        wait_until(lambda: self.held(server) >= self.SLOTS, what="every slot to be taken")
        self.assertLess(rss_bytes(server.process.pid) - before, self.SLOTS * 192 << 10)
        # 100 header lines of 64 KiB each (6.4 MB a connection) were held whole before.
        self.attack(server, 16, lines=98, length=65_000)
        self.assertLess(rss_bytes(server.process.pid) - before, (self.SLOTS * 192 + 8192) << 10)

    def held(self, server: ServerProcess) -> int:
        """How many connections the server holds open: its sockets but the listening one."""
        return open_sockets(server.process.pid) - 1

    @unittest.skipUnless(os.path.exists("/proc/net/tcp"), "reads queues from /proc/net/tcp")
    def test_with_cors_a_head_past_the_limit_is_searched_for_its_origin_not_held(self):
        # With --cors-origin, the server reads up to ORIGIN_SEARCH_BYTES of a head too
        # long, for its Origin; it held all of that a connection (332 KiB each before).
        server = start_process(self, [*SERVICE, "--port", "0", "--max-connections",
                                      str(self.SLOTS), "--cors-origin", "https://a.example"],
                               keep_log=False)
        before = rss_bytes(server.process.pid)
        self.attack(server, self.SLOTS, lines=250, length=1000)  # 250 KB each, no Origin
        wait_until(lambda: self.every_byte_read(server.port, self.SLOTS),
                   what="the server to read every byte sent")
        self.assertLess(rss_bytes(server.process.pid) - before, self.SLOTS * 192 << 10)

    @staticmethod
    def every_byte_read(port: int, connections: int) -> bool:
        """Whether as many connections to port are open, and every byte their clients
        sent has been read by the server (Linux's queues in /proc/net/tcp)."""
        ends = []
        with open("/proc/net/tcp") as table:
            for line in itertools.islice(table, 1, None):
                local, remote, state, queues = line.split()[1:5]
                if state == "01" and port in (int(local[-4:], 16), int(remote[-4:], 16)):
                    ends.append(queues != "00000000:00000000")  # transmit:receive
        return len(ends) == 2 * connections and not any(ends)


class DescriptorTest(unittest.TestCase):
    def test_the_cap_fits_ulimit_n_and_a_burst_past_it_is_answered(self):
        server = start_process(self, [*SERVICE, "--port", "0"], preexec_fn=lambda: (
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))))
        cap = 64 - scheduler.DESCRIPTOR_RESERVE
        wait_for_log(server, f"Serving at most {cap} connections")
        burst = []
        for _ in range(cap + 40):  # more connections than the process has descriptors for
            sock = socket.create_connection((server.host, server.port), timeout=10)
            self.addCleanup(sock.close)
            burst.append(sock)
        closed = set()  # each new one past the cap closes the one idle longest
        wait_until(lambda: closed.update(select.select(burst, [], [], 0.1)[0]) or
                   len(closed) == 40, what="40 idle connections closed to make room")
        self.assertEqual([sock.recv(1) for sock in closed], [b""] * 40)
        self.assertEqual(http_status(server, "/healthz"), 200)

    def test_accept_out_of_descriptors_backs_off_logs_once_and_recovers(self):
        server = scheduler.make_server("127.0.0.1", 0, log_stream=io.StringIO())
        self.addCleanup(server.server_close)
        listening, tries = server.socket, []

        class OutOfDescriptors:  # the listening socket, failing its first three accepts
            def __getattr__(self, name):
                return getattr(listening, name)

            def accept(self):
                tries.append(time.monotonic())
                if len(tries) <= 3:
                    raise OSError(errno.EMFILE, "Too many open files")
                return listening.accept()

        server.socket = OutOfDescriptors()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.shutdown)
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/healthz")
        self.assertEqual(conn.getresponse().status, 200)
        self.assertEqual(len(tries), 4)  # three failures, then success: no busy loop
        log = wait_until(lambda: "Accepting connections again." in server.log_stream.getvalue()
                         and server.log_stream.getvalue(), what="the log of the recovery")
        self.assertEqual(log.count("Cannot accept connections: Too many open files"), 1)


def readme_examples():
    """The README's curl examples in order: (command, documented output or None).

    An example is a ```sh block that starts with curl; the ```json, ```http or
    ```text block right after it, if any, is what the command prints. A ```sh
    block of "python3 scheduler.py --cors-origin ..." alone restarts the server
    with those options, for the examples after it (its output is None).
    """
    with open(README, encoding="utf-8") as file:
        blocks = re.findall(r"```(\w+)\n(.*?)```", file.read(), re.DOTALL)
    examples = []
    for (kind, text), (next_kind, next_text) in zip(blocks, blocks[1:] + [("", "")]):
        if kind == "sh" and text.startswith("curl "):
            examples.append((text, next_text if next_kind in ("json", "http", "text") else None))
        elif kind == "sh" and text.startswith("python3 scheduler.py --cors-origin"):
            examples.append((text, None))
    return examples


def without_varying_lines(text: str) -> str:
    """The text without the lines that change from run to run: the Date and Server
    headers; in a calendar feed, the time it was made, and each event's UID and
    LAST-MODIFIED (the UID holds when it was booked); and with each request's ID
    (the X-Request-ID header, a problem's instance) as one made here, blanked out."""
    text = re.sub(r"(?m)^(X-Request-ID: |.*\"instance\": \"urn:uuid:)[0-9a-f]{8}-[0-9a-f]{4}-"
                  r"8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", r"\1(an ID)", text)
    return "\n".join(line for line in text.replace("\r\n", "\n").split("\n")
                     if not line.startswith(("Date: ", "Server: ", "DTSTAMP:", "UID:",
                                             "LAST-MODIFIED:")))


@unittest.skipUnless(shutil.which("curl"), "curl is not installed")
class ReadmeExamplesTest(ServerTestCase):
    """Every curl example in the README works as written and prints what it shows."""

    def test_examples_print_what_the_readme_shows(self):
        examples = readme_examples()
        self.assertGreaterEqual(len(examples), 8)
        host, port = self.host, self.port
        for command, documented in examples:
            if command.startswith("python3 scheduler.py"):  # the same store, new options
                options = scheduler.parse_args(shlex.split(command, comments=True)[2:])
                server = start_server(self, self.store, cors_origins=tuple(options.cors_origins))
                host, port = server.server_address[:2]
                continue
            with self.subTest(command=command):
                command = command.replace("http://127.0.0.1:8000", f"http://{host}:{port}")
                result = subprocess.run(["bash", "-c", "curl -s " + command[len("curl "):]],
                                        capture_output=True, text=True, timeout=30)
                self.assertEqual(result.returncode, 0, result.stderr)
                if documented is not None:
                    self.assertEqual(without_varying_lines(result.stdout),
                                     without_varying_lines(documented))


# --- What browsers, calendar apps and Prometheus do, over the wire -------------------


ORIGIN = "https://app.example.com"


class CORSTest(ServerTestCase):
    """--cors-origin, tested as a browser calls: a preflight OPTIONS with the headers
    browsers send, then the request itself (the Fetch standard)."""

    cors_origins = (ORIGIN, "http://localhost:3000")

    def preflight(self, origin: str, method: str, path: str = "/appointments") -> Response:
        return self.request("OPTIONS", path, headers={
            "Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type"})

    def test_preflight_then_booking_from_an_allowed_origin(self):
        preflight = self.preflight(ORIGIN, "POST")
        self.assertEqual(preflight.status, 204)
        headers = preflight.headers
        self.assertEqual(headers["Access-Control-Allow-Origin"], ORIGIN)
        self.assertIn("POST", headers["Access-Control-Allow-Methods"].split(", "))
        self.assertIn("content-type", headers["Access-Control-Allow-Headers"].lower())
        self.assertIn("if-none-match", headers["Access-Control-Allow-Headers"].lower())
        self.assertGreater(int(headers["Access-Control-Max-Age"]), 0)
        self.assertEqual(headers["Vary"], "Origin")
        booked = self.book(headers={"Origin": ORIGIN})
        self.assertEqual(booked.status, 201)
        self.assertEqual(booked.headers["Access-Control-Allow-Origin"], ORIGIN)
        self.assertEqual(booked.headers["Vary"], "Origin")
        exposed = booked.headers["Access-Control-Expose-Headers"].split(", ")
        self.assertTrue({"Location", "ETag"} <= set(exposed), exposed)

    def test_errors_carry_the_headers_too(self):
        self.book()
        for response in (self.book(time="15:00", headers={"Origin": ORIGIN}),  # 409
                         self.book(time="9:15", headers={"Origin": ORIGIN}),  # 422
                         self.request("GET", "/nowhere", headers={"Origin": ORIGIN})):  # 404
            with self.subTest(status=response.status):
                self.assertGreaterEqual(response.status, 400)
                self.assertEqual(response.headers["Access-Control-Allow-Origin"], ORIGIN)
                self.assertEqual(response.headers["Vary"], "Origin")

    def test_reschedule_and_conditional_get_from_a_browser(self):
        self.book()
        url = "/appointments/alice/2026-11-25"
        preflight = self.preflight("http://localhost:3000", "PATCH", url)
        self.assertIn("PATCH", preflight.headers["Access-Control-Allow-Methods"].split(", "))
        moved = self.request("PATCH", url, '{"date": "2026-11-26"}',
                             {"Origin": "http://localhost:3000",
                              "Content-Type": "application/merge-patch+json"})
        self.assertEqual(moved.status, 200)
        self.assertEqual(moved.headers["Access-Control-Allow-Origin"], "http://localhost:3000")
        tag = self.request("GET", "/appointments?user_id=alice").headers["ETag"]
        unchanged = self.request("GET", "/appointments?user_id=alice",
                                 headers={"Origin": ORIGIN, "If-None-Match": tag})
        self.assertEqual(unchanged.status, 304)
        self.assertEqual(unchanged.headers["Access-Control-Allow-Origin"], ORIGIN)

    def test_another_origin_gets_the_same_status_and_no_cors_headers(self):
        for response in (self.preflight("https://evil.example", "POST"),
                         self.book(headers={"Origin": "https://evil.example"}),
                         self.book(headers={"Origin": "https://app.example.com.evil.example"}),
                         self.book(headers={"Origin": "null"})):
            with self.subTest(status=response.status):
                self.assertIn(response.status, (204, 201, 409))
                self.assertFalse([name for name in response.headers
                                  if name.lower().startswith("access-control-")])
                self.assertEqual(response.headers["Vary"], "Origin")  # a cache must know
        self.assertEqual(len(self.stored()), 1)  # CORS protects reading, not sending


WITH_ORIGIN = f"Host: t\r\nOrigin: {ORIGIN}\r\n".encode()


class CORSBeforeARoute:
    """With --cors-origin, the responses made before a route is found carry the CORS
    headers too, so that a page's script can read why its request failed."""

    cors_origins = (ORIGIN,)

    def assertCORS(self, response: Response, status: int):
        problem = self.assertProblem(response, status)
        request_id = response.headers["X-Request-ID"]  # and a script may read it:
        self.assertIn("X-Request-ID", response.headers["Access-Control-Expose-Headers"])
        self.assertEqual(problem["instance"], "urn:uuid:" + request_id)
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], ORIGIN)
        self.assertEqual(response.headers["Vary"], "Origin")
        self.assertIn("Retry-After", response.headers["Access-Control-Expose-Headers"])


class CORSBeforeARouteTest(CORSBeforeARoute, ServerTestCase):
    CASES = [  # (name, raw request, status)
        ("a malformed header", b"GET / HTTP/1.1\r\n" + WITH_ORIGIN + b"X A: b\r\n\r\n", 400),
        ("a URL past 64 KiB", b"GET /?q=" + b"x" * 70_000 + b" HTTP/1.1\r\n" + WITH_ORIGIN
         + b"\r\n", 414),
        ("a head past 64 KiB", b"GET / HTTP/1.1\r\n" + WITH_ORIGIN + b"X-A: " + b"b" * 70_000
         + b"\r\n\r\n", 431),
        ("101 header lines", b"GET / HTTP/1.1\r\n" + WITH_ORIGIN + b"X: y\r\n" * 100 + b"\r\n",
         431),
        ("an unknown method", b"BREW / HTTP/1.1\r\n" + WITH_ORIGIN + b"\r\n", 501),
        ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + WITH_ORIGIN + b"\r\n", 505),
    ]

    def test_errors_before_a_route_carry_the_headers(self):
        for name, raw, status in self.CASES:
            with self.subTest(name):
                self.assertCORS(self.raw(raw), status)

    def test_an_origin_past_the_first_256_kib_is_not_looked_for(self):
        response = self.raw(b"GET /?q=" + b"x" * scheduler.ORIGIN_SEARCH_BYTES + b" HTTP/1.1\r\n"
                            + WITH_ORIGIN + b"\r\n")
        self.assertEqual((response.status, response.headers["Vary"]), (414, "Origin"))
        self.assertNotIn("Access-Control-Allow-Origin", response.headers)

    def test_without_an_origin_they_still_vary_on_it(self):
        response = self.raw(b"BREW / HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual((response.status, response.headers["Vary"]), (501, "Origin"))
        self.assertNotIn("Access-Control-Allow-Origin", response.headers)


class CORSAfterADeadlineTest(CORSBeforeARoute, ServerTestCase):
    limits = scheduler.Limits(request_timeout=0.25)

    def test_a_head_cut_off_by_the_deadline_carries_them(self):
        self.assertCORS(self.raw(b"GET / HTTP/1.1\r\n" + WITH_ORIGIN), 408)


class CORSAtTheCapTest(CORSBeforeARoute, ServerTestCase):
    limits = scheduler.Limits(max_connections=2)

    def test_the_503_at_the_connection_cap_carries_them(self):
        busy = [self.open_socket() for _ in range(2)]
        for sock in busy:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and the rest never comes in time
        wait_until(lambda: self.sample("scheduler_connections_reading") == 2,
                   what="2 connections reading requests")
        self.assertCORS(self.raw(b"GET /healthz HTTP/1.1\r\n" + WITH_ORIGIN + b"\r\n"), 503)


class RefusedOriginTest(unittest.TestCase):
    def test_a_refusal_names_the_origin_it_finds_among_several(self):
        service = scheduler.Service(scheduler.InMemoryStore(),
                                    cors_origins=(ORIGIN, "http://localhost:3000"))
        for sent, expected in ((b"GET / HTTP/1.1\r\norigin:  http://localhost:3000 \r\n\r\n",
                                "http://localhost:3000"), (b"GET / HTTP/1.1\r\n\r\n", None)):
            with self.subTest(sent=sent):
                ours, theirs = socket.socketpair()
                self.addCleanup(theirs.close)
                theirs.sendall(sent)
                scheduler.Connection(ours, ("192.0.2.1", 1), _Host(service.limits)).refuse(
                    service, scheduler.HTTPError(503, "Full."))
                response = read_response(theirs)
                self.assertEqual(response.status, 503)
                self.assertEqual(response.headers["Access-Control-Allow-Origin"], expected)
                self.assertEqual(response.headers["Vary"], "Origin")


class _PiecesSocket:
    """Enough of a socket for a Connection: recv() gives these pieces, one a call, then
    end of file; what is sent is kept."""

    def __init__(self, pieces: List[bytes]):
        self.pieces, self.sent = list(pieces), b""

    def recv(self, size: int) -> bytes:
        assert not self.pieces or len(self.pieces[0]) <= size, "a piece larger than asked for"
        return self.pieces.pop(0) if self.pieces else b""

    def sendall(self, data: bytes) -> None:
        self.sent += data


class OriginSearchTest(unittest.TestCase):
    """The Origin of a head too long (431), found past its first MAX_HEAD_BYTES in the
    pieces that arrive, wherever the reads cut its line."""

    LONG = b"GET / HTTP/1.1\r\nHost: t\r\nX-Long: " + b"x" * 70_000 + b"\r\n"  # past 64 KiB
    LINE = f"Origin: {ORIGIN}\r\n".encode()
    CUTS = [0, 1, 3, 7, len(LINE) - 2, len(LINE) - 1, len(LINE)]  # where the line is cut

    def answer(self, pieces: List[bytes]) -> Response:
        service = scheduler.Service(scheduler.InMemoryStore(), cors_origins=(ORIGIN,),
                                    log=lambda line, **fields: None)
        sock = _PiecesSocket(pieces)
        scheduler.Connection(sock, ("192.0.2.1", 1), _Host(service.limits)).serve(service)
        return read_response(_BytesSocket(sock.sent))

    def test_an_origin_line_cut_by_the_reads_is_found(self):
        filler = b"X-More: " + b"y" * 30_000 + b"\r\n"
        for cut in self.CUTS:
            with self.subTest(cut=cut):
                pieces = [self.LONG[:60_000], self.LONG[60_000:], filler,
                          b"X-Last: z\r\n" + self.LINE[:cut], self.LINE[cut:] + filler]
                response = self.answer([piece for piece in pieces if piece])
                self.assertEqual(response.status, 431)
                self.assertEqual(response.headers["Access-Control-Allow-Origin"], ORIGIN)

    def test_none_is_found_where_none_was_sent(self):
        response = self.answer([self.LONG[:60_000], self.LONG[60_000:], b"X-A: b\r\n" * 100])
        self.assertEqual((response.status, response.headers["Vary"]), (431, "Origin"))
        self.assertNotIn("Access-Control-Allow-Origin", response.headers)


class CORSAnyOriginTest(ServerTestCase):
    cors_origins = ("*",)

    def test_any_origin_is_allowed_with_a_wildcard(self):
        preflight = self.request("OPTIONS", "/appointments", headers={
            "Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST"})
        self.assertEqual(preflight.headers["Access-Control-Allow-Origin"], "*")
        response = self.request("GET", "/appointments?user_id=a",
                                headers={"Origin": "https://anywhere.example"})
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], "*")


class WithoutCORSTest(ServerTestCase):
    def test_without_the_option_nothing_changes(self):
        preflight = self.request("OPTIONS", "/appointments", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        booked = self.book(headers={"Origin": ORIGIN})
        for response in (preflight, booked):
            with self.subTest(status=response.status):
                self.assertFalse([name for name in response.headers
                                  if name.lower().startswith("access-control-")
                                  or name.lower() == "vary"])


# The browser test runs where Chromium is found, and is skipped, saying why, where it is
# not; under SCHEDULER_REQUIRE_BROWSER=1 (.ci/run sets it, and installs Chromium) it
# fails instead.
REQUIRE_BROWSER = os.environ.get("SCHEDULER_REQUIRE_BROWSER") == "1"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser_program() -> Optional[str]:
    """The path of the first of BROWSERS on PATH, or None."""
    return next(filter(None, map(shutil.which, BROWSERS)), None)


class ElementTexts(html.parser.HTMLParser):
    """A page as a browser shows it (--dump-dom): the text of each element with an
    id (texts), and the attributes of its <html> (root)."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
                      "meta", "source", "track", "wbr"})

    def __init__(self, page: str):
        super().__init__()
        self.texts: Dict[str, str] = {}
        self.root: Dict[str, Optional[str]] = {}
        self._open: List[Tuple[str, Optional[str]]] = []  # (tag, id) of the open elements
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "html":
            self.root = attributes
        if attributes.get("id"):
            self.texts[attributes["id"]] = ""
        if tag not in self.VOID:
            self._open.append((tag, attributes.get("id")))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _, name in self._open:
            if name:
                self.texts[name] += data


class DocsInABrowserTest(unittest.TestCase):
    """/docs in a real browser, headless Chromium, started once: the page's own script
    (which its Content-Security-Policy must let run) renders the API description,
    and with ?try=USER fills in and sends its forms as a person would (a booking,
    the listing, a booking without a date, a lookup without its user), writing what
    came back in the page, which the browser prints (--dump-dom) when its script is
    done."""

    BROWSER_SECONDS = 60  # then the browser is killed, and the test fails
    USER = "browser"

    def setUp(self):
        program = browser_program()
        if program is None:
            reason = f"no Chromium ({', '.join(BROWSERS)}) on PATH"
            if REQUIRE_BROWSER:
                self.fail(f"{reason}; SCHEDULER_REQUIRE_BROWSER=1 says this test must run")
            self.skipTest(reason)
        self.server = start_process(self, [*SERVICE, "--port", "0"])
        self.page = ElementTexts(self.shown(program, f"/docs?try={self.USER}"))

    def shown(self, program: str, path: str) -> str:
        """The page at path as the browser shows it once its script is done: it waits
        for its requests (--virtual-time-budget runs the page's clock ahead only while
        none is under way)."""
        profile = tempfile.mkdtemp(prefix="chromium-")
        self.addCleanup(shutil.rmtree, profile, ignore_errors=True)
        browser = subprocess.Popen(
            [program, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--disable-background-networking",
             "--disable-component-update", "--disable-extensions", "--disable-sync",
             "--virtual-time-budget=30000", "--dump-dom",
             f"http://{self.server.host}:{self.server.port}{path}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # its own process group, to end it and its children
        try:
            shown, logged = browser.communicate(timeout=self.BROWSER_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.communicate()
            self.fail(f"the browser did not finish within {self.BROWSER_SECONDS} s")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)  # what it may have left behind
        self.assertEqual(browser.returncode, 0, logged[-2000:])
        return shown

    def step(self, number: int) -> str:
        """What the page showed after its numbered step of ?try."""
        return self.page.texts.get(f"tried-{number}", "")

    def test_its_script_runs_lists_every_operation_and_sends_the_forms(self):
        texts = self.page.texts
        self.assertEqual(self.page.root.get("data-tried"), "done", "the script ran to its end")
        self.assertNotIn("loading", texts)  # the script replaced it...
        self.assertNotIn("blocked", texts)  # ...and the policy blocked nothing it did
        self.assertEqual(self.step(5), "Style sheet applied")
        for path, item in scheduler.openapi_document()["paths"].items():
            for method, operation in item.items():
                if method in ("head", "options"):
                    continue
                with self.subTest(method=method, path=path):
                    shown = texts.get(f"op-{operation['operationId']}", "")
                    self.assertIn(method.upper() + path, shown)
                    self.assertIn(operation["summary"], shown)
        booking = {**scheduler.example_booking(), "user_id": self.USER}  # the form's example
        url = f"/appointments/{self.USER}/{booking['date']}"
        booked = self.step(1)
        self.assertTrue(booked.startswith("POST /appointments\n201 Created\n"), booked)
        self.assertIn(f"location: {url}\n", booked)
        shown_booking = json.loads(booked[booked.index("{"):])
        self.assertEqual({name: shown_booking[name] for name in booking}, booking)
        listed = self.step(2)
        self.assertTrue(listed.startswith(f"GET /appointments?user_id={self.USER}\n200 OK\n"),
                        listed)
        self.assertEqual(json.loads(listed[listed.index("{"):]),
                         {"user_id": self.USER, "appointments": [shown_booking]})
        # The booking is there, as the API says...
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", url)
        self.assertEqual(response_of(conn).json(), shown_booking)
        # ...and the form shows what a booking without a date gets: a 422 that says why.
        refused = self.step(3)
        self.assertTrue(refused.startswith("POST /appointments\n422 Unprocessable Content\n"),
                        refused)
        problem = json.loads(refused[refused.index("{"):])
        self.assertEqual((problem["status"], problem["errors"]),
                         (422, [{"field": "date", "message": "date is required"}]))
        self.assertEqual(texts["reply-bookAppointment"].replace("\n", ""),
                         refused.replace("\n", ""))  # still there, under the form
        # A path parameter left empty is not sent: /appointments/{user_id}/... would be.
        self.assertEqual(self.step(4), "Not sent: user_id is required")


@on_every_store
class ConditionalOverHTTPTest(ServerTestCase):
    def test_a_304_has_no_body_and_the_connection_serves_on(self):
        self.book()
        conn = self.connect()
        for url in ConditionalGetTest.URLS:
            with self.subTest(url=url):
                tag = self.request("GET", url, conn=conn).headers["ETag"]
                for method in ("GET", "HEAD"):
                    response = self.request(method, url, headers={"If-None-Match": tag},
                                            conn=conn)
                    self.assertEqual((response.status, response.body), (304, b""))
                    self.assertNotIn("Content-Length", response.headers)
                self.book(date="2026-11-26", conn=conn)  # the list and feed change
                changed = self.request("GET", url, headers={"If-None-Match": tag}, conn=conn)
                self.assertEqual(changed.status, 304 if "2026-11-25" in url else 200)
                self.request("DELETE", "/appointments/alice/2026-11-26", conn=conn)
                self.assertEqual(self.request("GET", url, headers={"If-None-Match": tag},
                                              conn=conn).status, 304)  # and back


@on_every_store
class IdempotencyOverHTTPTest(ServerTestCase):
    def test_a_retry_on_a_new_connection_gets_the_first_answer(self):
        headers = {"Idempotency-Key": '"over-http"'}
        first = self.book(headers=headers)
        retries = [self.book(headers=headers) for _ in range(3)]  # each on a new connection
        self.assertEqual({(r.status, r.body, r.headers["Idempotent-Replayed"]) for r in retries},
                         {(201, first.body, "true")})
        self.assertProblem(self.book(time="10:00", headers=headers), 422)
        deleted = [self.request("DELETE", "/appointments/alice/2026-11-25",
                                headers={"Idempotency-Key": '"gone"'}) for _ in range(2)]
        self.assertEqual([r.status for r in deleted], [204, 204])
        self.assertEqual(self.stored(), [])


@on_every_store
class RescheduleRaceTest(ServerTestCase):
    def test_a_reschedule_and_a_booking_racing_for_a_date_leave_one_holding_it(self):
        moves = {"moved": 0, "booked": 0}
        for round in range(10):
            user = f"racer{round}"
            self.assertEqual(self.book(user, "2026-11-25").status, 201)
            conns = [self.connect(), self.connect()]
            for conn in conns:
                conn.connect()
            barrier, statuses = threading.Barrier(2), {}

            def move(conn):
                barrier.wait()
                statuses["patch"] = self.request(
                    "PATCH", f"/appointments/{user}/2026-11-25", '{"date": "2026-11-26"}',
                    {"Content-Type": "application/merge-patch+json"}, conn=conn).status

            def book(conn):
                barrier.wait()
                statuses["post"] = self.book(user, "2026-11-26", "18:00", conn=conn).status

            run_all([threading.Thread(target=move, args=(conns[0],)),
                     threading.Thread(target=book, args=(conns[1],))])
            dates = [a.date.isoformat() for a in self.stored(user)]
            self.assertIn((statuses, dates), [
                ({"patch": 200, "post": 409}, ["2026-11-26"]),
                ({"patch": 409, "post": 201}, ["2026-11-25", "2026-11-26"])])
            moves["moved" if statuses["patch"] == 200 else "booked"] += 1
        self.assertEqual(sum(moves.values()), 10)

    def test_two_patches_with_the_same_if_match_end_with_one_200_and_one_412(self):
        for round in range(10):
            user = f"editor{round}"
            self.assertEqual(self.book(user, "2026-11-25").status, 201)
            url = f"/appointments/{user}/2026-11-25"
            tag = self.request("GET", url).headers["ETag"]
            conns = [self.connect(), self.connect()]
            for conn in conns:
                conn.connect()
            barrier, statuses = threading.Barrier(2), {}

            def edit(conn, time):
                barrier.wait()
                statuses[time] = self.request("PATCH", url, json.dumps({"time": time}), {
                    "Content-Type": "application/merge-patch+json", "If-Match": tag},
                    conn=conn).status

            run_all([threading.Thread(target=edit, args=(conn, time))
                     for conn, time in zip(conns, ("10:00", "11:00"))])
            self.assertEqual(sorted(statuses.values()), [200, 412], statuses)
            winner = next(time for time, status in statuses.items() if status == 200)
            self.assertEqual([a.start.strftime("%H:%M") for a in self.stored(user)], [winner])


@on_every_store
class MetricsTest(ServerTestCase):
    def test_requests_are_counted_by_route_template_never_by_path(self):
        for user in ("alice", "secret-user-4711"):
            self.book(user)
        self.book("alice", time="15:00")  # 409
        self.request("GET", "/appointments/secret-user-4711/2026-11-25")
        self.request("GET", "/no/such/path")
        text = self.request("GET", "/metrics").body.decode()
        self.assertNotIn("secret-user-4711", text)
        self.assertNotIn("/no/such/path", text)
        samples = parse_metrics(text)

        def count(route, method, status):
            labels = {"route": route, "method": method, "status": status}
            return samples.get(("scheduler_requests_total", frozenset(labels.items())))

        self.assertEqual(count("/appointments", "POST", "201"), 2)
        self.assertEqual(count("/appointments", "POST", "409"), 1)
        self.assertEqual(count("/appointments/{user_id}/{date}", "GET", "200"), 1)
        self.assertEqual(count("unmatched", "GET", "404"), 1)

    def test_the_duration_histogram_adds_up(self):
        for _ in range(5):
            self.request("GET", "/healthz")
        samples = parse_metrics(self.request("GET", "/metrics").body.decode())
        labels = {"route": "/healthz", "method": "GET"}
        buckets = sorted((float(dict(key)["le"]), value) for (name, key), value in samples.items()
                         if name == "scheduler_request_duration_seconds_bucket"
                         and labels.items() <= dict(key).items())
        self.assertEqual(buckets[-1], (float("inf"), 5))
        self.assertEqual([value for _, value in buckets],
                         sorted(value for _, value in buckets))  # cumulative
        key = frozenset(labels.items())
        self.assertEqual(samples[("scheduler_request_duration_seconds_count", key)], 5)
        self.assertGreater(samples[("scheduler_request_duration_seconds_sum", key)], 0)

    def test_gauges_and_counters_of_the_server(self):
        self.book("alice")
        self.book("bob")
        self.assertEqual(self.metric("scheduler_appointments"), 2)
        # Every request here opened a connection, kept alive: 3 so far, and this one.
        self.assertEqual(self.metric("scheduler_connections_open"), 4)
        for name in ("refused", "evicted", "timed_out"):
            self.assertEqual(self.metric(f"scheduler_connections_{name}_total"), 0)
        self.assertEqual(self.metric("scheduler_log_lines_dropped_total"), 0)

    def test_unknown_methods_share_one_label(self):
        for method in (b"BREW", b"FOO", b"X" * 50):
            self.assertEqual(self.raw(method + b" / HTTP/1.1\r\nHost: t\r\n\r\n").status, 501)
        self.assertEqual(self.metric("scheduler_requests_total", route="unmatched",
                                     method="other", status="501"), 3)

    def test_no_client_can_add_label_values(self):
        rng, conn = random.Random(7), self.connect()
        for _ in range(60):  # random paths, user IDs and methods
            word = "".join(rng.choices("abcxyz%20/", k=8))
            method = rng.choice(["GET", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"])
            self.request(method, rng.choice([f"/{word}", f"/appointments/{word}/2026-11-25",
                                             f"/appointments?user_id={word}"]), conn=conn)
        for _ in range(5):
            self.raw(f"M{rng.randrange(10 ** 6)} / HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        samples = parse_metrics(self.request("GET", "/metrics", conn=conn).body.decode())
        labels = [dict(key) for name, key in samples if name == "scheduler_requests_total"]
        routes = {route.path for route in scheduler.ROUTES} | {"unmatched", "*"}
        self.assertLessEqual({label["route"] for label in labels}, routes)
        self.assertLessEqual({label["method"] for label in labels},
                             scheduler.KNOWN_METHODS | {"other"})
        self.assertLessEqual({int(label["status"]) for label in labels},
                             set(HTTPStatus) | {scheduler.CLIENT_GONE})


class MetricsFromTheStartTest(ServerTestCase):
    """Every series a request can make is in the first scrape, at 0: Prometheus's
    rate() and increase() take a series' first value as its start, so the first burst
    of a series that appears with it (the first 404s of a DELETE) was never seen."""

    limits = scheduler.Limits(request_timeout=0.3, max_body_bytes=1000)
    URL = "/appointments/alice/2026-11-25"

    def requests(self) -> List[Tuple[str, str, object, dict]]:
        """Requests that make many series: (method, path, body, headers)."""
        json_type = {"Content-Type": "application/json"}
        patch = {"Content-Type": "application/merge-patch+json"}
        return [
            ("POST", "/appointments", VALID_BODY, json_type),  # 201
            ("POST", "/appointments", VALID_BODY, json_type),  # 409
            ("POST", "/appointments", b'{"user_id": "bob"}', json_type),  # 422
            ("POST", "/appointments", b"{", json_type),  # 400
            ("POST", "/appointments", VALID_BODY, {"Content-Type": "text/plain"}),  # 415
            ("POST", "/appointments", b"x" * 2000, json_type),  # 413
            ("GET", "/appointments?user_id=alice", None, {}),
            ("HEAD", "/appointments?user_id=alice", None, {}),
            ("GET", "/appointments", None, {}),  # 400
            ("GET", "/appointments/alice/2026-11-26", None, {}),  # 404
            ("HEAD", "/appointments/alice/x", None, {}),  # 400
            ("GET", "/appointments?user_id=alice", None, {"If-Match": '"stale"'}),  # 412
            ("HEAD", "/healthz", None, {"If-Match": '"stale"'}),  # 412
            ("PATCH", self.URL, b'{"time": "10:00"}', {**patch, "If-Match": '"stale"'}),  # 412
            ("PATCH", self.URL, b'{"time": "10:00"}', patch),
            ("PATCH", self.URL, b'{"time": "10:00"}', json_type),
            ("PATCH", self.URL, b'{"time": "10:00"}', {}),  # 415
            ("DELETE", "/appointments/alice/2026-11-27", None, {}),  # 404
            ("DELETE", self.URL, None, {"Idempotency-Key": '"k"'}),  # 204
            ("DELETE", "/appointments/bob/2026-11-25", None, {"Idempotency-Key": '"k"'}),  # 422
            ("GET", "/appointments.ics?user_id=alice", None, {}),
            ("GET", "/appointments.ics", None, {}),  # 400
            ("GET", "/healthz", None, {}), ("HEAD", "/metrics", None, {}),
            ("GET", "/openapi.json", None, {}),
            ("GET", "/openapi.json", None, {"If-None-Match": "*"}),  # 304
            ("OPTIONS", self.URL, None, {}), ("OPTIONS", "*", None, {}),
            ("GET", "/nowhere", None, {}), ("OPTIONS", "/nowhere", None, {}),  # 404
            ("PUT", "/appointments", None, {}), ("TRACE", "/", None, {}),  # 405
            ("GET", "/appointments/%ff/2026-11-25", None, {}),  # 400
        ]

    RAW = [  # what a client cannot send with http.client
        b"POST /appointments HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\r\n{}",
        b"PATCH " + URL.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
        b"\r\nTransfer-Encoding: chunked\r\n\r\n",  # 411
        b"BREW / HTTP/1.1\r\nHost: t\r\n\r\n", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",  # 501, 505
        b"BREW / HTTP/2.0\r\nHost: t\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",  # 505, 400
        b"DELETE / HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n",  # 400
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",  # 431
        b"GET /?" + b"q" * 70_000 + b" HTTP/1.1\r\n\r\n",  # 414
        b"GET / HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",  # 431
        b"GET / HTTP/1.1\r\nHost: t\r\n",  # 408, the head unfinished
        post_head(10) + b"{",  # 408, the body unfinished
        b"GET /metrics?a=%zz HTTP/1.1\r\nHost: t\r\n\r\n",  # 400, any route's query
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",  # 400
        b"OPTIONS * HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # 411
    ]

    def test_every_series_a_request_makes_is_in_the_first_scrape_at_0(self):
        first = parse_metrics(self.request("GET", "/metrics").body.decode())
        declared = {("scheduler_requests_total", frozenset(
            {"route": route, "method": method, "status": str(status)}.items()))
            for route, method, status in scheduler.request_series()}
        self.assertLessEqual(declared, set(first))
        self.assertIn(("scheduler_requests_total", frozenset(
            {"route": "/appointments/{user_id}/{date}", "method": "DELETE", "status": "404"
             }.items())), declared)
        conn = self.connect()
        for method, path, body, headers in self.requests():
            conn.request(method, path, body, headers)
            response_of(conn)
        for raw in self.RAW:
            self.raw(raw)
        with self.open_socket() as sock:  # a head cut short by its client: 400
            sock.sendall(b"GET / HTTP/1.1\r\nHost:")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_response(sock).status, 400)
        after = parse_metrics(self.request("GET", "/metrics").body.decode())
        made = {key for key, value in after.items() if value and key[0] in (
            "scheduler_requests_total", "scheduler_request_duration_seconds_count")}
        series = [dict(labels) for name, labels in made if name == "scheduler_requests_total"]
        self.assertGreaterEqual(len(series), 40)  # the requests made many: 18 statuses
        self.assertEqual(len({labels["status"] for labels in series}), 18)
        self.assertEqual({key for key in made if key not in first}, set())
        self.assertEqual({first[key] for key in made}, {0})


class TimedOutMetricTest(ServerTestCase):
    limits = scheduler.Limits(first_byte_timeout=0.2)

    def test_a_connection_cut_off_is_counted(self):
        sock = self.open_socket()  # and nothing is sent
        self.assertEqual(sock.recv(1), b"")  # cut off
        wait_until(lambda: self.metric("scheduler_connections_timed_out_total") == 1,
                   what="the cut-off connection counted")


# --- The tests' throwaway PostgreSQL clusters (the helpers at the top) ------------------


def psql_login(cluster: PostgresCluster, uri: str,
               statement: str = "SELECT current_user") -> subprocess.CompletedProcess:
    """psql (libpq, the reference) logs in with uri and runs statement."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    return subprocess.run([cluster._program("psql"), "-X", "-A", "-t", "-d", uri,
                           "-c", statement], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=30)


@requires_postgres
class PostgresClusterTest(unittest.TestCase):
    """What the PostgreSQL tests count on their clusters for."""

    def test_the_shared_cluster_answers_until_frozen(self):
        cluster = PostgresCluster.shared()
        self.assertIs(PostgresCluster.shared(), cluster)
        self.assertEqual(cluster.sql("SELECT 1"), "1")
        cluster.freeze()
        self.addCleanup(cluster.thaw)
        self.assertIsNone(ssl_request(cluster.port, timeout=0.2))  # accepted, never answered
        cluster.thaw()
        self.assertIn(ssl_request(cluster.port, timeout=10), (b"S", b"N"))

    def test_each_role_logs_in_as_pg_hba_conf_says(self):
        cluster = PostgresCluster.shared()
        self.assertEqual(cluster.sql(
            "SELECT rolname, left(rolpassword, 3) FROM pg_authid WHERE rolname IN "
            "('scheduler', 'md5_user', 'plain_user', 'trust_user') ORDER BY rolname"),
            "md5_user|md5\nplain_user|SCR\nscheduler|SCR\ntrust_user|")
        for user in ("scheduler", "md5_user", "trust_user"):
            with self.subTest(user):
                self.assertEqual(psql_login(cluster, cluster.uri(user)).stdout, f"{user}\n")
        refused = psql_login(cluster, cluster.uri("scheduler", password="wrong"))
        self.assertIn('password authentication failed for user "scheduler"', refused.stderr)
        self.assertIn('rejects connection for host "127.0.0.1", user "plain_user"',
                      psql_login(cluster, cluster.uri("plain_user", sslmode="disable")).stderr)

    def test_the_scheduler_role_creates_in_its_databases(self):
        cluster = PostgresCluster.shared()
        for database in (cluster.DATABASE, cluster.fresh_database(self)):
            with self.subTest(database):
                schema = cluster.fresh_schema(self, database)
                made = psql_login(cluster, cluster.uri(database=database),
                                  f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (x int)")
                self.assertEqual(made.returncode, 0, made.stderr)
                self.assertEqual(cluster.sql(f"SELECT tableowner FROM pg_tables WHERE "
                                             f"schemaname = '{schema}'", database), "scheduler")

    def test_uri(self):
        cluster = PostgresCluster(folder="/nowhere")  # not started: the URI is all it makes
        cluster.port = 5433
        standby = PostgresCluster()
        standby.port = 5434
        self.assertEqual(cluster.uri(), "postgresql://scheduler:scheduler-secret-9c2e@"
                                        "127.0.0.1:5433/scheduler")
        self.assertEqual(cluster.uri("trust_user", database="postgres", others=(standby,),
                                     target_session_attrs="read-write"),
                         "postgresql://trust_user@127.0.0.1:5433,127.0.0.1:5434/postgres"
                         "?target_session_attrs=read-write")
        self.assertEqual(cluster.uri("a@b", "p/w:", sslrootcert="/tmp/ca file.crt"),
                         "postgresql://a%40b:p%2Fw%3A@127.0.0.1:5433/scheduler"
                         "?sslrootcert=/tmp/ca%20file.crt")

    @requires_tls
    def test_tls_verifies_with_its_ca_and_not_another(self):
        cluster = PostgresCluster.shared()
        self.assertEqual(psql_login(cluster, cluster.uri("plain_user", sslmode="require")).stdout,
                         "plain_user\n")  # cleartext over TLS
        self.assertEqual(psql_login(cluster, cluster.uri(
            sslmode="verify-full", sslrootcert=cluster.ca_file)).stdout, "scheduler\n")
        self.assertIn("certificate verify failed", psql_login(cluster, cluster.uri(
            sslmode="verify-ca", sslrootcert=cluster.other_ca_file)).stderr)

        def handshake(ca_file, host):  # as Python's ssl checks it (strict from Python 3.13)
            with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as sock:
                sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
                self.assertEqual(sock.recv(1), b"S")
                context = ssl.create_default_context(cafile=ca_file)
                with context.wrap_socket(sock, server_hostname=host) as tls:
                    return tls.version()

        for host in ("127.0.0.1", "localhost"):
            self.assertIn(handshake(cluster.ca_file, host), ("TLSv1.2", "TLSv1.3"))
        with self.assertRaises(ssl.SSLCertVerificationError):
            handshake(cluster.other_ca_file, "127.0.0.1")

    def test_a_killed_server_starts_again_with_what_it_committed(self):
        cluster = PostgresCluster.shared()
        schema = cluster.fresh_schema(self)
        cluster.sql(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (x int);"
                    f"INSERT INTO {schema}.t VALUES (1)", cluster.DATABASE)
        killed = cluster.pid
        cluster.kill()
        self.addCleanup(cluster.start)
        self.assertIsNone(cluster.pid)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", cluster.port), timeout=10).close()
        cluster.start()  # recovers from the WAL
        self.assertNotEqual(cluster.pid, killed)
        self.assertEqual(cluster.sql(f"SELECT x FROM {schema}.t", cluster.DATABASE), "1")
        cluster.restart()
        self.assertEqual(cluster.sql(f"SELECT x FROM {schema}.t", cluster.DATABASE), "1")

    def test_a_synchronous_standby_has_each_commit_and_takes_over(self):
        # Slower than most: a base backup, a start, a promotion.
        primary = PostgresCluster.shared()
        schema = primary.fresh_schema(self)  # dropped once commits no longer wait
        standby = primary.standby(synchronous=True)
        self.addCleanup(standby.cleanup)
        self.assertEqual(primary.sql("SELECT sync_state FROM pg_stat_replication WHERE "
                                     f"application_name = '{standby.name}'"), "sync")
        primary.sql(f"SET synchronous_commit = remote_apply; CREATE SCHEMA {schema};"
                    f"CREATE TABLE {schema}.t (x int); INSERT INTO {schema}.t VALUES (1)",
                    primary.DATABASE)
        self.assertEqual(standby.sql(f"SELECT x FROM {schema}.t", standby.DATABASE), "1")
        with self.assertRaisesRegex(ClusterError, "read-only transaction"):
            standby.sql(f"INSERT INTO {schema}.t VALUES (2)", standby.DATABASE)
        standby.promote()
        standby.sql(f"INSERT INTO {schema}.t VALUES (2)", standby.DATABASE)
        self.assertEqual(standby.sql(f"SELECT sum(x) FROM {schema}.t", standby.DATABASE), "3")
        standby.cleanup()
        self.assertEqual(primary.sql("SHOW synchronous_standby_names"), "")
        self.assertFalse(os.path.exists(standby.folder))


class RequiresPostgresTest(unittest.TestCase):
    def test_a_missing_postgresql_skips_or_fails_as_told(self):
        def test():
            return "ran"

        self.assertEqual(_requiring(test, None)(), "ran")
        with mock.patch(f"{__name__}.REQUIRE_POSTGRES", False), \
                self.assertRaisesRegex(unittest.SkipTest, "^no server$"):
            _requiring(test, "no server")()
        with mock.patch(f"{__name__}.REQUIRE_POSTGRES", True), \
                self.assertRaisesRegex(AssertionError, "^no server; SCHEDULER_REQUIRE_POSTGRES"):
            _requiring(test, "no server")()


# --- Command line ---------------------------------------------------------------------


def make_read_only(testcase: unittest.TestCase, path: str) -> None:
    """Make a file read-only even for root (chattr +i), or skip the test."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        return
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        testcase.skipTest("cannot make a file read-only for root here (chattr +i)")
    testcase.addCleanup(subprocess.run, ["chattr", "-i", path], capture_output=True)


class ReadOnlyDatabaseTest(unittest.TestCase):
    def test_the_server_refuses_to_start_on_a_database_it_cannot_write(self):
        path = temporary_database(self)
        scheduler.SQLiteStore(path).close()
        make_read_only(self, path)
        result = subprocess.run([*PYTHON, *SERVICE, "--port", "0", "--db", path],
                                capture_output=True, text=True, timeout=30, cwd=HERE)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"cannot open the database {path}: attempt to write a readonly "
                      "database", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class CommandLineTest(unittest.TestCase):
    def start(self, *args, env=None) -> ServerProcess:
        """Run scheduler.py with these options."""
        return start_process(self, [*SERVICE, *args], env)

    def stop(self, server: ServerProcess, signum=None) -> str:
        """Signal the server (if signum), wait for it to exit, return the rest of its log."""
        if signum is not None:
            server.process.send_signal(signum)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            self.fail("the server did not stop")
        server.reader.join()
        return "".join(server.log.get_nowait() for _ in range(server.log.qsize()))

    def test_version_is_the_one_the_server_and_the_document_carry(self):
        result = subprocess.run([*PYTHON, SCRIPT, "--version"], capture_output=True, text=True,
                                timeout=30)
        self.assertEqual((result.returncode, result.stdout),
                         (0, f"scheduler {scheduler.__version__}\n"))
        self.assertEqual(scheduler.SERVER_NAME, f"scheduler/{scheduler.__version__}")

    def test_help_explains_every_option(self):
        result = subprocess.run([*PYTHON, SCRIPT, "--help"], capture_output=True,
                                text=True, timeout=30)
        self.assertEqual(result.returncode, 0)
        limits = ["--" + name.replace("_", "-") for name in scheduler.Limits._fields]
        for word in ["--host", "--port", "PORT", *limits, "SIGHUP", "--log-format"]:
            self.assertIn(word, result.stdout)
        most = scheduler.WORKERS_PER_CPU * scheduler.usable_cpus()
        self.assertIn(f"at most {scheduler.WORKERS_PER_CPU} per CPU this process may use "
                      f"({most} here)", " ".join(result.stdout.split()))

    def test_limits_come_from_the_command_line(self):
        args = scheduler.parse_args(["--max-body-bytes", "100", "--request-timeout", "1.5",
                                     "--idle-timeout", "2", "--first-byte-timeout", "0.5",
                                     "--max-connections", "3", "--shutdown-timeout", "4",
                                     "--max-appointments", "5", "--max-appointments-per-user",
                                     "7", "--max-idempotency-keys", "6",
                                     "--max-idempotency-keys-per-user", "2"])
        self.assertEqual([getattr(args, name) for name in scheduler.Limits._fields],
                         [100, 1.5, 2.0, 0.5, 3, 4.0, 5, 7, 6, 2])
        server = self.start("--port", "0", "--max-body-bytes", "100", "--max-appointments", "1")
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(post_head(101))
            response = read_response(sock, "POST")
        self.assertEqual(response.status, 413)
        self.assertIn("limit is 100", response.json()["detail"])
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        self.addCleanup(conn.close)
        statuses = [post_json(conn, {"user_id": user, "date": "2026-11-25", "time": "09:00"})
                    .status for user in ("alice", "bob")]
        self.assertEqual(statuses, [201, 507])
        self.stop(server, signal.SIGTERM)

    def test_serves_logs_and_stops_cleanly_on_ctrl_c_and_sigterm(self):
        signals = (signal.SIGINT, signal.SIGTERM)
        servers = start_processes(self, [([*SERVICE, "--port", "0"], {})] * len(signals))
        for signum, server in zip(signals, servers):
            with self.subTest(signal=signum.name):
                self.assertEqual(http_status(server, "/appointments?user_id=alice"), 200)
                log = self.stop(server, signum)
                self.assertEqual(server.process.returncode, 0)
                self.assertIn('"GET /appointments?user_id=alice HTTP/1.1" 200', log)
                self.assertIn(f"{signum.name} received: shutting down.", log)
                self.assertIn("No longer accepting connections", log)
                self.assertNotIn("Traceback", log)

    def test_with_log_format_json_every_line_on_stderr_is_an_object(self):
        server = self.start("--port", "0", "--log-format", "json")
        self.assertEqual(http_status(server, "/appointments?user_id=alice"), 200)
        log = self.stop(server, signal.SIGTERM)
        self.assertEqual(server.process.returncode, 0)
        entries = [json.loads(line) for line in log.splitlines()]  # each one, or this fails
        self.assertTrue(entries[0]["message"].startswith("Running on "))
        access, = [entry for entry in entries if "status" in entry]
        self.assertEqual((access["method"], access["target"], access["status"]),
                         ("GET", "/appointments?user_id=alice", 200))
        made_request_id(self, access["request_id"])
        self.assertEqual(entries[-1]["message"], "Stopped.")

    def test_port_comes_from_the_environment_and_the_flag_wins(self):
        from_env, from_flag = start_processes(self, [
            (SERVICE, {"PORT": "0"}),  # 0: a free port, not the default 8000
            ([*SERVICE, "--port", "0"], {"PORT": "not-a-port"})])
        self.assertNotEqual(from_env.port, scheduler.DEFAULT_PORT)
        self.assertEqual(http_status(from_flag, "/appointments?user_id=a"), 200)
        self.stop(from_env, signal.SIGINT)
        self.stop(from_flag, signal.SIGINT)

    def start_request_in_flight(self, server: ServerProcess) -> socket.socket:
        """Send a POST's headers and wait for "100 Continue": the server is now
        waiting for the body of a request it has begun."""
        sock = socket.create_connection((server.host, server.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(post_head(len(VALID_BODY), "Expect: 100-continue\r\n"))
        self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
        return sock

    def test_sigterm_lets_the_request_in_flight_finish(self):
        server = self.start("--port", "0", "--shutdown-timeout", "10")
        sock = self.start_request_in_flight(server)
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, "No longer accepting connections")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection((server.host, server.port), timeout=10).close()
        sock.sendall(VALID_BODY)
        response = read_response(sock, "POST")
        sock.close()
        self.assertEqual(response.status, 201)
        self.assertEqual(response.json()["user_id"], "alice")
        self.assertEqual(response.headers["Connection"], "close")
        log = self.stop(server)
        self.assertEqual(server.process.returncode, 0)
        self.assertIn('"POST /appointments HTTP/1.1" 201', log)
        self.assertIn("Stopped.", log)

    @unittest.skipUnless(os.path.exists("/proc/self/fd"), "counts the connections in /proc")
    def test_a_connection_accepted_before_sigterm_gets_its_first_request_answered(self):
        server = self.start("--port", "0", "--shutdown-timeout", "10")
        sock = socket.create_connection((server.host, server.port), timeout=10)
        self.addCleanup(sock.close)
        wait_until(lambda: open_sockets(server.process.pid) == 2, what="the connection accepted")
        server.process.send_signal(signal.SIGTERM)
        self.assertIn("letting 1 open connection(s) finish",
                      wait_for_log(server, "No longer accepting connections"))
        sock.sendall(post_head(len(VALID_BODY)) + VALID_BODY)  # sent after the drain began
        response = read_response(sock, "POST")
        sock.close()
        self.assertEqual((response.status, response.headers["Connection"]), (201, "close"))
        self.assertIn("Stopped.", self.stop(server))
        self.assertEqual(server.process.returncode, 0)

    @unittest.skipUnless(os.path.exists("/proc/self/status"), "reads signal masks from /proc")
    def test_a_sighup_while_the_store_opens_does_not_end_the_process(self):
        # The upgrade of an older file waits for the write lock another connection
        # holds: the process is in main(), its handlers not set yet.
        path = temporary_database(self)
        with database_of_release(path, scheduler.SCHEMA_VERSION - 1):
            pass
        release = hold_write_lock(self, path)
        process = subprocess.Popen([*PYTHON, *SERVICE, "--port", "0", "--db", path],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   cwd=HERE)
        self.addCleanup(process.wait)
        self.addCleanup(process.stdout.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())

        def ignores_sighup() -> bool:  # /proc/PID/status: SigIgn, a mask with bit 0 for signal 1
            with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
                mask = re.search(r"^SigIgn:\s*([0-9a-f]+)$", status.read(), re.M).group(1)
            return bool(int(mask, 16) & 1 << (signal.SIGHUP - 1))

        wait_until(ignores_sighup, what="the process in main(), SIGHUP ignored")
        process.send_signal(signal.SIGHUP)
        release()
        self.assertIn("Listening on http://", process.stdout.readline())
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=20), 0)

    def test_sighup_keeps_a_lone_server_serving_and_loses_nothing(self):
        server = self.start("--port", "0")
        sock = self.start_request_in_flight(server)
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "SIGHUP received: serving on (the log is stderr")
        sock.sendall(VALID_BODY)
        self.assertEqual(read_response(sock, "POST").status, 201)
        self.assertEqual(http_status(server, "/appointments/alice/2026-11-25"), 200)
        log = self.stop(server, signal.SIGTERM)
        self.assertEqual(server.process.returncode, 0)
        self.assertIn('"POST /appointments HTTP/1.1" 201', log)
        self.assertIn('"GET /appointments/alice/2026-11-25 HTTP/1.1" 200', log)

    def test_idle_keep_alive_connections_are_closed_at_shutdown(self):
        server = self.start("--port", "0", "--shutdown-timeout", "60")
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/appointments?user_id=a")
        self.assertEqual(conn.getresponse().read(), b'{"user_id": "a", "appointments": []}\n')
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(conn.sock.recv(1), b"")  # closed by the server, not left to time out
        log = self.stop(server)  # within 10 s, so it did not wait out the 60 s
        self.assertEqual(server.process.returncode, 0)
        self.assertIn("Stopped.", log)
        self.assertNotIn("cut off", log)

    def test_bookings_in_a_database_survive_a_restart(self):
        path = temporary_database(self)
        server = self.start("--port", "0", "--db", path)
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        for date in ("2026-11-26", "2026-11-25"):
            body = {"user_id": "alice", "date": date, "time": "23:30", "note": f"on {date}"}
            self.assertEqual(post_json(conn, body).status, 201)
        conn.close()
        self.stop(server, signal.SIGTERM)
        server = self.start("--port", "0", "--db", path)
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("GET", "/appointments?user_id=alice")
        listed = json.loads(conn.getresponse().read())["appointments"]
        conn.close()
        self.assertEqual([(a["date"], a["time"], a["note"]) for a in listed],
                         [("2026-11-25", "23:30", "on 2026-11-25"),
                          ("2026-11-26", "23:30", "on 2026-11-26")])
        self.stop(server, signal.SIGTERM)

    def sigkill_while_booking(self, clients: int) -> None:
        """Kill the server with SIGKILL while clients each stream bookings; then every
        booking it acknowledged is on disk."""
        path = temporary_database(self)
        server = self.start("--port", "0", "--db", path)
        acknowledged, enough = [], threading.Event()

        def stream(client):  # POSTs one after another until the server dies (2,000 at most)
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            try:
                for index in range(2000):
                    body = {"user_id": f"user-{client}-{index}", "date": "2026-11-25",
                            "time": "09:00"}
                    if post_json(conn, body).status == 201:
                        acknowledged.append(body)
                    if len(acknowledged) >= 50:
                        enough.set()
            except (OSError, http.client.HTTPException):
                pass  # killed mid-stream
            finally:
                conn.close()
                enough.set()

        streams = [threading.Thread(target=stream, args=(n,)) for n in range(clients)]
        for thread in streams:
            thread.start()
        self.assertTrue(enough.wait(timeout=30))
        server.process.kill()
        for thread in streams:
            thread.join()
        self.stop(server)
        self.assertGreaterEqual(len(acknowledged), 50)
        store = scheduler.SQLiteStore(path)
        self.addCleanup(store.close)
        for body in acknowledged:
            self.assertEqual(store.get(body["user_id"], dt.date(2026, 11, 25)),
                             scheduler.parse_appointment(body))
        # At most one more a client: a booking written whose answer never reached it.
        self.assertLessEqual(0, store.count() - len(acknowledged))
        self.assertLessEqual(store.count() - len(acknowledged), clients)

    def test_sigkill_loses_no_acknowledged_booking(self):
        self.sigkill_while_booking(clients=1)

    def test_a_keyed_booking_is_replayed_after_a_crash_and_a_restart(self):
        path = temporary_database(self)
        headers = {"Content-Type": "application/json", "Idempotency-Key": '"after-a-crash"'}
        answers = []
        for start in range(2):
            server = self.start("--port", "0", "--db", path)
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            conn.request("POST", "/appointments", VALID_BODY, headers)
            answers.append(response_of(conn))
            conn.close()
            server.process.kill()  # no shutdown: what was acknowledged is on disk
            server.process.wait(timeout=10)
        first, retry = answers
        self.assertEqual((first.status, retry.status, retry.body), (201, 201, first.body))
        self.assertEqual(retry.headers["Idempotent-Replayed"], "true")
        self.assertEqual(query(path, "SELECT user_id, date, time FROM appointments"),
                         [("alice", "2026-11-25", "09:30")])

    def test_sigkill_loses_none_of_concurrent_clients_bookings(self):
        self.sigkill_while_booking(clients=8)  # their bookings are committed in batches

    def refused(self, args: List[str], environ: Optional[dict] = None) -> str:
        """What open_store(), which serve() calls, says as it refuses the store that
        args ask for (the test fails if it opens it), with environ (by default this
        process's) as the whole environment meanwhile."""
        with mock.patch.dict(os.environ, os.environ if environ is None else environ,
                             clear=True):
            parsed = scheduler.parse_args(args)
            limits = scheduler.Limits(**{name: getattr(parsed, name)
                                         for name in scheduler.Limits._fields})
            with contextlib.redirect_stderr(io.StringIO()) as stderr:
                store = scheduler.open_store(parsed, limits)
        if store is not None:
            store.close()
            self.fail(f"{args} opened a store")
        return stderr.getvalue()

    def test_a_database_it_does_not_own_is_refused_untouched_in_one_line(self):
        paths = foreign_files(self)
        before = {case: files_of(path) for case, path in paths.items()}
        for case, path in paths.items():  # open_store() is what serve() calls
            with self.subTest(case=case):
                said = self.refused(["--port", "0", "--db", path])
                self.assertRegex(said, rf"\Ascheduler: cannot open the database "
                                       rf"{re.escape(path)}: [^\n]+\n\Z")
                self.assertEqual(files_of(path), before[case])
        path = paths["a newer release's"]  # and once as a process
        run = subprocess.run([*PYTHON, *SERVICE, "--port", "0", "--db", path],
                             capture_output=True, text=True, timeout=30, cwd=HERE)
        self.assertEqual((run.returncode, run.stdout), (1, ""), run.stderr)
        self.assertRegex(run.stderr, rf"\Ascheduler: cannot open the database "
                                     rf"{re.escape(path)}: [^\n]+\n\Z")
        self.assertEqual(files_of(path), before["a newer release's"])

    def test_the_log_names_rows_set_aside_and_the_commands_it_gives_fix_them(self):
        path = unversioned_database(self, "2026-11-30", [row[:3] for row in BROKEN_ROWS])
        server = self.start("--port", "0", "--db", path)
        wait_for_log(server, f"Upgraded {path} to schema version 1")
        line = wait_for_log(server, "break the rules of this release")
        self.stop(server, signal.SIGTERM)
        self.assertIn(f"{len(BROKEN_ROWS)} stored appointment(s)", line)
        self.assertIn("row 1: 'letters' '2026-11-25' 'xx:yy' (time must be a string", line)
        self.assertIn("row 9: '\\u202eoverride'", line)  # escaped: it would reverse the line
        commands = re.findall(r"(sqlite3 \S+ \"[^\"]*\")", line)
        self.assertEqual(len(commands), 3)  # see, restore one, delete
        for command in commands:
            if shutil.which("sqlite3"):
                subprocess.run(shlex.split(command), check=True, capture_output=True)
            else:  # the same SQL, where the sqlite3 shell is not installed
                with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
                    db.executescript(shlex.split(command)[2])
        store = scheduler.SQLiteStore(path)
        self.addCleanup(store.close)
        self.assertEqual(store.list_for_user("letters"), [appointment("letters")])  # at 09:30
        self.assertEqual(store.notices, ())  # nothing set aside any more

    def test_a_full_disk_is_503_on_health_as_on_bookings(self):
        # A file size limit (ulimit -f) stands for a full disk: the WAL cannot grow.
        def limit_file_size():
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

        server = start_process(self, [*SERVICE, "--port", "0", "--db", temporary_database(self)],
                               keep_log=False, preexec_fn=limit_file_size)
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        self.addCleanup(conn.close)
        for number in range(1000):  # about 12 KB of WAL each: it fills within 30
            response = post_json(conn, {"user_id": f"u{number}", "date": "2026-11-25",
                                        "time": "09:00"})
            if response.status != 201:
                break
        self.assertEqual(response.status, 503, response.body)
        self.assertNotIn("Retry-After", response.headers)  # retrying soon will not help
        conn.request("GET", "/healthz")
        health = conn.getresponse()
        problem, refused = json.loads(health.read()), response.json()
        self.assertEqual(problem.pop("instance"), "urn:uuid:" + health.headers["X-Request-ID"])
        refused.pop("instance")  # each request's own
        self.assertEqual((health.status, problem), (503, refused))
        server.process.terminate()

    def test_a_backup_taken_under_write_load_holds_every_acknowledged_booking(self):
        path, copy = temporary_database(self), temporary_database(self)
        with open(README, encoding="utf-8") as file:
            command = shlex.split(re.search(r"```sh\n *(python3 -c 'import sqlite3[^\n]*)\n",
                                            file.read()).group(1))
        self.assertEqual(command[-2:], ["appointments.db", "backup.db"])  # as the README says
        server = self.start("--port", "0", "--db", path)
        acknowledged, stop = [], threading.Event()  # (when, user ID) of each 201

        def stream(client):
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            for index in range(5000):
                if stop.is_set():
                    break
                user_id = f"user-{client}-{index}"
                body = {"user_id": user_id, "date": "2026-11-25", "time": "09:00"}
                self.assertEqual(post_json(conn, body).status, 201)
                acknowledged.append((time.monotonic(), user_id))
            conn.close()

        streams = [threading.Thread(target=stream, args=(n,)) for n in range(4)]
        for thread in streams:
            thread.start()
        wait_until(lambda: len(acknowledged) >= 200, what="200 bookings")
        started = time.monotonic()
        subprocess.run([sys.executable if word == "python3" else word
                        for word in command[:-2]] + [path, copy], check=True, timeout=60)
        wait_until(lambda: acknowledged[-1][0] > time.monotonic() - 1 and
                   len([t for t, _ in acknowledged if t > started]) >= 50,
                   what="bookings after the copy")  # it was under load throughout
        stop.set()
        for thread in streams:
            thread.join()
        self.stop(server, signal.SIGTERM)
        self.assertEqual(query(copy, "PRAGMA integrity_check"), [("ok",)])
        stored = {user_id for user_id, in query(copy, "SELECT user_id FROM appointments")}
        before = {user_id for when, user_id in acknowledged if when < started}
        self.assertGreaterEqual(len(before), 200)
        self.assertEqual(before - stored, set())  # every booking acknowledged before it began
        self.assertEqual(query(copy, "SELECT n FROM appointment_count"), [(len(stored),)])

    def test_a_second_signal_stops_at_once(self):
        server = self.start("--port", "0", "--shutdown-timeout", "60")
        self.start_request_in_flight(server)
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, "No longer accepting connections")
        self.stop(server, signal.SIGINT)  # within 10 s, though the request is unfinished
        self.assertEqual(server.process.returncode, 1)

    def test_cannot_listen_or_open_the_database_is_exit_1(self):
        server = self.start("--port", "0")
        cases = [(["--port", str(server.port)], "cannot listen"),
                 (["--port", "0", "--cpu", "100000"], "cannot run on CPU 100000"),
                 (["--port", "0", "--db", os.path.join(HERE, "no", "such", "dir.db")],
                  "cannot open the database")]
        runs = [subprocess.Popen([*PYTHON, *SERVICE, *args], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, cwd=HERE)
                for args, _ in cases]
        for (args, message), run in zip(cases, runs):
            with self.subTest(args=args):
                stderr = run.communicate(timeout=30)[1]
                self.assertEqual(run.returncode, 1)
                self.assertIn(message, stderr)
                self.assertNotIn("Traceback", stderr)
        self.stop(server, signal.SIGTERM)

    @unittest.skipUnless(hasattr(os, "sched_getaffinity"), "CPU affinity is Linux-only")
    def test_cpu_pins_every_thread_to_one_cpu(self):
        allowed = os.sched_getaffinity(0)
        first = min(allowed)
        cases = ((str(first), {first}), ("any", allowed), ("auto", None))
        servers = start_processes(self, [([*SERVICE, "--port", "0", "--cpu", option], {})
                                         for option, _ in cases])
        for (option, expected), server in zip(cases, servers):
            with self.subTest(cpu=option):
                self.assertEqual(http_status(server, "/appointments?user_id=a"), 200)
                affinities = thread_affinities(server.process.pid)
                self.assertGreater(len(affinities), 2)  # main, watchdog, log writer...
                if expected is None:  # auto: one of the allowed CPUs, the same for all
                    expected = affinities[0]
                    self.assertEqual(len(expected), 1)
                    self.assertLessEqual(expected, allowed)
                self.assertTrue(all(affinity == expected for affinity in affinities))
                self.stop(server, signal.SIGTERM)

    USAGE_ERRORS = [
        (["--port", "70000"], {}, "not a port number"),
        ([], {"PORT": "http"}, "not a port number"),
        (["--max-body-bytes", "0"], {}, "not a positive number"),
        (["--request-timeout", "-1"], {}, "not a positive number"),
        (["--max-connections", "many"], {}, "not a positive number"),
        (["--cpu", "first"], {}, "not a CPU number"),
        (["--workers", "2"], {}, "--workers above 1 needs --db"),
        (["--workers", "2", "--db", "x.db", "--cpu", "0"], {}, "--cpu N is for one process"),
        (["--workers", "0"], {}, "not a positive number"),
        (["--workers", str(scheduler.WORKERS_PER_CPU * scheduler.usable_cpus() + 1), "--db",
          "x.db"], {}, f"at most {scheduler.WORKERS_PER_CPU} per CPU this process may use"),
        (["--cors-origin", "https://app.example.com/"], {}, "not an origin"),
        (["--cors-origin", "app.example.com"], {}, "not an origin"),
        # Never what a browser sends (the URL standard's serialization of an origin).
        (["--cors-origin", "https://app.example.com:443"], {}, "no default port"),
        (["--cors-origin", "http://b\u00fccher.example"], {}, "punycode"),
        (["--cors-origin", "http://app.example.com:99999"], {}, "not an origin"),
        (["--cors-origin", "http://app.example.com:"], {}, "not an origin"),
        (["--cors-origin", "http://a b"], {}, "not an origin"),
        (["--cors-origin", "http://127.1"], {}, "127.0.0.1"),  # a browser sends 127.0.0.1
        (["--cors-origin", "http://[::ffff:1.2.3.4]"], {}, "not an origin"),  # [::ffff:102:304]
        (["--db", ""], {}, "--db needs a file name"),  # an unset variable in a unit file
    ]

    def test_an_origin_is_taken_in_every_form_a_browser_sends(self):
        origins = ["https://app.example.com", "http://127.0.0.1:9401", "http://[::1]:8000",
                   "http://xn--bcher-kva.example", "http://my_host.example",
                   "http://example.com.", "http://[::ffff:102:304]", "*"]
        self.assertEqual(scheduler.parse_args(
            [word for origin in origins for word in ("--cors-origin", origin)]).cors_origins,
            origins)

    def test_bad_option_is_a_usage_error(self):
        for args, env, message in self.USAGE_ERRORS:  # parse_args() is what main() calls
            with self.subTest(args=args, env=env):
                with mock.patch.dict(os.environ, env), self.assertRaises(SystemExit) as caught, \
                        contextlib.redirect_stderr(io.StringIO()) as stderr:
                    scheduler.parse_args(args)
                self.assertEqual(caught.exception.code, 2)
                self.assertIn(message, stderr.getvalue())
        args, env, message = self.USAGE_ERRORS[1]  # and once as a process, with PORT
        result = subprocess.run([*PYTHON, *SERVICE, *args], capture_output=True,
                                text=True, timeout=30, env={**os.environ, **env}, cwd=HERE)
        self.assertEqual(result.returncode, 2)
        self.assertIn(message, result.stderr)

    # Each bad URI holds the password "p@ss-word-71e3", which no reason may quote, nor
    # the part after its "@" where that is not percent-encoded (read as a host).
    BAD_URIS = [
        ("postgresql://scheduler:p%40ss-word-71e3@[::1/scheduler",
         "an IPv6 host address has no closing ']'"),
        ("postgresql://scheduler:p%40ss-word-71e3@127.0.0.1:99999/scheduler",
         "'99999' is not a port number (1-65535)"),
        ("postgresql://scheduler:p%40ss-word-71e3@127.0.0.1/scheduler?sslmode=requir",
         "sslmode 'requir' is not one of disable, allow, prefer, require"),
        ("postgresql://scheduler:p%40ss-word-71e3@127.0.0.1/scheduler?sslcert=me.crt",
         "the parameter 'sslcert' is not supported by this service"),
        ("postgresql://scheduler:p%40ss-word-71e3%zz@127.0.0.1/scheduler",
         "the password has a '%' that is not followed by two hex digits"),
        ("postgresql://scheduler:p@ss-word-71e3@127.0.0.1/scheduler",
         "it has an '@' after the one that ends the user name and password"),
    ]

    def assertNoBadURIPassword(self, text: str) -> None:
        for shown in ("p@ss-word-71e3", "p%40ss-word-71e3", "ss-word-71e3"):
            self.assertNotIn(shown, text)

    def test_a_uri_it_cannot_read_is_a_usage_error_that_does_not_echo_the_password(self):
        for uri, reason in self.BAD_URIS:
            with self.subTest(reason=reason):
                with self.assertRaises(SystemExit) as caught, \
                        contextlib.redirect_stderr(io.StringIO()) as stderr:
                    scheduler.parse_args(["--db", uri])
                self.assertEqual(caught.exception.code, 2)
                self.assertIn(f"error: --db: the PostgreSQL URI cannot be read: {reason}",
                              stderr.getvalue())
                self.assertNoBadURIPassword(stderr.getvalue())
        uri, reason = self.BAD_URIS[-1]  # and once as a process
        run = subprocess.run([*PYTHON, *SERVICE, "--db", uri], capture_output=True, text=True,
                             timeout=30, cwd=HERE)
        self.assertEqual((run.returncode, run.stdout), (2, ""))
        self.assertIn(reason, run.stderr)
        self.assertNoBadURIPassword(run.stderr)


WRONG_PASSWORD = "wrong-secret-5e1f"  # a password that no role of the clusters has


def hold_back_bookings(testcase: unittest.TestCase, cluster: PostgresCluster,
                       database: str) -> Callable[[int], None]:
    """Lock the service's appointments table in database from a transaction of the
    superuser's, so that each booking waits at its INSERT, having read what it
    decides on (its snapshot taken, at REPEATABLE READ); return what lets them all
    go at once, as soon as that many of them wait: a race that is sure to be one."""
    lock = pg_connection(testcase, cluster.uri(cluster.SUPERUSER, database=database,
                                               sslmode="disable"))
    lock.query("BEGIN")
    lock.query("LOCK TABLE scheduler.appointments IN SHARE ROW EXCLUSIVE MODE")

    def waiting() -> int:  # as now: not as first read in this transaction
        lock.query("SELECT pg_stat_clear_snapshot()")
        return lock.query("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                          "current_database() AND wait_event_type = 'Lock'").rows[0][0]

    def release(writes: int) -> None:
        try:  # well within the servers' busy_timeout, after which they would answer 503
            wait_until(lambda: waiting() == writes, 4, f"{writes} bookings waiting")
        finally:
            lock.query("COMMIT")

    return release


@requires_postgres
class PostgresServersTest(unittest.TestCase):
    """scheduler.py --db postgresql://...: several server processes on one database,
    and every refusal at start. The command line's schema is always "scheduler":
    each test that starts servers has a database of its own (fresh_database())."""

    stop = CommandLineTest.stop
    refused = CommandLineTest.refused

    def setUp(self):
        self.cluster = PostgresCluster.shared()

    def start_servers(self, database: str, count: int = 2) -> List[ServerProcess]:
        """count servers on database, started at once (so on an empty database they
        race to make the schema)."""
        return start_processes(self, [([*SERVICE, "--port", "0", "--db",
                                        self.cluster.uri(database=database)], {})] * count)

    @staticmethod
    def book(server: ServerProcess, body: dict, key: Optional[str] = None) -> Response:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        try:
            conn.request("POST", "/appointments", json.dumps(body), {
                "Content-Type": "application/json",
                **({} if key is None else {"Idempotency-Key": f'"{key}"'})})
            return response_of(conn)
        finally:
            conn.close()

    def race(self, database: str, bookings: List[Tuple[ServerProcess, dict, Optional[str]]],
             waiting: Optional[int] = None) -> List[Response]:
        """Send the bookings (server, body, key) at once, each on a connection of its
        own, held back in the database until waiting of them (all by default) have
        read what they decide on; the answers, in the order of the bookings."""
        release = hold_back_bookings(self, self.cluster, database)
        answers: List[Optional[Response]] = [None] * len(bookings)

        def send(index, server, body, key):
            answers[index] = self.book(server, body, key)

        threads = [threading.Thread(target=send, args=(index, *booking))
                   for index, booking in enumerate(bookings)]
        for thread in threads:
            thread.start()
        try:
            release(len(bookings) if waiting is None else waiting)
        finally:
            for thread in threads:
                thread.join()
        return answers

    def assertNoPassword(self, text: str) -> None:
        for password in (*PostgresCluster.PASSWORDS.values(), WRONG_PASSWORD):
            if password:
                self.assertNotIn(password, text)
                self.assertNotIn(urllib.parse.quote(password, safe=""), text)

    def test_two_servers_racing_for_one_user_and_date_book_exactly_one(self):
        database = self.cluster.fresh_database(self)
        servers = self.start_servers(database)
        # A server's batch takes one booking a user (the others wait for the next), so
        # one booking of each server's is held back in the database at a time.
        answers = self.race(database, [
            (server, {"user_id": "racer", "date": "2026-11-25", "time": f"{hour:02d}:00"}, None)
            for hour, server in enumerate(servers * 3)], waiting=len(servers))
        self.assertEqual(sorted(answer.status for answer in answers), [201] + [409] * 5)
        winner = next(answer.json() for answer in answers if answer.status == 201)
        for answer in answers:
            if answer.status == 409:
                self.assertEqual(answer.json()["appointment"], winner, answer.body)
        for server in servers:  # each shows it
            self.assertEqual(http_status(server, "/appointments/racer/2026-11-25"), 200)
        self.assertEqual(self.cluster.sql("SELECT user_id, date, time FROM "
                                          "scheduler.appointments", database),
                         f"racer|2026-11-25|{winner['time']}")
        # One of the two made the schema, and said so, naming the database without
        # the password; neither printed it anywhere.
        logs = [self.stop(server, signal.SIGTERM) + server.process.stdout.read()
                for server in servers]
        made = (f"Created schema scheduler of postgresql://scheduler@127.0.0.1:"
                f"{self.cluster.port}/{database} (schema version {scheduler.PG_SCHEMA_VERSION}).")
        self.assertEqual(sorted(log.count("Created schema") for log in logs), [0, 1], logs)
        self.assertEqual(sum(log.count(made) for log in logs), 1, logs)
        for server, log in zip(servers, logs):
            self.assertEqual(server.process.returncode, 0)
            self.assertIn('"POST /appointments HTTP/1.1" 409', log)
            self.assertNoPassword(log)

    def test_retries_of_one_key_racing_across_servers_get_the_first_answer(self):
        # In one process, a retry while the first is under way is a 409 (Service.
        # processing()); across servers the database decides: the one that comes
        # second runs again once the first has committed (40001, or 23505 where both
        # kept the key), and finds the first's answer.
        database = self.cluster.fresh_database(self)
        servers = self.start_servers(database)
        taken = {"user_id": "taken", "date": "2026-11-25", "time": "08:00"}
        self.assertEqual(self.book(servers[0], taken).status, 201)
        bodies = [{"user_id": f"keyed-{number}", "date": "2026-11-25", "time": "09:00"}
                  for number in range(3)] + [{**taken, "time": "10:00"}]
        statuses = [201, 201, 201, 409]  # the last: a conflict with the one taken
        keys = [f"retried-{number}" for number in range(len(bodies))]
        answers = self.race(database, [(server, body, key) for key, body in zip(keys, bodies)
                                       for server in servers])
        for number, (key, status) in enumerate(zip(keys, statuses)):
            with self.subTest(key=key):
                pair = answers[2 * number:2 * number + 2]
                self.assertEqual([answer.status for answer in pair], [status] * 2,
                                 [answer.body for answer in pair])
                self.assertEqual(pair[0].body, pair[1].body)
                self.assertEqual(sorted(str(answer.headers["Idempotent-Replayed"])
                                        for answer in pair), ["None", "true"])
                again = [self.book(server, bodies[number], key) for server in servers]
                self.assertEqual({(answer.status, answer.body) for answer in again},
                                 {(status, pair[0].body)})
        self.assertEqual(self.cluster.sql("SELECT count(*) FROM scheduler.appointments",
                                          database), "4")
        self.assertEqual(self.cluster.sql("SELECT count(*) FROM scheduler.idempotency_keys",
                                          database), "4")

    def test_every_refusal_at_start_is_one_line_naming_the_host_and_why(self):
        cluster, secret = self.cluster, PostgresCluster.PASSWORDS["scheduler"]
        here = f"127.0.0.1:{cluster.port}"

        def listener() -> socket.socket:
            sock = socket.socket()
            self.addCleanup(sock.close)
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            return sock

        silent = listener()  # the kernel accepts; nothing ever answers: a frozen server
        no_tls = listener()  # answers the SSLRequest as a server with ssl off does
        play_server(self, no_tls, lambda sock: [receive_startup(sock), sock.sendall(b"N"),
                                                sock.recv(1)])
        nothing = free_port()
        foreign = cluster.fresh_database(self)  # its schema "scheduler" is another's
        cluster.sql("SET ROLE scheduler; CREATE SCHEMA scheduler; "
                    "CREATE TABLE scheduler.orders (id integer)", foreign)
        tables = "SELECT relname FROM pg_class WHERE relnamespace = 'scheduler'::regnamespace"
        before = cluster.sql(tables, foreign)
        wrong = f': {here}: the server refused the connection: FATAL: password authentication ' \
                f'failed for user "scheduler" (SQLSTATE 28P01)'
        cases = [  # what, URI, environment, what the line says after "...use PostgreSQL"
            ("nothing listening", f"postgresql://scheduler:{secret}@127.0.0.1:{nothing}/"
             "scheduler", {}, f": 127.0.0.1:{nothing}: connection refused"),
            ("a wrong password", cluster.uri(password=WRONG_PASSWORD), {}, wrong),
            ("a wrong PGPASSWORD", cluster.uri(password=None), {"PGPASSWORD": WRONG_PASSWORD},
             wrong),
            ("a missing database", cluster.uri(database="no_such_database"), {},
             f': {here}: the server refused the connection: FATAL: database "no_such_database" '
             f"does not exist (SQLSTATE 3D000)"),
            ("TLS refused", on_ports(cluster.uri(sslmode="require"), no_tls.getsockname()[1]),
             {}, f": 127.0.0.1:{no_tls.getsockname()[1]}: the server does not accept TLS (its "
                 "ssl is off), and sslmode=require requires it"),
            ("a silent server", on_ports(cluster.uri(), silent.getsockname()[1]), {},
             f": 127.0.0.1:{silent.getsockname()[1]}: the server did not answer within the "
             "deadline ("),  # then how long it waited: below
            ("a schema it did not make", cluster.uri(database=foreign), {},
             f": schema scheduler of postgresql://scheduler@{here}/{foreign}?connect_timeout=2 "
             "holds tables this service did not make; give it a schema of its own (nothing "
             "was changed)"),
            ("a role that may not make the schema", cluster.uri("md5_user", database="postgres"),
             {}, f" at postgresql://md5_user@{here}/postgres?connect_timeout=2: ERROR: "
                 "permission denied for database postgres (SQLSTATE 42501)"),
        ]
        if cluster.ca_file:
            cases.append(("a certificate that does not verify", cluster.uri(
                sslmode="verify-full", sslrootcert=cluster.other_ca_file), {},
                f": {here}: the server's certificate does not verify (sslmode=verify-full): "))
        saying = {}  # what, by what it says

        def args(uri):  # every URI with connect_timeout=2, libpq's least
            return ["--port", "0", "--db", uri + ("&" if "?" in uri else "?") +
                    "connect_timeout=2"]

        def environ(env):
            return {**{name: value for name, value in os.environ.items()
                       if not name.startswith("PG")}, **env}

        # The silent server as a process, whose wait the others overlap: the exit
        # status, and the one line that the process writes; the others through
        # open_store(), which serve() calls, and which writes that line.
        silent_case = next(case for case in cases if case[0] == "a silent server")
        silent = subprocess.Popen([*PYTHON, *SERVICE, *args(silent_case[1])],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=environ(silent_case[2]), cwd=HERE)
        self.addCleanup(lambda: silent.poll() is None and silent.kill())
        for what, uri, env, _ in cases:
            if what != "a silent server":
                saying[what] = self.refused(args(uri), environ(env))
        stdout, saying["a silent server"] = silent.communicate(timeout=30)
        self.assertEqual((silent.returncode, stdout), (1, ""), saying["a silent server"])
        for what, uri, env, reason in cases:
            with self.subTest(what):
                self.assertRegex(saying[what], r"\A" + re.escape(
                    f"scheduler: cannot use PostgreSQL{reason}") + r"[^\n]*\n\Z")
                self.assertNoPassword(saying[what])
        # connect_timeout's 2 s, not the PG_CONNECT_TIMEOUT (10 s) or more of a URI without it
        waited = re.search(r"within the deadline \((\d+\.\d) s\)", saying["a silent server"])
        self.assertTrue(2 <= float(waited[1]) < scheduler.PG_CONNECT_TIMEOUT, waited[0])
        self.assertEqual(cluster.sql(tables, foreign), before)


@unittest.skipUnless(hasattr(os, "fork") and os.path.exists("/proc/self/fd"),
                     "counts each worker's connections in /proc")
class WorkersTest(unittest.TestCase):
    """--workers 2 --db: two server processes on one listening socket and one file (or
    one PostgreSQL database)."""

    def start(self, preexec_fn=None, code: List[str] = SERVICE, cwd: str = HERE, env=None,
              db: Optional[str] = None) -> Tuple[ServerProcess, str, Dict[int, int]]:
        """Start the supervisor (code: SERVICE, or a script) in cwd, with env, on db (a
        new SQLite file by default), and wait until both workers run, each started as
        the supervisor was (the same arguments); their process IDs."""
        path = db or temporary_database(self)
        server = start_process(self, [*code, "--port", "0", "--workers", "2", "--db", path],
                               env, preexec_fn=preexec_fn, cwd=cwd)
        self.addCleanup(lambda: server.process.poll() is None and (
            server.process.send_signal(signal.SIGTERM) or server.process.wait(timeout=20)))
        workers, running = {}, set()  # running: each has its handlers, and its store open
        self.startup: List[str] = []  # what the supervisor and workers logged until then
        while len(workers) < 2 or len(running) < 2:
            self.startup += read_log_until(server, "Worker ")
            line = self.startup[-1]
            started = re.match(r"Worker (\d) started \(process (\d+)\)\.$", line)
            if started:
                workers[int(started[1])] = int(started[2])
            elif " running on " in line:
                running.add(line.split()[1])
        command = server.process.args[len(PYTHON):]  # the interpreter's options may differ
        for pid in workers.values():
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                self.assertEqual(file.read().decode().split("\0")[-len(command) - 1:-1], command)
        return server, path, workers

    @staticmethod
    def exec_of(pid: int) -> bool:
        """Whether a worker's process was started anew (exec), with the worker's
        setting in its environment, rather than forked from its supervisor."""
        with open(f"/proc/{pid}/environ", "rb") as file:
            return any(entry.startswith(scheduler.WORKER_VARIABLE.encode() + b"=")
                       for entry in file.read().split(b"\0"))

    @staticmethod
    def running(pid: int) -> bool:
        """Whether the process exists and is not a zombie waiting to be reaped."""
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def test_a_keyed_booking_sent_to_every_worker_books_once(self):
        server, path, workers = self.start()
        answers = []
        for _ in range(10):  # on new connections: both workers get some
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            conn.request("POST", "/appointments", VALID_BODY, {
                "Content-Type": "application/json", "Idempotency-Key": '"to-every-worker"'})
            answers.append(response_of(conn))
            conn.close()
        self.assertEqual({(answer.status, answer.body) for answer in answers},
                         {(201, answers[0].body)})
        self.assertEqual(query(path, "SELECT count(*) FROM appointments"), [(1,)])

    def test_every_scrape_counts_the_whole_service_and_never_goes_down(self):
        server, _, workers = self.start()

        def total() -> float:  # on a new connection each time: either worker may answer
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            conn.request("GET", "/metrics")
            response = response_of(conn)
            conn.close()
            self.assertEqual(response.status, 200)
            return sum(value for (name, _), value in parse_metrics(response.body.decode()).items()
                       if name == "scheduler_requests_total")

        seen, made = [], 0
        for round in range(40):
            if round == 20:  # a worker dies; the one started in its place carries on
                os.kill(workers[1], signal.SIGKILL)
                wait_for_log(server, "Worker 1 started")
            for _ in range(5):
                conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
                self.assertEqual(post_json(conn, {"user_id": f"m{round}-{made}",
                                                  "date": "2026-11-25", "time": "09:00"}).status,
                                 201)
                conn.close()
                made += 1
            seen.append(total())
            made += 1  # the scrape, counted once answered
        self.assertEqual(seen, sorted(seen), "a counter went down")
        wait_until(lambda: total() >= made, what=f"a scrape to count all {made} requests")

    def test_one_count_row_whatever_the_number_of_starts(self):
        path = temporary_database(self)
        for start in range(2):
            server = start_process(self, [*SERVICE, "--port", "0", "--workers", "2", "--db", path])
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            self.assertEqual(post_json(conn, {"user_id": f"user-{start}", "date": "2026-11-25",
                                              "time": "09:00"}).status, 201)
            conn.close()
            server.process.send_signal(signal.SIGTERM)
            self.assertEqual(server.process.wait(timeout=20), 0)
        self.assertEqual(query(path, "SELECT * FROM appointment_count"), [(1, 2)])

    def test_a_race_spread_over_the_workers_books_exactly_one(self):
        server, _, workers = self.start()
        self.race_over_the_workers(server, workers)

    @requires_postgres
    def test_a_race_spread_over_the_workers_on_postgresql_books_exactly_one(self):
        cluster = PostgresCluster.shared()
        database = cluster.fresh_database(self)
        server, _, workers = self.start(db=cluster.uri(database=database))
        self.assertIn(f"Created schema scheduler of postgresql://scheduler@127.0.0.1:"
                      f"{cluster.port}/{database} (schema version "
                      f"{scheduler.PG_SCHEMA_VERSION}).\n", self.startup)  # by the supervisor
        self.assertNotIn(cluster.PASSWORDS["scheduler"], "".join(self.startup))
        self.race_over_the_workers(server, workers)

    def race_over_the_workers(self, server: ServerProcess, workers: Dict[int, int]) -> None:
        """Bookings of one user and date on connections that both workers hold, sent
        at once: one 201, and a 409 for each of the others with the one booked."""
        conns = []
        while not all(accepted_connections(pid, server.port) for pid in workers.values()) \
                and len(conns) < 100:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            self.addCleanup(conn.close)
            conn.request("GET", "/healthz")  # accepted, and so held, by one worker
            self.assertEqual(conn.getresponse().read(), b'{"status": "ok"}\n')
            conns.append(conn)
        self.assertTrue(all(accepted_connections(pid, server.port) for pid in workers.values()),
                        "one worker took all")
        barrier, statuses, bodies = threading.Barrier(len(conns)), [], []

        def book(conn, hour):
            barrier.wait()
            response = post_json(conn, {"user_id": "racer", "date": "2026-11-25",
                                        "time": f"{hour % 24:02d}:00"})
            statuses.append(response.status)
            bodies.append(response.json())

        run_all([threading.Thread(target=book, args=(conn, hour))
                 for hour, conn in enumerate(conns)])
        self.assertEqual(sorted(statuses), [201] + [409] * (len(conns) - 1))
        winner = next(body for body in bodies if "appointment" not in body)
        self.assertTrue(all(body["appointment"] == winner for body in bodies
                            if "appointment" in body))

    def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(self):
        server, path, workers = self.start()
        acknowledged, stop = [], threading.Event()

        def stream(client):  # books until told to stop, reconnecting when cut off
            conn, index = None, 0
            while not stop.is_set() and index < 5000:
                index += 1
                body = {"user_id": f"user-{client}-{index}", "date": "2026-11-25",
                        "time": "09:00"}
                try:
                    conn = conn or http.client.HTTPConnection(server.host, server.port,
                                                              timeout=10)
                    response = post_json(conn, body)
                    if response.status == 201:
                        acknowledged.append(body)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = None  # that worker died: the next connection goes to another
            if conn is not None:
                conn.close()

        streams = [threading.Thread(target=stream, args=(n,)) for n in range(4)]
        for thread in streams:
            thread.start()
        self.addCleanup(lambda: [stop.set(), *map(threading.Thread.join, streams)])
        wait_until(lambda: len(acknowledged) >= 100, what="100 bookings")
        os.kill(workers[1], signal.SIGKILL)
        wait_for_log(server, f"Worker 1 (process {workers[1]}) was killed by SIGKILL")
        replaced = wait_for_log(server, "Worker 1 started")
        self.assertNotIn(f"(process {workers[1]})", replaced)
        before = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= before + 100, what="bookings to go on")
        stop.set()
        for thread in streams:
            thread.join()
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(timeout=20), 0)
        store = scheduler.SQLiteStore(path)
        self.addCleanup(store.close)
        for body in acknowledged:
            self.assertEqual(store.get(body["user_id"], dt.date(2026, 11, 25)),
                             scheduler.parse_appointment(body))

    def test_sigterm_drains_every_worker_and_a_second_signal_stops_them_at_once(self):
        server, _, workers = self.start()
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(timeout=20), 0)
        wait_for_log(server, "SIGTERM received: every worker has drained and stopped.")
        for pid in workers.values():
            self.assertFalse(self.running(pid))
        server, _, workers = self.start()
        sock = socket.create_connection((server.host, server.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(post_head(len(VALID_BODY), "Expect: 100-continue\r\n"))  # in flight
        self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, "Asked by the supervisor to stop: shutting down.")
        server.process.send_signal(signal.SIGINT)
        self.assertEqual(server.process.wait(timeout=20), 1)
        wait_until(lambda: not any(map(self.running, workers.values())),
                   what="every worker gone")

    def test_ctrl_c_in_a_terminal_drains_every_worker(self):
        # A terminal sends SIGINT to its whole foreground process group: workers must
        # leave it to the supervisor, or its SIGTERM would be their second signal.
        server, _, workers = self.start(preexec_fn=os.setpgrp)  # each has its handlers
        os.killpg(server.process.pid, signal.SIGINT)
        self.assertEqual(server.process.wait(timeout=20), 0)
        log = "".join(read_log_until(
            server, "SIGINT received: every worker has drained and stopped."))
        self.assertEqual(log.count("Asked by the supervisor to stop: shutting down."), 2, log)
        self.assertEqual(log.count("Stopped."), 2, log)

    def test_sigterm_to_the_whole_group_drains_every_worker(self):
        # systemd's KillMode=control-group sends SIGTERM to every process of the service:
        # each worker gets it from there and the supervisor's word too. Neither may be
        # taken for a second signal, which would cut the requests in flight off.
        server, _, workers = self.start(preexec_fn=os.setpgrp)
        sock = socket.create_connection((server.host, server.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(post_head(len(VALID_BODY), "Expect: 100-continue\r\n"))  # in flight
        self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
        os.killpg(server.process.pid, signal.SIGTERM)
        # Each worker says why it stops: its SIGTERM, or the supervisor's word if first.
        log = "".join(read_log_until(server, ": shutting down."))
        sock.sendall(VALID_BODY)
        self.assertEqual(read_response(sock).status, 201)
        self.assertEqual(server.process.wait(timeout=20), 0)
        log += "".join(read_log_until(
            server, "SIGTERM received: every worker has drained and stopped."))
        self.assertEqual(log.count("Stopped."), 2, log)

    def health_and_metrics(self, server: ServerProcess) -> Tuple[dict, dict]:
        """/healthz's body, and the supervisor's samples from /metrics."""
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/healthz")
        health = response_of(conn)
        self.assertEqual(health.status, 200, health.body)
        conn.request("GET", "/metrics")
        samples = parse_metrics(response_of(conn).body.decode())
        return health.json(), {name: value for (name, _), value in samples.items()
                                if name.startswith("scheduler_worker")}

    def test_a_worker_that_keeps_dying_young_shows_in_healthz_and_metrics(self):
        server, path, workers = self.start()
        make_read_only(self, path)  # a new worker cannot open it; those running write on
        os.kill(workers[1], signal.SIGKILL)

        def seen(status: str, failing: int):  # both answers, once both say so
            health, samples = self.health_and_metrics(server)
            return health["status"] == status and samples["scheduler_workers_failing"] == \
                failing and (health, samples)

        # From worker 0, the one left: every connection reaches it.
        health, samples = wait_until(lambda: seen("degraded", 1), what="worker 1 failing")
        self.assertEqual((health["status"], health["failing_workers"]), ("degraded", [1]))
        self.assertRegex(health["detail"], r"\AWorker 1 keeps dying young \(\d+ times in a "
                                           r"row; the last exited with status 1 before it was "
                                           r"ready\)\.")
        self.assertEqual(samples["scheduler_workers_running"], 1)
        self.assertGreaterEqual(samples["scheduler_worker_restarts_total"], 1)
        wait_for_log(server, "cannot open the database")  # the worker's own reason, logged
        if os.geteuid() == 0:  # writable again
            subprocess.run(["chattr", "-i", path], check=True)
        else:
            os.chmod(path, 0o644)
        health, samples = wait_until(lambda: seen("ok", 0), what="worker 1 serving again")
        self.assertEqual(health, {"status": "ok"})
        self.assertEqual((samples["scheduler_workers_running"],
                          samples["scheduler_workers_restarting"]), (2, 0))
        self.assertGreaterEqual(samples["scheduler_worker_restarts_total"], 2)

    @unittest.skipUnless(hasattr(os, "sched_setaffinity"), "sets the CPUs it may use")
    def test_sigterm_while_the_most_workers_start_stops_them_starting(self):
        def one_cpu():
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

        most, path = scheduler.WORKERS_PER_CPU, temporary_database(self)
        result = subprocess.run([*PYTHON, *SERVICE, "--workers", str(most + 1), "--db", path],
                                capture_output=True, text=True, timeout=30, preexec_fn=one_cpu,
                                cwd=HERE)
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"--workers {most + 1} is more than this machine can use: at most "
                      f"{most} per CPU this process may use, so {most} here", result.stderr)
        server = start_process(self, [*SERVICE, "--port", "0", "--workers", str(most), "--db",
                                      path], preexec_fn=one_cpu)
        wait_for_log(server, "Worker 0 started")  # one CPU: one starts at a time
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(timeout=20), 0)
        log = "".join(read_log_until(server, "SIGTERM received: every worker has drained"))
        self.assertLess(log.count(" started (process "), most, log)

    def deployed_copy(self) -> Tuple[str, str, str]:
        """A copy of the code, to deploy changes to: its directory, its path, and
        its text. Run as a module (SERVICE), as a deploy would: its bytecode is cached
        beside the file, and a new process must not load it once the file has
        changed. The cache is copied from where make test wrote it
        (compile_service()), the file with its time, for which the cache holds; else
        the first process that imports the file writes it (PYTHONDONTWRITEBYTECODE
        unset)."""
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        script = os.path.join(directory.name, "scheduler.py")
        shutil.copy2(SCRIPT, script)
        with contextlib.suppress(OSError):
            os.makedirs(os.path.join(directory.name, "__pycache__"))
            shutil.copy2(importlib.util.cache_from_source(SCRIPT),
                         importlib.util.cache_from_source(script))
        with open(script, encoding="utf-8") as file:
            return directory.name, script, file.read()

    def test_a_worker_that_dies_after_a_failed_reload_starts_with_the_code_the_others_run(self):
        directory, script, code = self.deployed_copy()
        server, _, workers = self.start(cwd=directory, env={"PYTHONDONTWRITEBYTECODE": ""})
        with open(script, "w", encoding="utf-8") as file:  # a deploy that cannot start
            file.write(code + "\n) this is not Python\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "the reload stops, and the workers serve on")
        number, pid = min(workers.items())
        os.kill(pid, signal.SIGKILL)
        restarted = int(re.search(r"\(process (\d+)\)", wait_for_log(
            server, f"Worker {number} started")).group(1))
        wait_for_log(server, f"Worker {number} running")  # the file that failed would not run
        wait_until(lambda: self.health_and_metrics(server)[1]["scheduler_workers_running"] == 2,
                   what="both workers serving")
        self.assertFalse(self.exec_of(restarted))  # a fork of the code loaded, as before

    def test_sighup_replaces_every_worker_with_the_code_anew_and_answers_every_request(self):
        directory, script, code = self.deployed_copy()
        server, path, workers = self.start(cwd=directory,
                                           env={"PYTHONDONTWRITEBYTECODE": ""})
        started_anew = [self.exec_of(pid) for pid in workers.values()]
        answers, failures, stop = [], [], threading.Event()  # (status, Server) of each booking

        def stream(keep_alive: bool):  # one booking after another, each on a new connection
            conn = None  # or on one kept open, until a response closes it
            for index in range(5000):
                if stop.is_set():
                    break
                conn = conn or http.client.HTTPConnection(server.host, server.port, timeout=10)
                try:
                    response = post_json(conn, {"user_id": f"user-{keep_alive}-{index}",
                                                "date": "2026-11-25", "time": "09:00"})
                    answers.append((response.status, response.headers["Server"]))
                    if keep_alive and response.headers["Connection"] != "close":
                        continue
                except (OSError, http.client.HTTPException) as error:
                    failures.append(repr(error))
                conn.close()
                conn = None
            if conn is not None:  # kept open when the loop ended
                conn.close()

        streams = [threading.Thread(target=stream, args=(keep_alive,))
                   for keep_alive in (False, True)]
        for thread in streams:
            thread.start()
        self.addCleanup(lambda: [stop.set(), *map(threading.Thread.join, streams)])
        wait_until(lambda: len(answers) >= 20, what="20 bookings")
        with open(script, "w", encoding="utf-8") as file:  # a deploy that cannot start
            file.write(code + "\n) this is not Python\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "the reload stops, and the workers serve on")
        self.assertTrue(all(map(self.running, workers.values())))
        with open(script, "w", encoding="utf-8") as file:  # then a good one
            file.write(code.replace('__version__ = "', '__version__ = "reloaded-', 1))
        server.process.send_signal(signal.SIGHUP)
        log = "".join(read_log_until(server, "Reload done"))
        replaced = [(int(number), int(new), int(old)) for number, new, old in re.findall(
            r"Worker (\d) started \(process (\d+)\) to replace process (\d+)\.", log)]
        self.assertEqual(sorted((number, old) for number, _, old in replaced),
                         sorted(workers.items()))
        wait_until(lambda: not any(map(self.running, workers.values())), what="the old gone")
        self.assertTrue(all(self.running(new) for _, new, _ in replaced))
        count = len(answers)
        wait_until(lambda: len(answers) >= count + 20, what="20 bookings after the reload")
        stop.set()
        for thread in streams:
            thread.join()
        self.assertEqual(failures, [])  # no connection refused, reset or left unanswered
        self.assertEqual({status for status, _ in answers}, {201})
        self.assertEqual(answers[-1][1], f"scheduler/reloaded-{scheduler.__version__}")
        self.assertEqual(query(path, "SELECT count(*) FROM appointments"), [(len(answers),)])
        # Forks before the SIGHUP (the code loaded once); from then on, processes that
        # load the code anew, including one that replaces a worker that died.
        self.assertEqual(started_anew, [False, False])
        os.kill(replaced[0][1], signal.SIGKILL)
        again = int(re.search(r"\(process (\d+)\)", wait_for_log(
            server, f"Worker {replaced[0][0]} started")).group(1))
        wait_for_log(server, f"Worker {replaced[0][0]} running")  # past its exec
        self.assertEqual([self.exec_of(pid) for pid in (replaced[1][1], again)], [True, True])

    def test_sigterm_during_a_reload_stops_every_worker_cleanly(self):
        server, _, workers = self.start()
        server.process.send_signal(signal.SIGHUP)
        new = int(re.search(r"\(process (\d+)\) to replace",
                            wait_for_log(server, "to replace process")).group(1))
        server.process.send_signal(signal.SIGTERM)  # the new one has not yet said it is ready
        self.assertEqual(server.process.wait(timeout=20), 0)
        wait_for_log(server, "SIGTERM received: every worker has drained and stopped.")
        self.assertFalse(any(map(self.running, [new, *workers.values()])))

    def test_workers_stop_by_themselves_when_the_supervisor_is_killed(self):
        server, _, workers = self.start(code=[SCRIPT])  # a script: the others run a module
        server.process.kill()
        server.process.wait(timeout=10)
        wait_until(lambda: not any(map(self.running, workers.values())),
                   what="the orphaned workers to stop")


class BookingLoad:
    """Bookings from client threads through servers (thread n sends to servers[n %
    len(servers)], on a keep-alive connection of its own), each thread booking users
    of its own with an Idempotency-Key each, and retrying a 503 with its key as a
    client should (sooner than its Retry-After asks, to see when booking works
    again). Bounded: it stops at stop(), or by itself after requests per thread or
    seconds. It notes each 201 (when, whose, whether replayed) and anything else
    that is not a 503 with Retry-After."""

    PAUSE = 0.02  # seconds between a 503 and its retry

    def __init__(self, servers: List[ServerProcess], threads: int = 8, requests: int = 2000,
                 seconds: float = 30):
        self.servers, self.requests, self.seconds = servers, requests, seconds
        self.acknowledged: List[Tuple[float, str, bool]] = []  # list.append is atomic
        self.unexpected: List[tuple] = []
        self.unavailable: List[float] = []  # when each 503 came
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,))
                         for n in range(threads)]

    def __enter__(self) -> "BookingLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join()

    def booked_after(self, moment: float) -> Optional[float]:
        """When the first booking acknowledged after moment was, if any."""
        return next((at for at, _, _ in list(self.acknowledged) if at > moment), None)

    def _client(self, number: int) -> None:
        server = self.servers[number % len(self.servers)]
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        ends = time.monotonic() + self.seconds
        user, sent = f"load-{number}-0", 0
        try:
            while not self._stopping.is_set() and time.monotonic() < ends \
                    and sent < self.requests:
                sent += 1
                try:
                    conn.request("POST", "/appointments", json.dumps(
                        {"user_id": user, "date": "2026-11-25", "time": "09:30"}),
                        {"Content-Type": "application/json", "Idempotency-Key": f'"{user}"'})
                    response = response_of(conn)
                except (OSError, http.client.HTTPException) as error:
                    self.unexpected.append((user, repr(error)))
                    conn.close()
                    continue
                if response.status == 503 and response.headers["Retry-After"]:
                    self.unavailable.append(time.monotonic())
                    self._stopping.wait(self.PAUSE)
                    continue  # the same booking, with its key
                if response.status == 201:
                    self.acknowledged.append((time.monotonic(), user, bool(
                        response.headers["Idempotent-Replayed"])))
                else:
                    self.unexpected.append((user, response.status, response.body[:300]))
                user = f"load-{number}-{sent}"
        finally:
            conn.close()


@requires_postgres
class PostgresOutageUnderLoadTest(unittest.TestCase):
    """Two servers (processes) on one PostgreSQL database, under booking load, while
    the database restarts or fails over: clients get 201s and 503s with Retry-After,
    booking resumes by itself, and nothing acknowledged is lost. A booking whose
    outcome was unknown (its connection lost after COMMIT was sent) gets its first
    answer when retried with its key, never a 409 for its own appointment."""

    def start_servers(self, uri: str, count: int = 2) -> List[ServerProcess]:
        servers = start_processes(self, [([*SERVICE, "--port", "0", "--db", uri], {})] * count)
        for server in servers:
            self.addCleanup(lambda p=server.process: p.poll() is None and (
                p.send_signal(signal.SIGTERM) or p.wait(timeout=20)))
        return servers

    def stored(self, cluster: PostgresCluster, database: str) -> Set[str]:
        return set(cluster.sql("SELECT user_id FROM scheduler.appointments",
                               database).split())

    def test_a_restart_under_load_loses_no_acknowledged_booking(self):
        cluster = PostgresCluster.shared()  # restarted, it is as it was
        database = cluster.fresh_database(self)
        servers = self.start_servers(cluster.uri(database=database))
        with BookingLoad(servers) as load:
            wait_until(lambda: len(load.acknowledged) >= 20, what="bookings before the restart")
            cluster.restart("fast")
            back = time.monotonic()
            wait_until(lambda: load.booked_after(back), 10, "a booking after the restart")
            wait_until(lambda: len(load.acknowledged) >= 20 + len([
                at for at, _, _ in load.acknowledged if at <= back]), what="more bookings")
        self.assertEqual(load.unexpected, [])
        self.assertTrue(load.unavailable, "no 503 at all: was the database restarted?")
        acknowledged = {user for _, user, _ in load.acknowledged}
        self.assertLessEqual(acknowledged, self.stored(cluster, database))

    def test_a_failover_to_a_synchronous_standby_loses_no_acknowledged_booking(self):
        primary = PostgresCluster.for_test(self)  # killed: a cluster of its own
        standby = primary.standby(synchronous=True)
        self.addCleanup(standby.cleanup)
        database = primary.DATABASE
        servers = self.start_servers(primary.uri(others=(standby,),
                                                 target_session_attrs="read-write"))
        with BookingLoad(servers) as load:
            wait_until(lambda: len(load.acknowledged) >= 20, what="bookings before the failover")
            primary.kill()  # as when its machine is lost
            standby.promote()
            promoted = time.monotonic()
            wait_until(lambda: load.booked_after(promoted), 10, "a booking on the new primary")
            wait_until(lambda: len(load.acknowledged) >= 20 + len([
                at for at, _, _ in load.acknowledged if at <= promoted]), what="more bookings")
        self.assertEqual(load.unexpected, [])
        acknowledged = {user for _, user, _ in load.acknowledged}
        self.assertLessEqual(acknowledged, self.stored(standby, database))


# --- Benchmark (make bench; skipped by make test) -------------------------------------
# Timing figures live here, never in a pass/fail test. The benchmark fails only
# on wrong answers: errors under load, or a store that does not hold what it should.

BENCH_SECONDS = int(os.environ.get("SCHEDULER_BENCH_SECONDS", "10"))  # a row's load
# wrk's scripts: the latencies (wrk's histogram: each value in microseconds, and how
# many requests took it), so that the runs of several wrk processes add up exactly.
WRK_LATENCIES_SCRIPT = """
function done(summary, latency, requests)
  for i = 1, #latency do
    io.write(string.format("latency %d %d\\n", latency(i)))
  end
end
"""
WRK_POST_SCRIPT = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local n = 0
function request()
  n = n + 1
  local body = string.format(
    '{"user_id": "%s-%%d-%%d", "date": "2026-11-25", "time": "09:30"}', tid, n)
  return wrk.format("POST", "/appointments", {["Content-Type"] = "application/json"}, body)
end
"""
READER = "bench-reader"  # the user whose appointments the GET load lists
BENCH_BASE = os.environ.get("SCHEDULER_BENCH_BASE", "")  # make bench BASE=<commit>
BENCH_ROUNDS = int(os.environ.get("SCHEDULER_BENCH_ROUNDS", "5"))  # its rounds a row
# Rows of POSTs book new users until the load stops: more than the default
# --max-appointments on a fast machine, which would then answer 507.
BENCH_CAPACITY = 100_000_000


class LoadResult(NamedTuple):
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # wrong statuses, dropped connections, timeouts
    problem: str = ""  # what the errors were, for the failure's message

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


# The user of make bench's worst case: the longest ID, the most appointments one user
# may hold, each with the longest note, all in four-byte UTF-8.
BIG_USER, BIG_NOTE = "😀" * scheduler.MAX_USER_ID_LENGTH, "🦴" * scheduler.MAX_NOTE_LENGTH
_BIG_TARGETS = {  # what the pollers of BIG_USER ask for, by kind
    "BIG": "/appointments?user_id={user}",
    "FEED": "/appointments.ics?user_id={user}",
    "RANGE": "/appointments?user_id={user}&to={to}"}  # a new key each time: never kept


def _bench_request(kind: str, prefix: str, number: int) -> bytes:
    if kind == "GET":
        return f"GET /appointments?user_id={READER} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    if kind in _BIG_TARGETS:
        to = dt.date(2099, 12, 31) - dt.timedelta(days=number % 20_000)
        target = _BIG_TARGETS[kind].format(user=urllib.parse.quote(BIG_USER), to=to)
        return f"GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    body = (f'{{"user_id": "{prefix}-{number}", "date": "2026-11-25", '
            f'"time": "09:30"}}').encode()
    return (b"POST /appointments HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def generate_load(address, kind: str, connections: int, seconds: float,
                  prefix: str) -> Tuple[List[float], int, str]:
    """Keep connections keep-alive connections busy for seconds, each sending its
    next request as soon as the last answer is in. Returns the latencies (in
    seconds) of the right answers, how many were wrong or never came, and what
    the first of those was."""
    expected = b" 201 " if kind == "POST" else b" 200 "
    selector = selectors.DefaultSelector()
    latencies, errors, number, problem = [], 0, 0, ""
    deadline = time.monotonic() + seconds
    for index in range(connections):
        sock = socket.create_connection(address, timeout=10)
        number += 1
        sock.sendall(_bench_request(kind, f"{prefix}-{index}", number))
        selector.register(sock, selectors.EVENT_READ, [bytearray(), time.perf_counter(), index])
    while selector.get_map():
        for key, _ in selector.select(timeout=10) or [(None, None)]:
            if key is None:  # nothing answered for 10 s: count every connection as failed
                errors += len(selector.get_map())
                problem = problem or "no answer within 10 s"
                for open_key in list(selector.get_map().values()):
                    selector.unregister(open_key.fileobj)
                    open_key.fileobj.close()
                break
            sock, (buffer, sent, index) = key.fileobj, key.data
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            buffer += data
            head_end = buffer.find(b"\r\n\r\n")
            length = 0
            if head_end >= 0:
                head = bytes(buffer[:head_end]).lower()
                length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            if data and (head_end < 0 or len(buffer) < head_end + 4 + length):
                continue  # the answer is not all in yet
            if not data or not buffer.startswith(b"HTTP/1.1") or expected not in buffer[:13]:
                errors += 1
                problem = problem or (bytes(buffer).partition(b"\r")[0][:100].decode("latin-1")
                                      if data else "the connection closed")
            else:
                latencies.append(time.perf_counter() - sent)
            del buffer[:head_end + 4 + length]
            if data and time.monotonic() < deadline:
                number += 1
                key.data[1] = time.perf_counter()
                sock.sendall(_bench_request(kind, f"{prefix}-{index}", number))
            else:
                selector.unregister(sock)
                sock.close()
    return latencies, errors, problem


def _percentile_ms(sorted_seconds: list, fraction: float) -> float:
    if not sorted_seconds:
        return float("nan")
    return sorted_seconds[min(len(sorted_seconds) - 1, int(fraction * len(sorted_seconds)))] * 1000


def serve_filled(users: str, per_user: str) -> None:
    """python3 test_scheduler.py serve-filled USERS PER_USER: a server whose store
    holds that many appointments, for the benchmark to load."""
    store = scheduler.InMemoryStore()
    fill_store(store, int(users), int(per_user))
    fill_store_for(store, READER, 10)
    scheduler.pin_to_one_cpu("auto")  # as python3 scheduler.py does
    server = scheduler.make_server("127.0.0.1", 0, store, log_stream=None)
    print("Listening on", server.url, flush=True)
    server.serve_forever()


def load_process(host: str, port: str, kind: str, connections: str, seconds: str,
                 prefix: str) -> None:
    """python3 test_scheduler.py load ...: generate_load() in a process of its own,
    its latencies and errors printed as JSON."""
    latencies, errors, problem = generate_load((host, int(port)), kind, int(connections),
                                               float(seconds), prefix)
    json.dump({"latencies": latencies, "errors": errors, "problem": problem}, sys.stdout)


def stdlib_load(addresses, kind: str, connections: int, seconds: float) -> LoadResult:
    """Load from two processes running generate_load(), the first to the first
    address, the second to the last: the standard library's stand-in for wrk -t2
    (plain processes, not multiprocessing, which would re-run the unittest command
    line in each child on platforms that spawn)."""
    prefix = f"std{os.getpid()}-{time.monotonic_ns()}"
    processes = [subprocess.Popen(
        [sys.executable, THIS_FILE, "load", host, str(port), kind, str(connections // 2),
         str(seconds), f"{prefix}-{n}"], cwd=HERE, stdout=subprocess.PIPE, text=True)
        for n, (host, port) in enumerate((addresses[0], addresses[-1]))]
    outcomes = [json.loads(process.communicate(timeout=seconds + 60)[0])
                for process in processes]
    latencies = sorted(latency for outcome in outcomes for latency in outcome["latencies"])
    return LoadResult(len(latencies), seconds, _percentile_ms(latencies, 0.5),
                      _percentile_ms(latencies, 0.99),
                      sum(outcome["errors"] for outcome in outcomes),
                      "; ".join(outcome["problem"] for outcome in outcomes if outcome["problem"]))


def _wrk_percentile_ms(histogram: Dict[int, int], fraction: float) -> float:
    """A percentile of wrk's latency histogram (microseconds: requests), as wrk
    reckons its own: the least value that at least that share of requests took."""
    rank, seen = int(fraction * sum(histogram.values())) + 1, 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value / 1000
    return float("nan")


def wrk_load(addresses, kind: str, connections: int, seconds: float) -> LoadResult:
    """wrk -t2 against one server; against several, a wrk each at once, the threads
    and connections shared out among them, their counts and latencies added up."""
    threads, share = max(1, 2 // len(addresses)), connections // len(addresses)
    with contextlib.ExitStack() as stack:
        runs = []
        for host, port in addresses:
            script = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".lua"))
            script.write(WRK_LATENCIES_SCRIPT + (WRK_POST_SCRIPT % f"wrk{os.getpid()}-"
                                                 f"{time.monotonic_ns()}" if kind == "POST"
                                                 else ""))  # new users for each run
            script.flush()
            runs.append(subprocess.Popen(
                ["wrk", f"-t{threads}", f"-c{share}", f"-d{seconds}s", "-s", script.name,
                 f"http://{host}:{port}/appointments?user_id={READER}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = []
        for run in runs:
            output, problem = run.communicate(timeout=seconds + 60)
            if run.returncode:
                raise AssertionError(f"wrk failed: {problem.strip()}")
            outputs.append(output)
    requests, errors, histogram, problems = 0, 0, collections.Counter(), []
    for output in outputs:
        requests += int(re.search(r"(\d+) requests in", output).group(1))
        socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                                  r"timeout (\d+)", output)
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        errors += (sum(map(int, socket_errors.groups())) if socket_errors else 0) + (
            int(non_2xx.group(1)) if non_2xx else 0)
        problems += [found.group(0) for found in (socket_errors, non_2xx) if found]
        for value, count in re.findall(r"^latency (\d+) (\d+)$", output, re.M):
            histogram[int(value)] += int(count)
    return LoadResult(requests, seconds, _wrk_percentile_ms(histogram, 0.5),
                      _wrk_percentile_ms(histogram, 0.99), errors, "; ".join(problems))


def run_load(addresses, kind: str, connections: int, seconds: float) -> LoadResult:
    """Load on the servers at addresses (their (host, port)s: servers of one
    database), the connections shared out among them: wrk where it is installed,
    else the standard library's load generator."""
    load = wrk_load if shutil.which("wrk") else stdlib_load
    return load(addresses, kind, connections, seconds)


def fill_store(store: scheduler.Store, users: int, per_user: int) -> None:
    """Book per_user appointments for each of users users, each a value of its own,
    as bookings over HTTP would make them."""
    for user in range(users):
        fill_store_for(store, f"user-{user:06d}", per_user)


def fill_store_for(store: scheduler.Store, user_id: str, count: int) -> None:
    first = dt.date(2026, 11, 1)
    for offset in range(count):
        day = first + dt.timedelta(days=offset)
        store.book(scheduler.Appointment(
            user_id, dt.datetime(day.year, day.month, day.day, 9, 30, tzinfo=UTC)))


def time_calls(call, count: int) -> tuple:
    """p50 and p99, in microseconds, of count calls of call(i)."""
    timings = []
    for number in range(count):
        started = time.perf_counter()
        call(number)
        timings.append(time.perf_counter() - started)
    timings.sort()
    return _percentile_ms(timings, 0.5) * 1000, _percentile_ms(timings, 0.99) * 1000


@unittest.skipUnless(os.environ.get("SCHEDULER_BENCH"), "the benchmark runs with make bench")
class Benchmark(unittest.TestCase):
    """make bench: throughput and latency under load, then the cost of a booking
    and a listing with a million appointments stored, and memory per appointment."""

    STORED_USERS, PER_USER = 100_000, 10

    @classmethod
    def setUpClass(cls):
        tool = "wrk -t2" if shutil.which("wrk") else "the standard library's load generator " \
                                                      "(2 processes; install wrk for higher load)"
        print(f"\n\nscheduler benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} cores, "
              f"load from {tool}, keep-alive connections to 127.0.0.1", flush=True)

    def start_server_process(self, args: List[str]) -> Tuple[str, int]:
        server = start_process(self, args, keep_log=False)
        return server.host, server.port

    def serve_for_load(self, *options: str, servers: int = 1,
                       script: str = SCRIPT) -> List[Tuple[str, int]]:
        """python3 scheduler.py (or another version's, at script) with these options,
        its listed user given five appointments; servers > 1: as many processes of
        one database, each on a CPU of its own where there are enough."""
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pinned = servers > 1 and len(cpus) >= servers
        addresses = [self.start_server_process(
            [script, "--port", "0", "--max-appointments", str(BENCH_CAPACITY), *options,
             *(("--cpu", str(cpus[n])) if pinned else ())])
            for n in range(servers)]
        conn = http.client.HTTPConnection(*addresses[0], timeout=10)
        for day in range(1, 6):
            self.assertEqual(post_json(conn, {"user_id": READER, "date": f"2026-12-0{day}",
                                              "time": "10:00"}).status, 201)
        conn.close()
        return addresses

    def postgres_servers(self) -> list:
        """The PostgreSQL rows' servers: (options, servers, suffix), each on a database
        of its own, in a cluster of this test's (fsync on, as PostgreSQL's default); none,
        having said why, where PostgreSQL's server is missing."""
        missing = postgres_missing()
        if missing:
            print(f"  (no --db postgresql://... rows: {missing})", flush=True)
            return []
        cluster = PostgresCluster.for_test(self)
        return [(("--db", cluster.uri(database=cluster.create_database(f"bench_{servers}"))),
                 servers, f", PostgreSQL{', 2 servers' if servers > 1 else ''}")
                for servers in (1, 2)]

    def test_1_throughput(self):
        print(f"\nThroughput: python3 scheduler.py (on one CPU, as by default; access log to "
              f"/dev/null), {BENCH_SECONDS} s a row; PostgreSQL in a cluster of the benchmark's "
              f"own\n(fsync on), two servers of one database taking 8 connections each",
              flush=True)
        print(f"  {'request':61} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'errors':>6}")
        rows = [("GET", "GET /appointments?user_id= (5 listed)"),
                ("POST", "POST /appointments (a new user each)")]
        servers = [((), 1, (16, 64), ""),
                   (("--db", temporary_database(self)), 1, (16,), ", --db"),
                   (("--db", temporary_database(self), "--workers", "2"), 1, (16,),
                    ", --db, 2 workers")]
        servers += [(options, count, (16,), suffix)
                    for options, count, suffix in self.postgres_servers()]
        for options, count, connection_counts, suffix in servers:
            addresses = self.serve_for_load(*options, servers=count)
            for kind, label in rows:
                for connections in connection_counts:
                    result = run_load(addresses, kind, connections, BENCH_SECONDS)
                    print(f"  {label + suffix:61} {connections:5} {result.rate:8.0f} "
                          f"{result.p50_ms:7.2f} {result.p99_ms:7.2f} {result.errors:6}",
                          flush=True)
                    self.assertEqual(result.errors, 0, result.problem)

    def test_3_a_user_at_the_limit_polled_by_four_clients(self):
        limit = scheduler.MAX_APPOINTMENTS_PER_USER
        print(f"\nOther users' GETs (16 connections) while 4 clients poll a user holding "
              f"{limit:,} appointments\n(a 256-emoji ID, each with a 500-emoji note), "
              f"{BENCH_SECONDS} s a row", flush=True)
        print(f"  {'the 4 pollers ask for':36} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'polls/s':>8}")
        address, = self.serve_for_load()
        conn = http.client.HTTPConnection(*address, timeout=10)
        first = dt.date(2026, 1, 1)
        for day in range(limit):
            self.assertEqual(post_json(conn, {
                "user_id": BIG_USER, "date": (first + dt.timedelta(days=day)).isoformat(),
                "time": "09:30", "note": BIG_NOTE}).status, 201)
        conn.close()
        for kind, label in ((None, "nothing (no pollers)"), ("BIG", "its listing"),
                            ("FEED", "its feed"), ("RANGE", "its listing, a new to= each")):
            pollers = None if kind is None else subprocess.Popen(
                [sys.executable, THIS_FILE, "load", address[0], str(address[1]), kind, "4",
                 str(BENCH_SECONDS), "poll"], cwd=HERE, stdout=subprocess.PIPE, text=True)
            result = run_load([address], "GET", 16, BENCH_SECONDS)
            polled = {"latencies": [], "errors": 0, "problem": ""} if pollers is None \
                else json.loads(pollers.communicate(timeout=BENCH_SECONDS + 60)[0])
            print(f"  {label:36} {result.rate:8.0f} {result.p50_ms:7.2f} {result.p99_ms:7.2f} "
                  f"{len(polled['latencies']) / BENCH_SECONDS:8.1f}", flush=True)
            self.assertEqual(result.errors + polled["errors"], 0,
                             f"{result.problem} {polled['problem']}")

    def test_2_a_million_appointments(self):
        stored = self.STORED_USERS * self.PER_USER
        print(f"\nMemory per stored appointment (tracemalloc; user IDs included), and a full "
              f"garbage collection, with {stored:,} stored")
        for users, per_user in ((stored, 1), (self.STORED_USERS, self.PER_USER)):
            def filled() -> scheduler.InMemoryStore:
                store = scheduler.InMemoryStore()
                fill_store(store, users, per_user)
                return store

            full, used = traced_bytes(filled)
            per_appointment = used / stored
            self.assertEqual(full.count(), stored)
            started = time.perf_counter()
            gc.collect()
            print(f"  {per_user:2} per user ({users:>9,} users): {per_appointment:4.0f} bytes each; "
                  f"full collection {(time.perf_counter() - started) * 1000:.1f} ms", flush=True)

        print(f"\nCost with no other appointments stored, and with {stored:,} "
              f"(the listed user has 10 either way)")
        print(f"  {'operation':44} {'stored':>9} {'p50':>9} {'p99':>9}")
        for label, store in (("0", scheduler.InMemoryStore()), (f"{stored:,}", full)):
            fill_store_for(store, READER, 10)
            book = time_calls(lambda n: store.book(scheduler.Appointment(
                f"new-{n}", dt.datetime(2026, 11, 25, 9, 30, tzinfo=UTC))), 20_000)
            listing = time_calls(lambda n: store.list_for_user(READER), 20_000)
            print(f"  {'store.book(), in process':44} {label:>9} {book[0]:7.2f}us "
                  f"{book[1]:7.2f}us")
            print(f"  {'store.list_for_user(), in process':44} {label:>9} "
                  f"{listing[0]:7.2f}us {listing[1]:7.2f}us", flush=True)
        del full
        for label, users in (("0", 0), (f"{stored:,}", self.STORED_USERS)):
            address = self.start_server_process(
                [THIS_FILE, "serve-filled", str(users), str(self.PER_USER)])
            for kind in ("POST", "GET"):
                result = run_load([address], kind, 16, 5)
                self.assertEqual(result.errors, 0, result.problem)
                print(f"  {kind + ' over HTTP, 16 connections, 5 s':44} {label:>9} "
                      f"{result.p50_ms:7.2f}ms {result.p99_ms:7.2f}ms", flush=True)


    @unittest.skipUnless(BENCH_BASE, "make bench BASE=<commit> compares with that commit")
    def test_against_a_base_commit(self):
        """make bench BASE=<commit>: that commit's scheduler.py and this one's take
        turns, round after round, so that both meet the same noise; the medians of
        the rounds, and the median of each round's ratio. A round's two runs are
        next to each other in time, so a host whose speed drifts from round to
        round moves both of them, where it would move a ratio of the medians."""
        base = checkout_for_bench(self, BENCH_BASE)
        seconds = int(os.environ.get("SCHEDULER_BENCH_SECONDS", "5"))  # a round's load
        print(f"\nThroughput against {BENCH_BASE} (old) of this tree (new): {BENCH_ROUNDS} "
              f"rounds of {seconds} s a row each, taking turns, 16 connections", flush=True)
        print(f"  {'request':50} {'old req/s':>9} {'new req/s':>9} {'new/old':>7}   rounds")
        rows = [("GET", "GET /appointments?user_id= (5 listed)"),
                ("POST", "POST /appointments (a new user each)")]
        # Both on one CPU: a server is pinned by default to a CPU that its process ID
        # picks, and the two could land on CPUs that other work loads unevenly.
        cpu = ("--cpu", str(min(os.sched_getaffinity(0)))) if hasattr(
            os, "sched_getaffinity") else ()
        for options, suffix in ((lambda: cpu, ""),
                                (lambda: (*cpu, "--db", temporary_database(self)), ", --db")):
            addresses = {version: self.serve_for_load(*options(), script=script)
                         for version, script in (("old", base), ("new", SCRIPT))}
            rates = {(kind, version): [] for kind, _ in rows for version in addresses}
            for round_ in range(BENCH_ROUNDS):
                for kind, _ in rows:
                    for version in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
                        result = run_load(addresses[version], kind, 16, seconds)
                        self.assertEqual(result.errors, 0, result.problem)
                        rates[kind, version].append(result.rate)
            for kind, label in rows:
                old, new = (statistics.median(rates[kind, version]) for version in ("old", "new"))
                ratio = statistics.median(new_rate / old_rate for old_rate, new_rate in zip(
                    rates[kind, "old"], rates[kind, "new"]))
                print(f"  {label + suffix:50} {old:9.0f} {new:9.0f} {ratio:7.2f}   old "
                      + " ".join(f"{rate:.0f}" for rate in rates[kind, "old"]) + "; new "
                      + " ".join(f"{rate:.0f}" for rate in rates[kind, "new"]), flush=True)


def checkout_for_bench(testcase: unittest.TestCase, commit: str) -> str:
    """The path of scheduler.py as of commit, in a temporary git worktree outside
    this one, removed when the test ends."""
    directory = tempfile.mkdtemp(prefix="scheduler-bench-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", "--quiet", directory,
                    commit], check=True)
    testcase.addCleanup(subprocess.run, ["git", "-C", HERE, "worktree", "remove", "--force",
                                         directory], check=True)
    return os.path.join(directory, "scheduler.py")


# --- Running the suite over several processes (make test) ------------------------------


def run_one(name: str) -> Tuple[str, str, str, float]:
    """Run one test (by its ID) in this process: (its ID, "ok", "skipped" or
    "FAIL", what unittest reported of its failures, the seconds it took)."""
    started = time.perf_counter()
    report = io.StringIO()
    # Made from its parts, not by loadTestsFromName(), which first tries to import
    # the whole ID as a module and then each shorter prefix of it: a good part of a
    # short test's time went to those failed imports.
    module, case, method = name.rsplit(".", 2)
    one = getattr(importlib.import_module(module), case)(method)
    result = unittest.TextTestRunner(stream=report, verbosity=0).run(unittest.TestSuite([one]))
    outcome = ("FAIL" if not result.wasSuccessful() else "skipped" if result.skipped else "ok")
    failures = "".join(f"{'=' * 70}\n{kind}: {test}\n{'-' * 70}\n{text}\n"
                       for kind, problems in (("FAIL", result.failures), ("ERROR", result.errors))
                       for test, text in problems)
    return name, outcome, failures, time.perf_counter() - started


# What each test took in the last run of this checkout's suite (make test), by its ID.
DURATIONS = os.path.join(TEMPLATES, f"scheduler-test-durations-{os.geteuid()}-"
                                    f"{hashlib.sha256(HERE.encode()).hexdigest()[:12]}.json")


def share_out(tests: List[unittest.TestCase]) -> List[str]:
    """The IDs of the tests in the order that the pool takes them: the longest first,
    by what they took in the last run (DURATIONS), so that the processes end
    together rather than one of them finishing a long test alone. A test not in the
    last run goes first (it may be long); without a last run, the layers that start
    processes go first, being the last in the file."""
    try:
        with open(DURATIONS) as file:
            durations = json.load(file)
    except (OSError, ValueError):
        durations = {}

    def line(test: unittest.TestCase) -> int:
        return inspect.unwrap(getattr(test, test._testMethodName)).__code__.co_firstlineno

    return [test.id() for test in sorted(
        tests, key=lambda test: (-durations.get(test.id(), float("inf")), -line(test)))]


def keep_durations(durations: Dict[str, float]) -> None:
    """Write DURATIONS anew (whole, or not at all: another run may be reading it)."""
    with contextlib.suppress(OSError):
        with tempfile.NamedTemporaryFile("w", dir=TEMPLATES, delete=False) as file:
            json.dump(durations, file)
        os.replace(file.name, DURATIONS)


MEMORY = "/dev/shm"  # a tmpfs on Linux
MEMORY_NEEDED = 1 << 30  # bytes free there: the clusters, their standbys, the SQLite files


def memory_folder() -> Optional[str]:
    """A new folder in memory (MEMORY) for a run's temporary files, where there is
    one with room: creating and writing files on a disk's file system cost the suite
    more CPU time than anything else it does, and no test needs a disk (the faults
    are those of processes: a SIGKILL loses nothing the kernel was given). As root,
    only where chattr +i works there, as make_read_only() needs. None where there is
    no such folder, or where TMPDIR names the user's own choice."""
    if "TMPDIR" in os.environ or not os.path.isdir(MEMORY):
        return None
    try:
        space = os.statvfs(MEMORY)
        if space.f_bavail * space.f_frsize < MEMORY_NEEDED:
            return None
        folder = tempfile.mkdtemp(prefix="scheduler-tests-", dir=MEMORY)
    except OSError:
        return None
    os.chmod(folder, 0o711)  # the postgres user reaches the clusters' folders inside
    if os.geteuid() == 0:
        probe = os.path.join(folder, "probe")
        open(probe, "w").close()
        try:
            immutable = subprocess.run(["chattr", "+i", probe], capture_output=True).returncode
            subprocess.run(["chattr", "-i", probe], capture_output=True)
        except OSError:
            immutable = 1
        if immutable:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        os.remove(probe)
    return folder


def remove_memory_folder(folder: str, watchdog: subprocess.Popen) -> None:
    """Remove a run's folder once its test processes have ended, with the clusters
    still in it (their watchdogs may be on their way: either removes them), as its
    own watchdog would have had this process ended first."""
    remove_clusters(folder)
    watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(10)


def compile_service() -> Optional[str]:
    """Write scheduler.py's bytecode to its cache (its __pycache__), for the processes
    that the tests start (SERVICE), whatever PYTHONDONTWRITEBYTECODE says; the path
    of the file if it is new, for the run to remove at its end, else None."""
    cached = importlib.util.cache_from_source(SCRIPT)
    new = not os.path.exists(cached)
    try:
        py_compile.compile(SCRIPT, doraise=True)
    except (OSError, py_compile.PyCompileError):  # each start compiles it, as before
        return None
    return cached if new else None


def run_in_parallel(jobs: str) -> None:
    """make test: the suite in a pool of jobs processes, each taking the next test
    as it finishes one (most of the time goes to tests that start processes and
    wait for them, which the others overlap), in the order of share_out(), its
    temporary files in memory where it can (memory_folder()), the service compiled
    once (compile_service()). Prints as unittest's runner does by default: a
    character a test (. ok, s skipped, F failed), then the failures and a summary;
    exits 1 if any. python3 -m unittest runs the same tests in one process.

    make test calls it on the module imported (import test_scheduler), rather than
    running this file (python3 test_scheduler.py parallel 4), which compiles the
    file twice: as __main__, and as the module whose tests the pool runs (its tests
    have IDs by that name)."""
    # The module that the pool's tests are loaded from, not __main__ where this file
    # is run: each has its own PostgresCluster class, and so its own clusters.
    tests = importlib.import_module("test_scheduler")
    names = share_out(list(iterate_tests(unittest.defaultTestLoader.loadTestsFromModule(tests))))
    started, failures, durations, skipped = time.perf_counter(), [], {}, 0
    folder = memory_folder()
    if folder:  # for the pool's processes, and the programs that the tests start
        os.environ["TMPDIR"] = tempfile.tempdir = folder
        watchdog = start_watchdog(folder)
        tests.WATCHED.append(folder)
    compiled = compile_service()
    if tls_missing() is None:  # made once here, for the pool's processes to inherit
        tests.certificate_files()
    try:
        with multiprocessing.Pool(int(jobs), tests.PostgresCluster.start_shared_early) as pool:
            for name, outcome, failed, seconds in pool.imap_unordered(run_one, names):
                print({"ok": ".", "skipped": "s"}.get(outcome, "F"), end="", flush=True)
                skipped += outcome == "skipped"
                durations[name] = seconds
                if failed:
                    failures.append(failed)
    finally:
        if folder:
            remove_memory_folder(folder, watchdog)
        if compiled:
            with contextlib.suppress(OSError):
                os.remove(compiled)
                os.rmdir(os.path.dirname(compiled))  # if it holds nothing else
    keep_durations(durations)
    print("\n" + "".join(failures), end="")
    print(f"Ran {len(names)} tests in {jobs} processes in {time.perf_counter() - started:.1f} s: "
          + (f"FAILED ({len(failures)} tests)" if failures else "OK")
          + (f" (skipped={skipped})" if skipped else ""))
    sys.exit(1 if failures else 0)


def iterate_tests(suite: unittest.TestSuite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from iterate_tests(test)
        else:
            yield test


# Commands run in processes of their own: python3 test_scheduler.py NAME ...
COMMANDS = {"serve-filled": serve_filled, "load": load_process, "parallel": run_in_parallel}


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in COMMANDS:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    else:
        unittest.main()
