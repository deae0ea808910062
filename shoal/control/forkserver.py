"""Instances forked from one pre-imported process, so they start without their imports.

``shoal up`` on the shop starts nine Python processes at once; each spent ~0.3 s of CPU
importing the same modules before serving, so on two cores the fleet was ready seconds
after one instance alone would be. ``ForkServer`` runs ``python -m
shoal.control.forkserver`` once: it imports ``shoal.instance`` (the SDK, bus, Store,
mesh, uvloop, Starlette, uvicorn) and forks each instance from there, which then only
starts (``shoal.instance.main`` with the instance's argv, environment and
directory). The server starts no thread and no event loop, so forking it is safe.

**Preloading** (as ``gunicorn --preload``): the supervisor's first request names the
modules every instance's start imports (its Store and broker adapters, the mesh's TLS
under mTLS: ``startup_modules``) and the apps' own modules; the server
imports them once, so a fork costs milliseconds and eight instances do not each import the
same code at once. An app module that fails to import is left to its instances (which
report the error as usual). An app whose import starts a thread would make forking unsafe
(a lock held by that thread stays held in every child), and one whose import leaves a
file descriptor open (a database connection, a log file) would hand the same one to
every instance: the server then says so and exits, and ``ForkServer`` starts a new one
without the apps. ``shoal up`` starts the server
before it parses its command line, imports the plane and validates the manifest, so the
two warm up in parallel; it does so by forking itself (``launch(fork=True)``: no thread
and no event loop exist yet), so the server keeps what the CLI imported (the bus, the
Store, metrics: ~0.3 s of CPU not spent twice).

Protocol, over a Unix socket pair (the server's end is its fd 3): the server says
``{"ready": pid}``; the supervisor sends ``{"preload": {"modules": [...], "apps": [...]}}``
(answered ``{"preloaded": [...], "failed": {module: error}}``, or ``{"unsafe": reason}``
before the server exits), then one JSON request ``{"argv", "env", "cwd"}`` per instance
with the write end of the instance's output pipe attached (``SCM_RIGHTS``); the server
answers ``{"pid"}`` (or ``{"error"}``) and later ``{"exit": pid, "status": code}``
(``-N``: killed by signal N, as ``subprocess`` says). Only the server can reap its
children, so their exit status comes from it; the supervisor sees the exit itself
through a pidfd (``os.pidfd_open``), so a server killed with -9 cannot hide one, and it
signals children by pid.

Lifetimes: the server gets SIGTERM when the supervisor's process dies (``PR_SET_PDEATHSIG``)
and each child when the server dies, so no orphan is left; a child runs in its own
session (Ctrl-C in the terminal reaches ``shoal up`` alone), with default signal
handlers, and reseeds every module-level ``random.Random`` it inherited.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import importlib
import json
import logging
import os
import random
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.control.timeline import mark

SERVER_FD = 3
MAX_MESSAGE = 1 << 20
EXIT_UNSAFE = 3  # the server's exit status after an app's import made forking unsafe

log = logging.getLogger("shoal.control")

MODULES_AT_FORK: frozenset[str] | None = None
"""In a forked instance: the modules the server had imported when it forked (None
elsewhere). What an instance imports itself is ``set(sys.modules) - MODULES_AT_FORK``."""

_preloaded_apps: set[str] = set()  # in the server: modules imported by preloading apps

STARTUP_MODULES = (
    "shoal.instance", "uvloop", "uvicorn", "uvicorn.config", "uvicorn.server",
    "uvicorn.lifespan.off", "uvicorn.logging", "uvicorn.protocols.websockets.auto",
    "logging.config", "shoal.mesh.security.asgi_server", "shoal.mesh.tls_reads",
    "shoal.observability.http",
)
"""What every instance's start imports (the server imports them before it says it is
ready; a test checks that a forked instance imports nothing else of its own)."""
ADAPTERS = ("memory", "sqlite", "nats", "redis")


def startup_modules(broker: str, store: str, mtls: str) -> list[str]:
    """What an instance with this broker, Store and mTLS mode imports as it starts, beyond
    ``STARTUP_MODULES``: its two adapters, and the mesh's TLS unless mTLS is off."""
    modules = []
    for url, package in ((store, "shoal.store"), (broker, "shoal.events.brokers")):
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme in ADAPTERS:
            modules.append(f"{package}.{scheme}")
    if mtls in ("strict", "permissive"):  # the backend: loaded by the first key made
        modules += ["shoal.mesh.security.identity", "shoal.mesh.security.tls",
                    "cryptography.hazmat.backends.openssl"]
    return modules


