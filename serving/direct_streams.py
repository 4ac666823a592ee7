"""Direct streams: a decoder replica sends each ingress replica one frame per step, beside Serve.

Why. Through Ray Serve, every output a decoder replica streams is one Ray message to the ingress:
at 32 concurrent requests that is 32 messages a step, each pickled, sent and unpacked by Ray and
Serve, on the same cores as the engine. Sending only each request's first and last output through
Serve measured 1.10x / 1.09x the tokens/s at 8 / 32 requests on the dim-1024 CPU checkpoint, and
2.3x on the tiny one, whose steps are as short as a GPU's. Here the outputs between the first and
the last of every request that one decoder replica serves for one ingress replica travel together,
in one frame per step (at most one per `stream_interval_ms`), over one TCP connection. Measured
against Serve's stream alone: 1.09x / 1.07x the tokens/s at 8 / 32 requests on the dim-1024
checkpoint, 1.9x at 32 on the tiny one (README, Performance).

What stays on Serve's stream: routing to a decoder replica, cancellation (the client leaves, the
ingress cancels the call, the engine aborts), a request's first output (so an error before it still
gets its own HTTP status), and its last. The last Serve message also carries every output since the
previous Serve message, so a frame lost with a connection costs nothing: each output has a sequence
number, and the ingress takes each once, in order (`Ordered`). A decoder that cannot reach an
ingress's mailbox streams that request through Serve instead, as it did before.

The mailbox listens on the ingress's node address (the one Ray uses) at a free port. A connection
must first send the mailbox's secret, which travels only inside Serve's calls, before anything it
sends is unpickled.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import time
from dataclasses import dataclass

from model.engine.async_engine import ends_merge
from model.engine.llm_engine import RequestOutput

log = logging.getLogger("pixtral_serve.direct_streams")

SECRET_BYTES = 16
MAX_FRAME_BYTES = 64 << 20
CONNECT_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0  # an ingress that reads nothing for this long is given up: its requests go through Serve
# after a connection to a mailbox fails, that mailbox's new requests stream through Serve for a while:
RETRY_AFTER_S = 10.0  # it had worked (say the ingress replica restarted)
UNREACHABLE_RETRY_S = 300.0  # it never connected (say a network policy blocks the port): each try stalls streams

# an output and the sequence numbers it covers (several when merged): (first, last, output)
Item = tuple[int, int, RequestOutput]


@dataclass(frozen=True)
class MailboxAddress:
    host: str
    port: int
    secret: bytes


@dataclass(frozen=True)
class DirectStream:
    """What a decoder call needs to stream directly: the ingress's mailbox and this call's key."""

    mailbox: MailboxAddress
    key: str  # unique per call (a retry is a new call)


def coalesce(items: list[Item], boundaries: frozenset[int]) -> list[Item]:
    """Consecutive items as few: each run merged, a run ending at an output nothing is merged past
    (the last, or one holding a boundary token; see `ends_merge`)."""
    merged: list[Item] = []
    run: list[Item] = []
    for item in items:
        run.append(item)
        if ends_merge(item[2], boundaries):
            merged.append(_merged(run))
            run = []
    if run:
        merged.append(_merged(run))
    return merged


def _merged(run: list[Item]) -> Item:
    return run[0][0], run[-1][1], RequestOutput.merge([out for _, _, out in run])


def _frame(payload) -> bytes:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "big") + data


# -- the ingress's end ---------------------------------------------------------------------------

class Mailbox:
    """One per ingress replica: the port its decoder replicas push frames to, and the queue of each
    call in flight. A queue gets ("frame", item) from the mailbox and whatever `Ordered` is fed."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue] = {}
        self._address: MailboxAddress | None = None
        self._failed = False
        self._lock = asyncio.Lock()

    async def address(self) -> MailboxAddress | None:
        """Listening on first use; None when this replica cannot listen (its requests stream through Serve)."""
        if self._address is None and not self._failed:
            async with self._lock:
                if self._address is None and not self._failed:
                    try:
                        host = _node_address()
                        server = await asyncio.start_server(self._serve, host, 0)
                        port = server.sockets[0].getsockname()[1]
                        self._address = MailboxAddress(host, port, secrets.token_bytes(SECRET_BYTES))
                        log.info("direct streams: mailbox on %s:%d", host, port)
                    except OSError as exc:
                        self._failed = True
                        log.warning("direct streams: cannot listen (%s); streaming through Serve", exc)
        return self._address

    def open(self, key: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[key] = queue
        return queue

    def close(self, key: str) -> None:
        self._queues.pop(key, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(reader.readexactly(SECRET_BYTES), CONNECT_TIMEOUT_S)
            if self._address is None or not hmac.compare_digest(hello, self._address.secret):
                log.warning("direct streams: refused a connection without this mailbox's secret")
                return
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                if size > MAX_FRAME_BYTES:
                    log.warning("direct streams: a frame of %d bytes; closing its connection", size)
                    return
                for key, first, last, out in pickle.loads(await reader.readexactly(size)):
                    queue = self._queues.get(key)
                    if queue is not None:  # else its call has ended: the last Serve message held this too
                        queue.put_nowait(("frame", (first, last, out)))
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass  # the decoder went away; its calls' last Serve messages repair what was lost
        except Exception as exc:  # noqa: BLE001 - a frame that does not unpickle: the same repair
            log.warning("direct streams: a bad frame (%s); closing its connection", type(exc).__name__)
        finally:
            writer.close()


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


class Ordered:
    """A call's outputs from both paths, each once and in order. Fed items from frames and from Serve
    messages in any order; `take` gives what is next in line, coalesced."""

    def __init__(self, boundaries: frozenset[int]) -> None:
        self.boundaries = boundaries
        self.next = 0  # the sequence number due next
        self._held: dict[int, Item] = {}  # by first sequence number: arrived ahead of a gap

    def take(self, items: list[Item]) -> list[RequestOutput]:
        ready: list[Item] = []
        for item in items:
            first, last, _ = item
            if first < self.next:
                # taken already (a Serve message repeats what frames carried), or overlapping what
                # was: the call's Serve messages carry each output singly, its tail included
                continue
            if first > self.next:
                self._held[first] = item
                continue
            ready.append(item)
            self.next = last + 1
            while self.next in self._held:
                held = self._held.pop(self.next)
                ready.append(held)
                self.next = held[1] + 1
        # the first output stays alone, as on a plain stream (the ingress times the first token by it)
        first = [ready.pop(0)[2]] if ready and ready[0][0] == 0 else []
        return first + [out for _, _, out in coalesce(ready, self.boundaries)]


# -- the decoder's end ---------------------------------------------------------------------------

class Outboxes:
    """One per decoder replica: a connection to each ingress mailbox it serves, opened on first use."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.frames = 0  # frames sent, over all connections
        self.fallbacks = 0  # calls that streamed through Serve for want of a working connection
        self._connections: dict[MailboxAddress, Connection] = {}
        self._retry_at: dict[MailboxAddress, float] = {}  # failed mailboxes: when to try again

    def get(self, mailbox: MailboxAddress) -> Connection | None:
        """The mailbox's connection; None while it is recently failed (stream through Serve)."""
        conn = self._connections.get(mailbox)
        if conn is not None and not conn.broken:
            return conn
        now = time.monotonic()
        for address, at in list(self._retry_at.items()):
            if at <= now:
                del self._retry_at[address]
        if mailbox in self._retry_at:
            return None
        conn = Connection(mailbox, self)
        self._connections[mailbox] = conn
        return conn

    def broke(self, conn: Connection) -> None:
        if self._connections.get(conn.mailbox) is conn:
            del self._connections[conn.mailbox]
        self._retry_at[conn.mailbox] = time.monotonic() + (RETRY_AFTER_S if conn.connected else UNREACHABLE_RETRY_S)


class Connection:
    """Frames to one mailbox: every output handed over since the last frame, each call's run merged,
    at most one frame per interval. A failure marks it broken; its calls then go through Serve."""

    def __init__(self, mailbox: MailboxAddress, owner: Outboxes) -> None:
        self.mailbox, self.owner = mailbox, owner
        self.broken = False
        self.connected = False
        self._pending: dict[str, tuple[frozenset[int], list[Item]]] = {}
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, key: str, seq: int, out: RequestOutput, boundaries: frozenset[int]) -> None:
        self._pending.setdefault(key, (boundaries, []))[1].append((seq, seq, out))
        self._wake.set()

    def forget(self, key: str) -> None:
        """The call ended: what is still pending goes with its last Serve message instead."""
        self._pending.pop(key, None)

    async def _run(self) -> None:
        writer = None
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.mailbox.host, self.mailbox.port),
                                               CONNECT_TIMEOUT_S)
            writer.write(self.mailbox.secret)
            self.connected = True
            loop = asyncio.get_running_loop()
            sent_at = -float("inf")
            while True:
                await self._wake.wait()
                # let the rest of this step's outputs arrive (the engine thread posts them together)
                await asyncio.sleep(max(sent_at + self.owner.interval_s - loop.time(), 0))
                self._wake.clear()
                pending, self._pending = self._pending, {}
                frame = [(key, *item) for key, (boundaries, items) in pending.items()
                         for item in coalesce(items, boundaries)]
                if frame:
                    writer.write(_frame(frame))
                    await asyncio.wait_for(writer.drain(), SEND_TIMEOUT_S)
                    sent_at = loop.time()
                    self.owner.frames += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: its calls fall back to Serve
            log.warning("direct streams: the connection to %s:%d failed (%s: %s); its requests stream "
                        "through Serve (decoder.direct_streams: false turns this path off)",
                        self.mailbox.host, self.mailbox.port, type(exc).__name__, exc)
        finally:
            self.broken = True
            self._pending.clear()
            self.owner.broke(self)
            if writer is not None:
                writer.close()
