"""The supervisor: runs each service instance as its own process, restarts what dies.

``Supervisor(launch)`` spawns ``launch(service, instance_id, port)`` (an argv; by default
``python -m shoal.instance ...``) on a free loopback port, reads its output (stderr merged
into stdout) line by line into a ring buffer of the last ``OUTPUT_LINES`` lines, and
forwards each line to the terminal prefixed with the instance id. The JSON line
``{"event": "ready", ...}`` marks the instance ready. An exit nobody asked for goes to the
instance's ``InstanceLife`` (``shoal.control.restart``): restart after a backoff, or
FAILED with its last lines when it crash loops. ``stop`` sends SIGTERM (the instance
drains: finishes in-flight work, commits offsets, deregisters) and SIGKILL after
``grace`` seconds.

With a ``ForkServer`` (``shoal.control.forkserver``, what ``shoal up`` uses), instances
whose argv is ``python -m shoal.instance ...`` are forked from one pre-imported process
instead, the rest being the same.

Instance ids are ``<service>-<n>``; a restarted instance keeps its id (the registry lets
the newest registration of an id win); scaling down stops the highest ``n`` first.
Children get their own session, so a Ctrl-C in the terminal reaches ``shoal up`` alone,
which then stops them in order; on Linux each child also gets SIGTERM (and drains) if the
supervisor dies, even by kill -9, so no orphaned fleet is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.control.forkserver import ForkedProcess, ForkServer
from shoal.control.restart import ExitVerdict, InstanceLife, LifeState, RestartPolicy
from shoal.control.timeline import mark
from shoal.errors import ConfigError, ShoalError

log = logging.getLogger("shoal.control")

OUTPUT_LINES = 40
MAX_LINE = 8192  # longer output lines are cut (a runaway print must not eat memory)

Launch = Callable[[str, str, int], Sequence[str]]
Output = Callable[[str], None]
Listener = Callable[["SupervisedInstance", str], None]
ExitHook = Callable[["SupervisedInstance", int], Awaitable[None]]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM this child when the supervisor dies, even by kill -9 (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _print_line(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


@dataclass(slots=True)
class SupervisedInstance:
    """One instance slot: its current process, its restart bookkeeping, its last output."""

    service: str
    id: str
    life: InstanceLife
    port: int = 0
    host: str = "127.0.0.1"
    process: asyncio.subprocess.Process | ForkedProcess | None = None
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))
    ready_info: dict[str, Any] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exits: int = 0
    task: asyncio.Task[None] | None = None
    wanted: bool = True  # False once asked to stop for good

    @property
    def address(self) -> str:
        """``host:port`` the instance listens on."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running process's id, if one runs."""
        p = self.process
        return p.pid if p is not None and p.returncode is None else None

    def describe(self) -> dict[str, Any]:
        """A JSON-able view (the admin API's)."""
        return {"id": self.id, "service": self.service, "address": self.address,
                "pid": self.pid, "process": self.life.state.value,
                "restarts": self.life.restarts, "reason": self.life.reason,
                "last_output": list(self.output)[-10:]}