@dataclass(frozen=True, slots=True)
class Preload:
    """What the server imports before its first fork: modules every instance's start
    needs, then the apps' modules (``module`` of ``module:attribute``)."""

    modules: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        """The request's body."""
        return {"modules": list(self.modules), "apps": list(self.apps)}


def instance_environment(base_dir: Path | str, environ: Mapping[str, str] | None = None
                         ) -> dict[str, str]:
    """The environment instances of an application in ``base_dir`` run in (and the fork
    server): ``base_dir`` first on PYTHONPATH, unbuffered output."""
    environ = os.environ if environ is None else environ
    here = str(Path(base_dir).resolve())
    rest = environ.get("PYTHONPATH")
    return {**environ, "PYTHONPATH": here if not rest else f"{here}{os.pathsep}{rest}",
            "PYTHONUNBUFFERED": "1"}


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One request (a JSON line) and the descriptors that came with it; (None, []) at EOF."""
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        chunk, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(
            4 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not chunk:
            return None, list(fds)
        data += chunk
        if len(data) > MAX_MESSAGE:  # skip to the end of this line, then refuse it
            while chunk and not chunk.endswith(b"\n"):
                chunk = sock.recv(MAX_MESSAGE)
            for fd in fds:
                os.close(fd)
            raise ValueError(f"request over {MAX_MESSAGE} bytes")
    try:
        return json.loads(data), list(fds)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(json.dumps(message).encode() + b"\n")


def _status(wait_status: int) -> int:
    return -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else \
        os.waitstatus_to_exitcode(wait_status)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (even by kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _reseed() -> None:
    """Every inherited module-level ``random.Random`` of Shoal and of the preloaded apps
    gets a fresh seed."""
    random.seed()
    for name, module in list(sys.modules.items()):
        if name == "shoal" or name.startswith("shoal.") or name in _preloaded_apps:
            for value in list(vars(module).values()):
                if isinstance(value, random.Random):
                    value.seed()


def _child(request: dict[str, Any], output: int, server: socket.socket,
           inherited: tuple[int, ...]) -> None:
    """In the forked child: become the instance, then exit with its status."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        server.close()
        for fd in inherited:  # the server's own descriptors
            os.close(fd)
        os.setsid()
        _die_with_parent()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(null)
        os.close(output)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _reseed()
        global MODULES_AT_FORK
        MODULES_AT_FORK = frozenset(sys.modules)
        from shoal.instance import main

        mark(f"instance: forked ({request['argv'][1] if len(request['argv']) > 1 else '?'})")

        code = main(list(request["argv"]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _open_fds() -> set[str]:
    """This process's open file descriptors (empty where /proc does not say)."""
    try:
        return set(os.listdir("/proc/self/fd"))
    except OSError:
        return set()


def _threads() -> int:
    """Threads of this process (native ones included, where /proc says)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def preload(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Import ``spec``'s modules, then its apps; the answer to a preload request."""
    for kind in ("modules", "apps"):
        names = spec.get(kind, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            return {"error": f"bad request: preload.{kind}: expected a list of module names"}
    done: list[str] = []
    failed: dict[str, str] = {}
    threads = _threads()
    for kind in ("modules", "apps"):
        for name in spec.get(kind, []):
            before, fds = set(sys.modules), _open_fds()
            try:
                importlib.import_module(name)
            except BaseException as e:  # the instance will say it again
                failed[name] = f"{type(e).__name__}: {e}"[:500]
                continue
            if kind == "apps":
                _preloaded_apps.update(set(sys.modules) - before)
                kept = len(_open_fds() - fds)
                if kept:
                    return {"unsafe": f"importing {name} left {kept} file descriptor(s) open "
                                      "(a connection or file every instance would share)"}
            if _threads() > threads:
                return {"unsafe": f"importing {name} started a thread: forking after that "
                                  "is unsafe"}
            done.append(name)
    return {"preloaded": done, "failed": failed}


def serve(server: socket.socket) -> None:
    """Fork an instance per request until the supervisor hangs up; report every exit."""
    children: set[int] = set()
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us, not Ctrl-C
    _send(server, {"ready": os.getpid()})
    while not stopping:
        readable, _, _ = select.select([server, wakeup_r], [], [])
        if wakeup_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup_r, 4096)
        while children:  # reap every child that exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            _send(server, {"exit": pid, "status": _status(status)})
        if server in readable:
            try:
                request, fds = _recv(server)
            except (OSError, ValueError) as e:
                _send(server, {"error": f"bad request: {e}"})
                continue
            if request is None:
                break  # the supervisor hung up
            if "preload" in request:
                for fd in fds:
                    os.close(fd)
                answer = preload(request["preload"]) if isinstance(
                    request["preload"], dict) else {"error": "bad request: preload: expected "
                                                             "an object"}
                _send(server, answer)
                if "unsafe" in answer:
                    sys.exit(EXIT_UNSAFE)
                continue
            if len(fds) != 1 or not isinstance(request.get("argv"), list):
                for fd in fds:
                    os.close(fd)
                _send(server, {"error": "bad request: expected argv and one output fd"})
                continue
            pid = os.fork()
            if pid == 0:
                _child(request, fds[0], server, (wakeup_r, wakeup_w))
            os.close(fds[0])
            children.add(pid)
            _send(server, {"pid": pid})
    for pid in children:  # the supervisor is gone: so are its instances
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


class ForkedProcess:
    """An instance forked by the server: the parts of ``asyncio.subprocess.Process`` the
    supervisor uses (``pid``, ``stdout``, ``returncode``, ``wait``, ``send_signal``,
    ``kill``)."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader, server: ForkServer) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._server = server
        self._exited = asyncio.get_running_loop().create_future()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (OSError, AttributeError):  # gone already, or no pidfd: the server's word
            self._pidfd = None
        else:
            asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        assert self._pidfd is not None
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if not self._exited.done():
            self._exited.set_result(None)

    def _reported(self, status: int) -> None:
        self._server._statuses[self.pid] = status
        if self._pidfd is None and not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> int:
        """The exit status, once the process is gone."""
        if self.returncode is None:
            await asyncio.shield(self._exited)
            status = self._server._statuses.pop(self.pid, None)
            if status is None:  # the server has not said yet (or is gone)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        while status is None and self._server.alive:
                            await self._server._said.wait()
                            status = self._server._statuses.pop(self.pid, None)
            self.returncode = status if status is not None else -signal.SIGKILL
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the process (``ProcessLookupError`` once it is gone)."""
        if self.returncode is not None or self._exited.done():
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The supervisor's side: start the server once, then ``spawn`` instances from it."""

    def __init__(self, env: Mapping[str, str], cwd: str | None,
                 preload: Preload | None = None, *, preload_later: bool = False) -> None:
        """``preload``: what the server imports before its first fork; ``preload_later``:
        it is given later with ``preload()`` (the server is launched before it is known)."""
        self._env = dict(env)
        self._cwd = cwd
        self._process: subprocess.Popen[bytes] | _Child | None = None
        self._sock: socket.socket | None = None  # ours, once the server is launched
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._starting: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one request and its answer at a time
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._procs: dict[int, ForkedProcess] = {}
        self._statuses: dict[int, int] = {}
        self._said = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._preload = preload or Preload()
        self._preload_given = asyncio.Event()
        if not preload_later:
            self._preload_given.set()
        self.alive = False
        self.preloaded: list[str] = []  # what the serving server imported for its forks
        self.failed: dict[str, str] = {}  # preloads that did not import: module -> error
        self.unsafe: str | None = None  # why the apps are not preloaded, if they were unsafe

    def matches(self, env: Mapping[str, str], cwd: str | None) -> bool:
        """Whether this server forks instances into ``env`` and ``cwd``'s ``sys.path``."""
        return self._env == dict(env) and self._cwd == cwd

    def preload(self, spec: Preload) -> None:
        """What to import before the first fork (for a server made with ``preload_later``)."""
        self._preload = spec
        self._preload_given.set()

    def launch(self, *, fork: bool = False) -> None:
        """Start the server's process now (no event loop needed): its imports run in
        parallel with the caller's. ``fork``: fork this process rather than start a new
        interpreter, so the server inherits what is already imported (only before any
        thread or event loop exists: ``shoal up`` before it parses; else not)."""
        if self._process is not None:
            return
        mark("fork server launched")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if fork and _threads() == 1:
                self._process = _fork_server(theirs, ours, self._env, self._cwd)
            else:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "shoal.control.forkserver"],
                    stdin=subprocess.DEVNULL, env=self._env, cwd=self._cwd,
                    pass_fds=(theirs.fileno(), SERVER_FD),
                    preexec_fn=lambda: _hand_over(theirs.fileno()))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours

    def start(self) -> None:
        """Launch the server if needed and begin talking to it in the background."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())

    async def ready(self) -> bool:
        """Start the server if needed and wait until it serves; False if it cannot."""
        self.start()
        assert self._starting is not None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._starting)
        return self.alive

    async def _start(self) -> None:
        without_apps = False
        while True:
            self.launch()
            assert self._sock is not None
            self._sock.setblocking(False)
            self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
            hello = json.loads(await self._reader.readline() or b"{}")
            if "ready" not in hello:
                raise OSError("the fork server did not start")
            await self._preload_given.wait()
            spec = self._preload
            if without_apps:
                spec = Preload(spec.modules)
            if not spec.modules and not spec.apps:
                break
            self._writer.write(json.dumps({"preload": spec.as_json()}).encode() + b"\n")
            await self._writer.drain()
            answer = json.loads(await self._reader.readline() or b"{}")
            if "unsafe" in answer and not without_apps:
                self.unsafe = str(answer["unsafe"])
                log.warning("fork server: %s; instances import their apps themselves",
                            self.unsafe)
                await self._end_server()
                without_apps = True
                continue
            if "preloaded" not in answer:
                raise OSError(f"the fork server could not preload: {answer}")
            self.preloaded, self.failed = list(answer["preloaded"]), dict(answer["failed"])
            break
        self.alive = True
        mark("plane: fork server up")
        self._pump = asyncio.get_running_loop().create_task(self._read_messages())

    async def _end_server(self) -> None:
        """Hang up on a server that exits by itself (after an unsafe preload), reap it; the
        next ``launch`` starts another."""
        if self._writer is not None:
            self._writer.close()
        process, self._process, self._sock = self._process, None, None
        if process is not None and not await _exited(process, 5.0):
            process.kill()
            await _exited(process, 5.0)

    async def _read_messages(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "exit" in message:
                    proc = self._procs.pop(message["exit"], None)
                    self._statuses[message["exit"]] = message["status"]
                    if proc is not None:
                        proc._reported(message["status"])
                    self._said.set()
                    self._said.clear()
                else:
                    await self._answers.put(message)
        finally:
            self.alive = False
            self._said.set()
            await self._answers.put({"error": "the fork server exited"})

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None
                    ) -> ForkedProcess:
        """Fork ``python -m shoal.instance *argv`` in ``env`` and ``cwd``; OSError if the
        server cannot (the caller then starts the instance the usual way)."""
        if not await self.ready() or self._sock is None or self._writer is None:
            raise OSError("the fork server is not running")
        read_end, write_end = os.pipe()
        try:
            async with self._lock:
                request = json.dumps({"argv": list(argv), "env": dict(env),
                                      "cwd": cwd or os.getcwd()}).encode() + b"\n"
                # A small message on an idle socket: the kernel takes it whole at once.
                self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                array.array("i", [write_end]))])
                answer = await self._answers.get()
        finally:
            os.close(write_end)
        if "pid" not in answer:
            os.close(read_end)
            raise OSError(f"fork server: {answer.get('error', answer)}")
        loop = asyncio.get_running_loop()
        stdout = asyncio.StreamReader(limit=2**16, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout),
                                     os.fdopen(read_end, "rb", buffering=0))
        proc = ForkedProcess(answer["pid"], stdout, self)
        self._procs[proc.pid] = proc
        if proc.pid in self._statuses:  # it died before we looked
            proc._reported(self._statuses[proc.pid])
        return proc

    async def close(self) -> None:
        """Stop the server (after the instances: it SIGTERMs whatever still runs)."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting  # so that a server spawned meanwhile is seen below
        if self._writer is not None:
            self._writer.close()
        elif self._sock is not None:  # launched, never talked to
            self._sock.close()
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            if not await _exited(self._process, 5.0):
                self._process.kill()
                await _exited(self._process, 5.0)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump


