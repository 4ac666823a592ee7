"""Direct streams (serving/direct_streams.py): per-step frames from a decoder replica to an ingress
mailbox, with the first and last outputs on Serve's stream. Whatever frames are lost, and however the
two paths interleave, the ingress takes every output once and in order."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

import serving.direct_streams as ds
from model.engine.llm_engine import RequestOutput
from serving.decoder_server import DecoderServer, GenerateRequest
from serving.direct_streams import DirectStream, MailboxAddress, Ordered

BOUNDARY = 7  # a "[TOOL_CALLS]": nothing is merged past an output that holds it


def outputs(n: int, boundary_at: int | None = None) -> list[RequestOutput]:
    outs = []
    for i in range(n):
        token = BOUNDARY if i == boundary_at else 100 + i
        outs.append(RequestOutput("r", [token], f"<{i}>", finished=i == n - 1,
                                  finish_reason="length" if i == n - 1 else None, completion_tokens=i + 1))
    return outs


def joined(outs: list[RequestOutput]) -> tuple:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason


def check_split_at_boundary(outs: list[RequestOutput]) -> None:
    """An output holding the boundary token ends there: the text after it is in later outputs."""
    for o in outs:
        if BOUNDARY in o.token_ids:
            assert o.token_ids[-1] == BOUNDARY


# -- the decoder's side, with a fake engine and a connection that loses frames ----------------------

class FakeEngine:
    def __init__(self, outs: list[RequestOutput], stream_interval_s: float = 0.0) -> None:
        self.outs, self.stream_interval_s = outs, stream_interval_s
        self.intervals: list[float | None] = []

    async def generate(self, *args, stream_interval_s=None):
        self.intervals.append(stream_interval_s)
        for out in self.outs:
            await asyncio.sleep(0)
            yield out


class LossyConnection:
    """Groups what it is sent into frames at random cuts, merged as the real one merges them; after
    `breaks_at` outputs it loses its pending frame and is broken."""

    def __init__(self, rng: random.Random, breaks_at: int | None) -> None:
        self.rng, self.breaks_at = rng, breaks_at
        self.broken = False
        self.frames: list[list[ds.Item]] = []
        self._pending: list[ds.Item] = []
        self.sent = 0

    def send(self, key, seq, out, boundaries) -> None:
        assert not self.broken
        self._pending.append((seq, seq, out))
        self.sent += 1
        if self.sent == self.breaks_at:
            self._pending.clear()  # lost with the connection
            self.broken = True
        elif self.rng.random() < 0.4:
            self.flush(boundaries)

    def flush(self, boundaries) -> None:
        if self._pending:
            self.frames.append(ds.coalesce(self._pending, boundaries))
            self._pending = []

    def forget(self, key) -> None:
        self._pending = []  # goes with the last Serve message


class FakeOutboxes:
    def __init__(self, conn) -> None:
        self.conn, self.fallbacks = conn, 0

    def get(self, mailbox):
        return self.conn


def decoder_with(engine: FakeEngine, conn) -> DecoderServer:
    server = object.__new__(DecoderServer.func_or_class)
    server.engine, server.outboxes, server.tags = engine, FakeOutboxes(conn), {}
    return server


def run_decoder(outs, conn, boundaries=frozenset(), interval_s: float = 0.0) -> tuple[list[list[ds.Item]], FakeEngine]:
    engine = FakeEngine(outs, interval_s)
    direct = DirectStream(MailboxAddress("127.0.0.1", 1, b"s" * 16), "key")
    request = GenerateRequest("r", [1, 2, 3], None, [], boundaries, direct)

    async def collect():
        return [items async for items in decoder_with(engine, conn).generate(request)]

    return asyncio.run(collect()), engine


@pytest.mark.parametrize("seed", range(40))
def test_the_ingress_takes_each_output_once_in_order_whatever_is_lost(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 30)
    boundary_at = rng.choice([None, rng.randrange(n)])
    boundaries = frozenset([BOUNDARY])
    outs = outputs(n, boundary_at)
    breaks_at = rng.choice([None, rng.randint(1, n)])  # the connection may fail partway
    lost_frames = rng.random() < 0.3  # or frames may be lost without the decoder knowing
    conn = LossyConnection(rng, breaks_at)
    serve_messages, engine = run_decoder(outs, conn, boundaries, interval_s=rng.choice([0.0, 3600.0]))
    assert engine.intervals == [0.0]  # frames coalesce; the engine does not
    frames = [f for f in conn.frames if not (lost_frames and rng.random() < 0.5)]

    # Serve's messages come in order, the frames in order; the two interleave any way
    assert serve_messages[0] == [(0, 0, outs[0])]  # the first output alone, through Serve
    serve = [("serve", m) for m in serve_messages]
    framed = [("frame", item) for frame in frames for item in frame]
    arrivals = []
    while serve or framed:
        source = serve if serve and (not framed or rng.random() < 0.3) else framed
        arrivals.append(source.pop(0))

    order, taken = Ordered(boundaries), []
    for kind, payload in arrivals:
        taken += order.take(payload if kind == "serve" else [payload])
        if taken and taken[-1].finished:
            break
    assert joined(taken) == joined(outs)
    assert taken[0] is outs[0]  # the first output alone, as the ingress's TTFT and inter-token metrics expect
    assert [o.finished for o in taken] == [False] * (len(taken) - 1) + [True]
    check_split_at_boundary(taken)
    # Serve's messages alone carry every output, once: what frames lose, the last one repairs
    assert [s for m in serve_messages for s, _, _ in m] == list(range(n))


@pytest.mark.parametrize("interval_s", [0.0, 3600.0])
def test_a_broken_connection_sends_the_rest_through_serve(interval_s):
    outs = outputs(10)
    conn = LossyConnection(random.Random(0), breaks_at=3)
    serve_messages, _ = run_decoder(outs, conn, interval_s=interval_s)
    # the first; then, from the break on, every output through Serve, the first of them at once
    # with all the outputs since the first (the connection may have lost them). The engine was not
    # coalescing for the connection, so the decoder does: at most one message per interval.
    rest = [[5], [6], [7], [8], [9]] if interval_s == 0 else [[5, 6, 7, 8, 9]]
    assert [[s for s, _, _ in m] for m in serve_messages] == [[0], [1, 2, 3, 4]] + rest


def test_without_a_connection_every_output_goes_through_serve_coalesced_by_the_engine():
    serve_messages, engine = run_decoder(outputs(5), None)
    assert [[s for s, _, _ in m] for m in serve_messages] == [[0], [1], [2], [3], [4]]
    assert engine.intervals == [None]  # the engine's own interval


# -- the mailbox and the connections, over real sockets --------------------------------------------

@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setattr(ds, "_node_address", lambda: "127.0.0.1")


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def open_mailbox(key: str) -> tuple[ds.Mailbox, MailboxAddress, asyncio.Queue]:
    mailbox = ds.Mailbox()
    address = await mailbox.address()
    return mailbox, address, mailbox.open(key)


def test_frames_reach_the_mailbox_with_each_calls_run_merged(loopback):
    async def main():
        _, address, queue = await open_mailbox("a")
        outboxes = ds.Outboxes(interval_s=0.2)
        conn = outboxes.get(address)
        assert outboxes.get(address) is conn  # one connection per mailbox
        outs = outputs(9)[1:-1]  # the outputs between the first and the last
        conn.send("a", 1, outs[0], frozenset())
        conn.send("other", 1, outs[0], frozenset())  # a call whose queue is gone: dropped
        assert await asyncio.wait_for(queue.get(), 5) == ("frame", (1, 1, outs[0]))
        for seq, out in enumerate(outs[1:], start=2):  # handed over together: one frame, one item
            conn.send("a", seq, out, frozenset())
        kind, (first, last, merged) = await asyncio.wait_for(queue.get(), 5)
        assert (kind, first, last) == ("frame", 2, len(outs))
        assert joined([merged])[:2] == joined(outs[1:])[:2]
        assert outboxes.frames == 2 and outboxes.fallbacks == 0
        conn._task.cancel()

    asyncio.run(main())


def test_a_connection_without_the_secret_delivers_nothing(loopback):
    async def main():
        _, address, queue = await open_mailbox("a")
        outboxes = ds.Outboxes(interval_s=0.0)
        conn = outboxes.get(MailboxAddress(address.host, address.port, b"x" * ds.SECRET_BYTES))
        for step, out in enumerate(outputs(400), start=1):
            if conn.broken:
                break
            conn.send("a", step, out, frozenset())
            await asyncio.sleep(0.01)
        await wait_for(lambda: conn.broken)  # the mailbox closed it
        assert queue.empty()
        # it had connected: the mailbox's next calls try again soon (an ingress replica may restart)
        assert conn.connected and outboxes._retry_at[conn.mailbox] - time.monotonic() <= ds.RETRY_AFTER_S

    asyncio.run(main())


def test_a_frame_that_does_not_unpickle_closes_only_its_connection(loopback):
    async def main():
        _, address, queue = await open_mailbox("a")
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(address.secret + (5).to_bytes(4, "big") + b"junk!")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
        conn = ds.Outboxes(interval_s=0.0).get(address)  # the mailbox still takes others
        conn.send("a", 1, outputs(2)[0], frozenset())
        assert await asyncio.wait_for(queue.get(), 5) == ("frame", (1, 1, outputs(2)[0]))
        conn._task.cancel()

    asyncio.run(main())


def test_an_unreachable_mailbox_sends_its_calls_through_serve_for_a_while(loopback):
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()  # nothing listens on `port` now
        address = MailboxAddress("127.0.0.1", port, b"s" * ds.SECRET_BYTES)
        outboxes = ds.Outboxes(interval_s=0.0)
        conn = outboxes.get(address)
        conn.send("a", 1, outputs(2)[0], frozenset())
        await wait_for(lambda: conn.broken)
        assert not conn.connected
        assert outboxes.get(address) is None  # through Serve, with no new attempt for a while
        outboxes._retry_at[address] = 0.0  # the while is over
        retry = outboxes.get(address)
        assert retry is not None and retry is not conn
        await wait_for(lambda: retry.broken)

    asyncio.run(main())


# -- the running app -------------------------------------------------------------------------------

def decoder_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Decoder", app_name="pixtral").stats.remote().result()


def test_the_app_streams_through_the_mailbox_and_answers_as_without(served):
    import httpx

    body = {"model": "pixtral-test", "max_tokens": 40, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    before = decoder_stats()
    with httpx.Client(base_url=served, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        whole = client.post("/v1/chat/completions", json=body).json()
    after = decoder_stats()
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["choices"][0]["message"]["content"]
    assert [lp for c in choices if c["logprobs"] for lp in c["logprobs"]["content"]] == \
        whole["choices"][0]["logprobs"]["content"]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
    assert after["direct_frames"] > before["direct_frames"]  # the tokens between came in frames
    assert after["direct_fallbacks"] == before["direct_fallbacks"]
