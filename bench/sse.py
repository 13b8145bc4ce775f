"""Server-Sent Events fan-out: N clients following one session through one gateway.

Target, in `bench/sse.py`: 1,000 concurrent SSE clients on one gateway, every client
receiving every transition, ordinary requests unaffected, and p99 publish-to-client latency
≤ 2× the p99 with one client measured in the same run.

The gateway runs as its own process (`agentflow gateway`, no token), on local Kafka and
Redis. This script stands in for a worker: it opens a session record and publishes the
session's transitions into Redis with `TransitionPublisher`, one every --interval seconds,
each carrying its publish time (`data.sent_at`, wall clock); the last one is a
`session.completed` with a result, so every stream ends by itself.

Two runs with the same transitions and pace, in the same run: 1 client (the baseline),
then N clients on one session. Clients connect, then wait until every one of them has
received the session's first transition (so its stream follows pub/sub) before the
measured transitions are published. Each client checks that it got every transition
once, in seq order. Ordinary requests (`GET /healthz` and `GET /sessions/{id}`,
alternately, --requests-per-s) run from a separate loop while the gateway is idle and
during the N-client run (from the first connect to the last stream's end); any non-2xx
answer or error counts as failed.

Clients: raw non-blocking sockets on an asyncio loop, a hand-written HTTP/1.1 GET, a
chunked-body decoder and an SSE parser. Latency is taken from the kernel's receive time of
the bytes that complete an event (`SO_TIMESTAMPNS`, wall clock like `sent_at`), not from
when the client process got round to reading them: with 1,000 streams on one loop the
last socket of a burst is read tens to hundreds of ms after the first, and that would be
counted as gateway latency. The report prints that read delay apart. Because the client's
own delay is not measured, the clients run in one process by default (--client-processes):
the gateway is one process on one core, and a second client process only takes the other
core from Redis and the gateway on a 2-core machine (with 2, the 1,000-client figures were
no better). The report prints the CPU each process used over the run (and marks a run
during which other processes or the host took the cores).

Usage:
    .venv/bin/python bench/sse.py [--clients 1000] [--transitions 100] [--interval 0.05]
        [--client-processes 1] [--requests-per-s 10]

Starts the local servers itself unless AGENTFLOW_KAFKA_BOOTSTRAP / AGENTFLOW_REDIS_URL
are set. The gateway runs as `agentflow gateway` does (`python -m service.cli gateway`);
its log goes to /tmp/agentflow-bench-gateway.log, and BENCH_GATEWAY_PREFIX puts arguments
before `-m service.cli` (e.g. "-m cProfile -o /tmp/gateway.prof"). Exits 1 when a
client missed a transition, got one twice or out of order, or an ordinary request failed;
a latency ratio over its target is a figure to report, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.models import WorkflowResult  # noqa: E402
from service.bootstrap import redis_client  # noqa: E402
from service.devtools.servers import LocalServers  # noqa: E402
from service.storage.publisher import TransitionPublisher  # noqa: E402
from service.storage.sessions import SessionStore  # noqa: E402
from service.storage.transitions import Transition, TransitionType  # noqa: E402

GATEWAY_LOG = Path("/tmp/agentflow-bench-gateway.log")
HOST = "127.0.0.1"
CONNECTING_AT_ONCE = 50
"""Streams a client process sets up at a time: the gateway listens with a backlog of 128."""
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
"""Linux's socket option for kernel receive times (Python's socket module lacks the name)."""
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)
NODES = ("intake", "discover", "plan", "execute", "review", "finalize")
TTL_S = 3600
STARTUP_BOUND_S = 60.0
CONNECT_BOUND_S = 180.0
DRAIN_BOUND_S = 120.0
"""How long streams may take to end after the last transition before they count as hung..."""
DRAIN_PER_DELIVERY_S = 0.002
"""... or, when longer, this for each (client, transition): a slow gateway is not a hang."""
REQUEST_TIMEOUT_S = 10.0
"""An ordinary request not answered in this time counts as failed."""
BUSY_MACHINE = 0.1
"""Share of the cores other processes may use during a run before the report warns."""


# --- the clients (run in processes of their own) ---------------------------------------


class _SseClient:
    """One stream on a raw socket: a hand-written GET, a chunked-body decoder, an SSE parser.

    Each read takes the kernel's receive time of its bytes (SO_TIMESTAMPNS, wall clock), so
    an event's latency runs from its publish to its arrival at this socket whatever this
    process was busy with; how much later the process read it is kept apart. Records
    `(seq, latency_s, read_delay_s)` for each transition (latency None without
    `data.sent_at`).
    """

    def __init__(self, request: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.first: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.events: list[tuple[int, float | None, float]] = []
        self.error: str | None = None
        self.untimed_reads = 0
        self.status = 0
        self._sock: socket.socket | None = None
        self._raw = bytearray()
        self._chunked = False
        self._chunk_left = 0
        self._body = b""

    async def connect(self, port: int) -> None:
        """Connect, send the GET and start reading.

        Raises:
            OSError: the connection failed.
        """
        self._sock = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        await self.loop.sock_connect(sock, (HOST, port))
        await self.loop.sock_sendall(sock, self.request)
        self.loop.add_reader(sock.fileno(), self._readable)

    def finish(self, error: str | None) -> None:
        """End the stream: `error` says why, None for the end the gateway sent."""
        if self.done.done():
            return
        self.error = error
        for future in (self.first, self.done):
            if not future.done():
                future.set_result(None)
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data, ancillary, _flags, _addr = self._sock.recvmsg(65536, _ANCILLARY)
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(f"connection lost ({exc})")
            return
        if not data:
            self.finish("connection lost (closed by the gateway)")
            return
        read_at = arrived = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack(value)
                arrived = seconds + nanoseconds / 1e9
                break
        else:
            self.untimed_reads += 1
        self.feed(data, arrived, read_at - arrived)

    def feed(self, data: bytes, arrived: float, delay: float) -> None:
        """Take bytes that arrived at `arrived` and were read `delay` seconds later."""
        self._raw += data
        if not self.status and not self._head():
            return
        if self._chunked:
            self._dechunk()
        else:
            self._body += self._raw
            self._raw.clear()
        if b"\n\n" not in self._body:
            return
        *blocks, self._body = self._body.split(b"\n\n")  # the gateway ends lines with \n
        for block in blocks:
            self._event(block, arrived, delay)

    def _head(self) -> bool:
        end = self._raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        status_line, *headers = bytes(self._raw[:end]).decode("latin-1").split("\r\n")
        del self._raw[: end + 4]
        self.status = int(status_line.split()[1])
        self._chunked = "transfer-encoding: chunked" in (h.lower() for h in headers)
        if self.status != 200:
            self.finish(f"HTTP {self.status}")
            return False
        return True

    def _dechunk(self) -> None:
        while self._raw:
            if self._chunk_left:
                piece = bytes(self._raw[: self._chunk_left])
                self._body += piece
                del self._raw[: len(piece)]
                self._chunk_left -= len(piece)
                continue
            nl = self._raw.find(b"\r\n")
            if nl < 0:
                return
            size_line = bytes(self._raw[:nl])
            del self._raw[: nl + 2]
            if not size_line:  # the CRLF that closes a chunk's data
                continue
            self._chunk_left = int(size_line.split(b";")[0], 16)
            if not self._chunk_left:  # the last chunk: the stream ended
                self.finish(None)
                return

    def _event(self, block: bytes, arrived: float, delay: float) -> None:
        data = [
            line[6:] if line[5:6] == b" " else line[5:]
            for line in block.split(b"\n")
            if line.startswith(b"data:")
        ]
        if not data:  # a comment: `: following session`, keep-alives
            return
        transition = json.loads(b"\n".join(data))
        sent_at = (transition.get("data") or {}).get("sent_at")
        latency = None if sent_at is None else arrived - sent_at
        self.events.append((transition["seq"], latency, delay))
        if not self.first.done():
            self.first.set_result(None)


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"need {needed} open files, the hard limit is {hard}: raise it")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_process(port: int, session_id: str, count: int, conn: Connection) -> None:
    """Follow a session with `count` streams and report through `conn` (a process target).

    Says `("started",)`, connects when told, says `("ready", following, seconds)` once
    every stream got its first transition (or failed), follows until every stream ended or
    the bound it is sent next, then says `("done", [(events, error)], cpu_s, untimed_reads)`.
    """
    _raise_open_files(count + 64)
    try:
        asyncio.run(_follow(port, session_id, count, conn))
    finally:
        conn.close()


async def _follow(port: int, session_id: str, count: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    request = (
        f"GET /sessions/{session_id}/stream HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    clients = [_SseClient(request, loop) for _ in range(count)]
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    conn.send(("started",))
    await asyncio.to_thread(conn.recv)
    started = time.perf_counter()

    async def connect(client: _SseClient) -> None:
        async with gate:
            try:
                await client.connect(port)
            except OSError as exc:
                client.finish(f"connect: {exc}")
            await client.first

    await asyncio.gather(*(connect(c) for c in clients))
    following = sum(c.error is None for c in clients)
    conn.send(("ready", following, time.perf_counter() - started))
    bound_s = await asyncio.to_thread(conn.recv)
    cpu_before = _cpu_s()
    await asyncio.wait([c.done for c in clients], timeout=bound_s)
    cpu = _cpu_s() - cpu_before
    for client in clients:
        client.finish("did not end in time")
    untimed = sum(c.untimed_reads for c in clients)
    conn.send(("done", [(c.events, c.error) for c in clients], cpu, untimed))


# --- the driver ------------------------------------------------------------------------


@dataclass
class Sample:
    """One ordinary request."""

    started: float
    latency_ms: float
    error: str | None
    """Why it failed: `HTTP 503`, `ReadTimeout`, ... (None when it answered 2xx)."""


@dataclass
class FanOut:
    """What one run of K clients on one session came to."""

    clients: int
    transitions: int
    latencies_ms: list[float] = field(default_factory=list)
    missing: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    following: int = 0
    connect_s: float = 0.0
    published_at: float = 0.0
    ended_at: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    read_delays_ms: list[float] = field(default_factory=list)
    untimed_reads: int = 0
    redis_clients: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every client got every transition, once, in order."""
        return not (self.missing or self.duplicated or self.out_of_order)


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """Return p50, p99 and max (nan when there are none)."""
    if not values:
        return math.nan, math.nan, math.nan
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98], max(values)


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far (0 if unknown)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds the machine has used so far, and those the host took (from /proc/stat).

    The first counts every process and the kernel; the second is "steal": time this
    virtual machine wanted the cores and the host ran something else.
    """
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Gateway:
    """`agentflow gateway` as its own process on a free loopback port, without a token."""

    def __init__(self, servers: LocalServers) -> None:
        self.servers = servers
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_start = 0

    def start(self) -> None:
        """Start the process, with the servers' addresses and no token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFLOW_")}
        env["AGENTFLOW_KAFKA_BOOTSTRAP"] = self.servers.kafka_bootstrap
        env["AGENTFLOW_REDIS_URL"] = self.servers.redis_url
        self.log_start = GATEWAY_LOG.stat().st_size if GATEWAY_LOG.exists() else 0
        prefix = os.environ.get("BENCH_GATEWAY_PREFIX", "").split()
        self.process = subprocess.Popen(
            [sys.executable, *prefix, "-m", "service.cli", "gateway", "--host", HOST]
            + ["--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=GATEWAY_LOG.open("ab"),
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, http: httpx.AsyncClient) -> None:
        """Wait until `/healthz` answers 200.

        Raises:
            RuntimeError: the gateway exited or did not answer within the bound.
        """
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_BOUND_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.process.returncode}): {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{self.url}/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the gateway did not answer /healthz in {STARTUP_BOUND_S:g} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        """What the gateway logged in this run."""
        with GATEWAY_LOG.open("rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    @property
    def pid(self) -> int | None:
        """The gateway's pid while it runs."""
        return self.process.pid if self.process and self.process.poll() is None else None


class StreamClients:
    """K stream clients on one session, spread over processes driven through pipes."""

    def __init__(self, port: int, session_id: str, count: int, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        shares = [count // processes + (i < count % processes) for i in range(processes)]
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for share in filter(None, shares):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=client_process, args=(port, session_id, share, theirs), daemon=True
            )
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    def tell(self, message: Any) -> None:
        """Send `message` to every process."""
        for pipe in self.pipes:
            pipe.send(message)

    async def gather(self, kind: str, bound_s: float) -> list[tuple[Any, ...]]:
        """Wait for every process's message of `kind`; return what follows the kind.

        Raises:
            RuntimeError: a process died or did not answer within `bound_s`.
        """
        return await asyncio.gather(*(self._receive(p, kind, bound_s) for p in self.pipes))

    @staticmethod
    async def _receive(pipe: Connection, kind: str, bound_s: float) -> tuple[Any, ...]:
        if not await asyncio.to_thread(pipe.poll, bound_s):
            raise RuntimeError(f"a client process sent no {kind!r} within {bound_s:g} s")
        try:
            message = await asyncio.to_thread(pipe.recv)
        except EOFError:
            raise RuntimeError(f"a client process died before {kind!r}") from None
        assert message[0] == kind, message
        return tuple(message[1:])

    def stop(self) -> None:
        """Join the processes; terminate any still running after 10 s."""
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        for pipe in self.pipes:
            pipe.close()


class OrdinaryRequests:
    """`GET /healthz` and `GET /sessions/{id}` alternately, `rate` a second.

    An open loop: each request starts at its planned time in a task of its own, so slow
    answers do not thin out the samples taken while the gateway is slow.
    """

    def __init__(self, http: httpx.AsyncClient, url: str, session_id: str, rate: float) -> None:
        self.http = http
        self.routes = (
            ("GET /healthz", f"{url}/healthz"),
            ("GET /sessions/{id}", f"{url}/sessions/{session_id}"),
        )
        self.rate = rate
        self._stop = asyncio.Event()
        self._task: asyncio.Task[list[Sample]] | None = None

    def start(self) -> None:
        """Start sending."""
        self._stop.clear()
        self._task = asyncio.create_task(self._send())

    async def stop(self) -> list[Sample]:
        """Stop sending; wait for the requests under way; return the samples since `start`."""
        assert self._task is not None
        self._stop.set()
        return await self._task

    async def run_for(self, seconds: float) -> list[Sample]:
        """Send for `seconds`; return the samples."""
        self.start()
        await asyncio.sleep(seconds)
        return await self.stop()

    async def _send(self) -> list[Sample]:
        loop = asyncio.get_running_loop()
        requests: list[asyncio.Task[Sample]] = []
        start = loop.time()
        while not self._stop.is_set():
            route, address = self.routes[len(requests) % 2]
            requests.append(asyncio.create_task(self._request(route, address)))
            next_at = start + len(requests) / self.rate
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))
        return list(await asyncio.gather(*requests))

    async def _request(self, route: str, address: str) -> Sample:
        started, t0 = time.time(), time.perf_counter()
        try:
            answer = await self.http.get(address)
            error = None if answer.is_success else f"{route}: HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            error = f"{route}: {type(exc).__name__}"
        return Sample(started, (time.perf_counter() - t0) * 1000, error)


@dataclass
class Bench:
    """The servers, the gateway and the stand-in worker that publishes transitions."""

    args: argparse.Namespace
    servers: LocalServers
    gateway: Gateway
    store: SessionStore
    publisher: TransitionPublisher

    async def open_session(self, tag: str) -> str:
        """Open a session record and publish its first transition (seq 1, not measured)."""
        session_id = f"bench-sse-{tag}-{uuid.uuid4().hex[:8]}"
        await self.store.open(
            session_id, event_id=f"{session_id}-event", event_type="bench.sse", subject=None
        )
        await self.publisher.publish(Transition(session_id=session_id, type="session.started"))
        return session_id

    async def publish(self, session_id: str) -> None:
        """Publish the measured transitions at a fixed pace, the last completing the session."""
        loop = asyncio.get_running_loop()
        start, count = loop.time(), self.args.transitions
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i * self.args.interval - loop.time()))
            last = i == count - 1
            kind: TransitionType = (
                "session.completed" if last else ("node.started", "node.completed")[i % 2]
            )
            data: dict[str, Any] = {}
            if last:  # what the stream and its readers take as the end of a session
                result = WorkflowResult(
                    session_id=session_id, event_id=f"{session_id}-event", status="completed"
                )
                data = {"status": "completed", "error": None, "question": None}
                data["result"] = result.model_dump(mode="json")
            node = None if last else NODES[(i // 2) % len(NODES)]
            data["sent_at"] = time.time()
            transition = Transition(session_id=session_id, type=kind, node=node, data=data)
            await self.publisher.publish(transition)

    def cpu_now(self) -> dict[str, float]:
        """CPU seconds used so far by the machine, the gateway, the servers and this process."""
        servers = self.servers
        machine, stolen = machine_cpu_s()
        return {
            "machine": machine,
            "stolen": stolen,
            "gateway": process_cpu_s(self.gateway.pid),
            "redis": process_cpu_s(servers.redis.pid if servers.redis else None),
            "kafka": process_cpu_s(servers.kafka.pid if servers.kafka else None),
            "bench": _cpu_s(),
        }

    async def fan_out(
        self, clients: int, processes: int, during: OrdinaryRequests | None = None
    ) -> FanOut:
        """Follow a new session with `clients` streams while its transitions are published.

        `during` is started when the clients start connecting.
        """
        run = FanOut(clients=clients, transitions=self.args.transitions)
        session_id = await self.open_session(str(clients))
        group = StreamClients(self.gateway.port, session_id, clients, processes)
        try:
            await group.gather("started", STARTUP_BOUND_S)  # spawned, imported: not timed
            if during is not None:
                during.start()
            group.tell("connect")
            ready = await group.gather("ready", CONNECT_BOUND_S)
            run.following = sum(n for n, _ in ready)
            run.connect_s = max(seconds for _, seconds in ready)
            info = await self.publisher.redis.info("clients")
            run.redis_clients = {
                k: int(info.get(k, -1)) for k in ("connected_clients", "pubsub_clients")
            }
            cpu = self.cpu_now()
            deliveries = clients * self.args.transitions
            bound_s = self.args.transitions * self.args.interval + max(
                DRAIN_BOUND_S, deliveries * DRAIN_PER_DELIVERY_S
            )
            group.tell(bound_s)
            run.published_at = time.time()
            await self.publish(session_id)
            reports = await group.gather("done", bound_s + 30)
            run.ended_at = time.time()
            run.cpu_s = {k: v - cpu[k] for k, v in self.cpu_now().items()}
            run.cpu_s["clients"] = sum(seconds for _, seconds, _ in reports)
            ours = ("gateway", "redis", "kafka", "bench", "clients")
            run.cpu_s["others"] = run.cpu_s["machine"] - sum(run.cpu_s[k] for k in ours)
        finally:
            group.stop()
        expected = set(range(1, self.args.transitions + 2))  # seq 1 is the session's start
        for streams, _cpu, untimed in reports:
            run.untimed_reads += untimed
            for events, error in streams:
                if error is not None:
                    run.errors[error] = run.errors.get(error, 0) + 1
                seqs = [seq for seq, _, _ in events]
                run.missing += len(expected - set(seqs))
                run.duplicated += len(seqs) - len(set(seqs))
                run.out_of_order += sum(b <= a for a, b in zip(seqs, seqs[1:], strict=False))
                run.latencies_ms += [lat * 1000 for _, lat, _ in events if lat is not None]
                run.read_delays_ms += [delay * 1000 for _, _, delay in events]
        return run


async def main(args: argparse.Namespace) -> int:
    _raise_open_files(2 * args.clients + 1024)  # the gateway and Redis inherit it
    async with (
        LocalServers.from_env() as servers,
        httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http,
    ):
        redis = redis_client(servers.redis_url, max_connections=8)
        gateway = Gateway(servers)
        bench = Bench(
            args,
            servers,
            gateway,
            SessionStore(redis, ttl_s=TTL_S),
            TransitionPublisher(redis, ttl_s=TTL_S),
        )
        try:
            gateway.start()
            await gateway.wait_ready(http)
            target = await bench.open_session("requests")
            for path in ("/healthz", f"/sessions/{target}"):  # the first opens the checkpointer
                (await http.get(f"{gateway.url}{path}")).raise_for_status()
            requests = OrdinaryRequests(http, gateway.url, target, args.requests_per_s)
            idle = await requests.run_for(max(3.0, args.transitions * args.interval))
            base = await bench.fan_out(1, 1)
            try:
                run = await bench.fan_out(args.clients, args.client_processes, during=requests)
            finally:
                busy = await requests.stop()
            gateway_mib = peak_rss_mib(gateway.pid) if gateway.pid else math.nan
            warnings = [
                line.split(" ", 2)[2]
                for line in gateway.log().splitlines()
                if (" WARNING " in line or " ERROR " in line) and "API_TOKENS" not in line
            ]
        finally:
            gateway.stop()
            await redis.aclose()
    return report(args, base, run, idle, busy, gateway_mib, warnings)


def ms(samples: list[Sample]) -> str:
    p50, p99, _ = percentiles([s.latency_ms for s in samples])
    return f"p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   ({len(samples)} requests)"


def print_run(r: FanOut, args: argparse.Namespace) -> None:
    """Print what one run of K clients came to."""
    p50, p99, top = percentiles(r.latencies_ms)
    _, delay99, delaymax = percentiles(r.read_delays_ms)
    print(
        f"\n{r.clients} client{'s' if r.clients > 1 else ''}: publish-to-client "
        f"p50 {p50:.1f} ms   p99 {p99:.1f} ms   max {top:.1f} ms"
        f"   ({len(r.latencies_ms)} of {r.clients * r.transitions} deliveries)"
    )
    print(
        f"   {r.following} following {r.connect_s:.2f} s after they started connecting; "
        f"publishing took {(r.transitions - 1) * args.interval:.2f} s"
    )
    cpu, wall = r.cpu_s, r.ended_at - r.published_at
    per_delivery = (
        f" ({cpu['gateway'] / max(1, len(r.latencies_ms)) * 1e6:.0f} µs a delivery, "
        "all its work counted)"
        if r.clients > 1
        else ""
    )
    print(
        f"   CPU over the {wall:.2f} s from the first publish to the last stream's end "
        f"({os.cpu_count()} cores):\n"
        f"     gateway {cpu['gateway']:.2f} s{per_delivery}, "
        f"Redis {cpu['redis']:.2f} s, clients {cpu['clients']:.2f} s, "
        f"this script {cpu['bench']:.2f} s, Kafka {cpu['kafka']:.2f} s\n"
        f"     other processes and the kernel {cpu['others']:.2f} s, "
        f"the host (steal) {cpu['stolen']:.2f} s"
    )
    if cpu["others"] + cpu["stolen"] > BUSY_MACHINE * wall * (os.cpu_count() or 1):
        print("   (!) others had the cores during this run: its figures are not clean")
    print(
        f"   clients read the events after their arrival (not counted above): "
        f"p99 {delay99:.1f} ms, max {delaymax:.1f} ms"
        + (f"; {r.untimed_reads} reads without a kernel time" if r.untimed_reads else "")
    )
    print(
        f"   Redis connections while following: {r.redis_clients['connected_clients']} "
        f"({r.redis_clients['pubsub_clients']} in pub/sub)"
    )
    for error, count in sorted(r.errors.items()):
        print(f"   {count} streams: {error}")


def report(
    args: argparse.Namespace,
    base: FanOut,
    run: FanOut,
    idle: list[Sample],
    busy: list[Sample],
    gateway_mib: float,
    warnings: list[str],
) -> int:
    """Print the figures and the ratios; return the exit code."""
    print(
        f"agentflow SSE fan-out benchmark  (gateway process, loopback, {os.cpu_count()} cores)\n"
        f"{args.transitions} transitions, one every {args.interval * 1000:.0f} ms, on one "
        f"session; the N clients in {args.client_processes} processes"
    )
    for r in (base, run):
        print_run(r, args)
    connecting = [s for s in busy if s.started < run.published_at]
    streaming = [s for s in busy if run.published_at <= s.started <= run.ended_at]
    during = connecting + streaming
    failures = [s.error for s in idle + during if s.error is not None]
    failed = len(failures)
    print(
        f"\nordinary requests (GET /healthz, GET /sessions/{{id}}; {args.requests_per_s:g}/s, "
        f"{REQUEST_TIMEOUT_S:g} s timeout):"
    )
    print(f"   idle                         : {ms(idle)}")
    print(f"   {run.clients:>5} clients connecting     : {ms(connecting)}")
    print(f"   {run.clients:>5} clients streaming      : {ms(streaming)}")
    for error in sorted(set(failures)):
        print(f"   failed: {failures.count(error)} × {error}")
    print(f"\ngateway peak memory {gateway_mib:.0f} MiB; {len(warnings)} warnings in its log")
    if warnings:
        print(f"   first: {warnings[0][:200]}")

    ratio = percentiles(run.latencies_ms)[1] / percentiles(base.latencies_ms)[1]
    missing, duplicated = base.missing + run.missing, base.duplicated + run.duplicated
    disorder = base.out_of_order + run.out_of_order
    complete = base.complete and run.complete
    idle_p99 = percentiles([s.latency_ms for s in idle])[1]
    during_p99 = percentiles([s.latency_ms for s in during])[1]
    order = f", {disorder} out of order" if disorder else ""
    print(f"\np99 {run.clients} clients / p99 1 client: {ratio:.2f} (target ≤ 2.00)")
    print(
        f"every client got every transition: {'yes' if complete else 'no'} "
        f"({missing} missing, {duplicated} duplicated{order})"
    )
    print(f"ordinary requests p99 during / idle: {during_p99 / idle_p99:.2f}, failed: {failed}")
    return 0 if complete and not failed else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--transitions", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between them")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--requests-per-s", type=float, default=10.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