async def _exited(process: subprocess.Popen[bytes] | _Child, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``process`` to exit (it is then reaped)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while process.poll() is None:
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _hand_over(fd: int) -> None:  # pragma: no cover - runs in the server before exec
    """The server's socket becomes its fd 3; it dies with the supervisor."""
    os.dup2(fd, SERVER_FD)
    os.set_inheritable(SERVER_FD, True)
    _die_with_parent()


class _Child:
    """A server forked from this process: what ``ForkServer`` uses of ``Popen``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the child is gone (reaped), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone, status unknown
                pid, status = self.pid, 0
            if pid:
                self.returncode = _status(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the child, unless it was reaped."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


def _fork_server(theirs: socket.socket, ours: socket.socket, env: Mapping[str, str],
                 cwd: str | None) -> _Child:
    """Fork this process into a fork server serving on ``theirs``: as ``python -m
    shoal.control.forkserver`` started with ``env`` in ``cwd`` would, but with what this
    process imported already imported (``cwd`` first on ``sys.path``, as ``-m`` puts it)."""
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid:
        return _Child(pid)
    code = 1
    try:  # the child: never returns into the caller's code
        ours.close()
        os.dup2(theirs.fileno(), SERVER_FD)
        os.closerange(SERVER_FD + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.setsid()  # Ctrl-C in the terminal reaches `shoal up` alone, as with a new process
        _die_with_parent()
        if os.getppid() != parent:  # it died before we asked to follow it
            os._exit(1)
        if cwd is not None:
            os.chdir(cwd)
            sys.path[0] = cwd
        os.environ.clear()
        os.environ.update(env)
        _become_server()
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def main() -> None:
    """``python -m shoal.control.forkserver``: import what instances need, then serve."""
    # run as __main__: the same module object under its own name (MODULES_AT_FORK is read
    # there), not a second copy
    sys.modules.setdefault("shoal.control.forkserver", sys.modules[__name__])
    _become_server()


def _become_server() -> None:
    """Import what every instance's start imports, then serve on fd ``SERVER_FD``."""
    mark("forkserver: started")
    for name in STARTUP_MODULES:  # the point: imported once, for every fork
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from shoal.instance import build_parser

    build_parser().parse_args(["--app", "m:a"])  # argparse's regular expressions, compiled
    mark("forkserver: imports done")
    serve(socket.socket(fileno=SERVER_FD))


if __name__ == "__main__":
    main()