class Supervisor:
    """Starts, restarts, scales and stops instance processes."""

    def __init__(self, launch: Launch, *, policy: RestartPolicy | None = None,
                 output: Output | None = _print_line, grace: float = 10.0,
                 host: str = "127.0.0.1", env: Mapping[str, str] | None = None,
                 cwd: str | None = None,
                 env_for: Callable[[str], Mapping[str, str]] | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 forkserver: ForkServer | None = None) -> None:
        self.launch = launch
        self.policy = policy if policy is not None else RestartPolicy()
        self.output = output
        self.grace = grace
        self.host = host
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.env_for = env_for  # a service's own environment, over ``env``
        self.instances: dict[str, SupervisedInstance] = {}
        self.listeners: list[Listener] = []  # called on every life change (id, what)
        self.exit_hooks: list[ExitHook] = []  # awaited with the pid after an unasked exit
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._closing = False
        self.forkserver = forkserver  # forks ``python -m shoal.instance`` argvs, if given

    # -- reading ---------------------------------------------------------------------------
    def of(self, service: str) -> list[SupervisedInstance]:
        """The wanted instances of ``service``, by number."""
        return sorted((i for i in self.instances.values() if i.service == service and i.wanted),
                      key=lambda i: _number(i.id))

    def replicas(self, service: str) -> int:
        """How many instances of ``service`` are wanted."""
        return len(self.of(service))

    # -- changing ----------------------------------------------------------------------------
    async def scale(self, service: str, replicas: int) -> list[SupervisedInstance]:
        """Start or stop instances until ``replicas`` are wanted; returns those started."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ConfigError(f"scale {service}: replicas must be an integer >= 0, "
                              f"got {replicas!r}")
        if self._closing:
            raise ShoalError("supervisor: shutting down")
        current = self.of(service)
        started: list[SupervisedInstance] = []
        if replicas > len(current):
            taken = {_number(i.id) for i in self.instances.values() if i.service == service}
            n = 1
            while len(current) + len(started) < replicas:
                while n in taken:
                    n += 1
                taken.add(n)
                started.append(self._start(service, f"{service}-{n}"))
        elif replicas < len(current):
            extra = current[replicas:]
            await asyncio.gather(*(self.stop(i) for i in reversed(extra)))
        return started

    def _start(self, service: str, instance_id: str) -> SupervisedInstance:
        old = self.instances.get(instance_id)
        if old is not None and old.task is not None and not old.task.done():
            raise ShoalError(f"supervisor: instance {instance_id} is still running")
        inst = SupervisedInstance(service, instance_id, InstanceLife(self.policy, self._rng),
                                  host=self.host)
        self.instances[instance_id] = inst
        inst.task = asyncio.get_running_loop().create_task(
            self._keep_running(inst), name=f"shoal-supervisor {instance_id}")
        return inst

    async def stop(self, inst: SupervisedInstance) -> None:
        """Stop one instance for good: SIGTERM, then SIGKILL after the grace period."""
        inst.wanted = False
        inst.life.on_stop_requested()
        self._notify(inst, "stopping")
        await self._terminate(inst)
        if inst.task is not None:
            inst.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inst.task
        if self.instances.get(inst.id) is inst:
            del self.instances[inst.id]
        self._notify(inst, "stopped")

    async def restart_failed(self, inst: SupervisedInstance) -> None:
        """Give a FAILED instance another chance (its crash count is forgotten)."""
        if inst.life.state is LifeState.FAILED:
            inst.life.reset()
            inst.task = asyncio.get_running_loop().create_task(
                self._keep_running(inst), name=f"shoal-supervisor {inst.id}")

    async def close(self) -> None:
        """Stop every instance (in parallel)."""
        self._closing = True
        await asyncio.gather(*(self.stop(i) for i in list(self.instances.values())),
                             return_exceptions=True)
        if self.forkserver is not None:
            await self.forkserver.close()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until every wanted instance said it is ready; TimeoutError names the late."""
        pending = [i for i in self.instances.values() if i.wanted]
        try:
            async with asyncio.timeout(timeout):
                for inst in pending:
                    await self._ready_or_failed(inst)
        except TimeoutError:
            late = [i.id for i in pending if not i.ready.is_set()]
            raise TimeoutError(f"instances not ready after {timeout:g}s: {', '.join(late)}"
                               ) from None

    async def _ready_or_failed(self, inst: SupervisedInstance) -> None:
        while not inst.ready.is_set():
            if inst.life.state is LifeState.FAILED:
                lines = "\n  ".join(inst.output)
                raise ShoalError(f"instance {inst.id} failed: {inst.life.reason}\n  {lines}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await inst.ready.wait()

    # -- the process ---------------------------------------------------------------------------
    async def _keep_running(self, inst: SupervisedInstance) -> None:
        while inst.wanted and not self._closing:
            if self.forkserver is not None:  # the port is picked as late as possible
                await self.forkserver.ready()
            inst.port = free_port(self.host)
            argv = list(self.launch(inst.service, inst.id, inst.port))
            inst.ready.clear()
            inst.ready_info = {}
            inst.output.clear()  # the last lines are the last run's
            inst.life.on_spawn(self._clock())
            env = self.env if self.env_for is None else {**self.env, **self.env_for(inst.service)}
            try:
                inst.process = await self._spawn(argv, env)
                mark(f"supervisor: {inst.id} spawned (pid {inst.process.pid})")
            except OSError as e:
                inst.output.append(f"cannot start {argv[0]}: {e}")
                verdict = inst.life.on_exit(self._clock(), None, inst.output)
            else:
                self._notify(inst, "spawned")
                await self._read_output(inst, inst.process)
                returncode = await inst.process.wait()
                inst.exits += 1
                verdict = inst.life.on_exit(self._clock(), returncode, inst.output)
                if verdict.state is not LifeState.STOPPED:
                    await self._run_exit_hooks(inst, inst.process.pid)
            if not await self._after_exit(inst, verdict):
                return

    async def _spawn(self, argv: list[str], env: dict[str, str]
                     ) -> asyncio.subprocess.Process | ForkedProcess:
        """Fork an instance from the fork server if there is one, else start ``argv``."""
        if self.forkserver is not None and argv[:3] == [sys.executable, "-m", "shoal.instance"]:
            try:
                return await self.forkserver.spawn(argv[3:], env, self.cwd)
            except OSError as e:
                log.warning("supervisor: fork server: %s; starting %s directly", e, argv[0])
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    async def _after_exit(self, inst: SupervisedInstance, verdict: ExitVerdict) -> bool:
        """Handle an exit; True to spawn again."""
        if verdict.state is LifeState.STOPPED or not inst.wanted:
            return False
        if verdict.state is LifeState.FAILED:
            self._say(inst, f"FAILED: {verdict.reason}; last output:")
            for line in verdict.last_lines:
                self._say(inst, f"  | {line}")
            self._notify(inst, "failed")
            return False
        self._say(inst, verdict.reason)
        self._notify(inst, "exited")
        assert verdict.restart_at is not None
        await asyncio.sleep(max(0.0, verdict.restart_at - self._clock()))
        return True

    async def _read_output(self, inst: SupervisedInstance,
                           process: asyncio.subprocess.Process | ForkedProcess) -> None:
        stream = process.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line beyond the stream's limit: take it in pieces
                raw = await stream.read(MAX_LINE)
            if not raw:
                return
            line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r\n")
            inst.output.append(line)
            if line.startswith("{") and not inst.ready.is_set():
                self._maybe_ready(inst, line)
            if self.output is not None:
                self.output(f"[{inst.id}] {line}")

    def _maybe_ready(self, inst: SupervisedInstance, line: str) -> None:
        try:
            info = json.loads(line)
        except ValueError:
            return
        if isinstance(info, dict) and info.get("event") == "ready":
            inst.ready_info = info
            inst.life.on_ready(self._clock())
            mark(f"supervisor: {inst.id} ready line read")
            inst.ready.set()
            self._notify(inst, "ready")

    async def _run_exit_hooks(self, inst: SupervisedInstance, pid: int) -> None:
        for hook in list(self.exit_hooks):
            try:
                await hook(inst, pid)
            except Exception:
                log.exception("supervisor: exit hook %r failed for %s", hook, inst.id)

    async def _terminate(self, inst: SupervisedInstance) -> None:
        process = inst.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.grace):
                await process.wait()
        except TimeoutError:
            self._say(inst, f"did not stop within {self.grace:g}s of SIGTERM: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _say(self, inst: SupervisedInstance, text: str) -> None:
        if self.output is not None:
            self.output(f"[{inst.id}] supervisor: {text}")

    def _notify(self, inst: SupervisedInstance, what: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(inst, what)
            except Exception:
                log.exception("supervisor: listener %r failed", listener)


def _number(instance_id: str) -> int:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
