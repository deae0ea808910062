"""Instances forked from one pre-imported process, so they start without their imports.

``shoal up`` on the shop starts nine Python processes at once; each spent ~0.3 s of CPU
importing the same modules before serving, so on two cores the fleet was ready seconds
after one instance alone would be. ``ForkServer`` runs ``python -m
shoal.control.forkserver`` once: it imports ``shoal.instance`` (the SDK, bus, Store,
mesh, uvloop, Starlette) and forks each instance from there, which then only imports its
app and starts (``shoal.instance.main`` with the instance's argv, environment and
directory). The server starts no thread and no event loop, so forking it is safe.

Protocol, over a Unix socket pair (the server's end is its fd 3): the supervisor sends
one JSON request ``{"argv", "env", "cwd"}`` per instance with the write end of the
instance's output pipe attached (``SCM_RIGHTS``); the server answers ``{"pid"}`` (or
``{"error"}``) and later ``{"exit": pid, "status": code}`` (``-N``: killed by signal N,
as ``subprocess`` says). Only the server can reap its children, so their exit status
comes from it; the supervisor sees the exit itself through a pidfd (``os.pidfd_open``),
so a server killed with -9 cannot hide one, and it signals children by pid.

Lifetimes: the server gets SIGTERM when the supervisor's process dies (``PR_SET_PDEATHSIG``)
and each child when the server dies, so no orphan is left; a child runs in its own
session (Ctrl-C in the terminal reaches ``shoal up`` alone), with default signal
handlers, and reseeds every module-level ``random.Random`` it inherited.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.control.timeline import mark

SERVER_FD = 3
MAX_MESSAGE = 1 << 20


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
    """Every inherited module-level ``random.Random`` of Shoal gets a fresh seed."""
    random.seed()
    for name, module in list(sys.modules.items()):
        if name == "shoal" or name.startswith("shoal."):
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

    def __init__(self, env: Mapping[str, str], cwd: str | None) -> None:
        self._env = dict(env)
        self._cwd = cwd
        self._process: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._starting: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one request and its answer at a time
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._procs: dict[int, ForkedProcess] = {}
        self._statuses: dict[int, int] = {}
        self._said = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self.alive = False

    def start(self) -> None:
        """Begin starting the server (its imports) in the background."""
        if self._starting is None:
            mark("plane: fork server asked for")
            self._starting = asyncio.get_running_loop().create_task(self._start())

    async def ready(self) -> bool:
        """Start the server if needed and wait until it serves; False if it cannot."""
        self.start()
        assert self._starting is not None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._starting)
        return self.alive

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shoal.control.forkserver", stdin=subprocess.DEVNULL,
                env=self._env, cwd=self._cwd, pass_fds=(theirs.fileno(), SERVER_FD),
                preexec_fn=lambda: _hand_over(theirs.fileno()))
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        hello = json.loads(await self._reader.readline() or b"{}")
        if "ready" not in hello:
            raise OSError("the fork server did not start")
        self.alive = True
        mark("plane: fork server up")
        self._pump = asyncio.get_running_loop().create_task(self._read_messages())

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
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._process.wait()
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump


def _hand_over(fd: int) -> None:  # pragma: no cover - runs in the server before exec
    """The server's socket becomes its fd 3; it dies with the supervisor."""
    os.dup2(fd, SERVER_FD)
    os.set_inheritable(SERVER_FD, True)
    _die_with_parent()


def main() -> None:
    """``python -m shoal.control.forkserver``: import what instances need, then serve."""
    mark("forkserver: started")
    import shoal.instance  # noqa: F401 - the point: imported once, inherited by every fork

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

    mark("forkserver: imports done")
    serve(socket.socket(fileno=SERVER_FD))


if __name__ == "__main__":
    main()
