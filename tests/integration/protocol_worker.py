"""A worker written directly against worker_service.proto, for protocol tests.

It is deliberately dumb: it sends exactly what a test tells it to, so tests can play a
well-behaved worker, a silent one, or a zombie with an old token.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from plait.clock import SystemClock
from plait.hlc import HybridLogicalClock
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wgrpc


class ProtocolWorker:
    def __init__(
        self,
        target: str,
        worker_id: str,
        *,
        slots: int = 4,
        handlers: tuple[str, ...] = ("noop",),
        exec_enabled: bool = False,
        running: list[wpb.LeaseReport] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        resume_token: str = "",
    ) -> None:
        self.target = target
        self.worker_id = worker_id
        self.hlc = HybridLogicalClock(SystemClock())
        self.channel = grpc.aio.insecure_channel(target)
        self.outbox: asyncio.Queue[wpb.ConnectRequest | None] = asyncio.Queue()
        self.inbox: asyncio.Queue[wpb.ConnectResponse] = asyncio.Queue()
        self.leases: dict[str, wpb.Lease] = {}
        self.hello = wpb.Hello(
            worker_id=worker_id,
            slots=slots,
            handlers=handlers,
            exec_enabled=exec_enabled,
            running=running or [],
            resume_token=resume_token,
        )
        self.metadata = metadata
        self.welcome: wpb.Welcome | None = None
        self.hb_seq = 0
        self.heard_ack = 0  # newest Ack.heartbeat_sequence received (echoed in heartbeats)
        self.grant_seq = 0
        self._reader: asyncio.Task[None] | None = None
        self.call: Any = None

    async def connect(self) -> wpb.Welcome:
        stub = wgrpc.WorkerServiceStub(self.channel)
        first = wpb.ConnectRequest(hello=self.hello)
        self.hlc.stamp(first.hlc)
        self.outbox.put_nowait(first)

        async def requests() -> Any:
            while True:
                msg = await self.outbox.get()
                if msg is None:
                    return
                yield msg

        self.call = stub.Connect(requests(), metadata=self.metadata or None)

        async def read() -> None:
            async for msg in self.call:
                if msg.HasField("lease_grant"):
                    self.grant_seq = msg.lease_grant.sequence
                    for lease in msg.lease_grant.leases:
                        self.leases[lease.lease_id] = lease
                elif msg.HasField("ack"):
                    self.heard_ack = max(self.heard_ack, msg.ack.heartbeat_sequence)
                await self.inbox.put(msg)

        self._reader = asyncio.create_task(read())
        msg = await self.next("welcome", fail_fast=True)
        self.welcome = msg.welcome
        # Like every worker once welcomed: a heartbeat at once, which proves it hears the
        # coordinator (no lease is granted before that).
        self.heartbeat(list(self.hello.running))  # type: ignore[arg-type]
        return msg.welcome

    def send(self, **kw: Any) -> None:
        msg = wpb.ConnectRequest(**kw)
        self.hlc.stamp(msg.hlc)
        self.outbox.put_nowait(msg)

    async def next(
        self, kind: str, timeout: float = 5.0, *, fail_fast: bool = False
    ) -> wpb.ConnectResponse:
        """The next message of ``kind`` (others are skipped). ``ack`` is the next ack of
        results or refusals; ``heartbeat_ack`` the next one that answers a heartbeat.

        ``fail_fast``: if the stream ends first, raise its error (a refused hello) at once.
        """

        async def find() -> wpb.ConnectResponse:
            while True:
                msg = await self.inbox.get()
                got = msg.WhichOneof("message")
                if kind == "heartbeat_ack":
                    if got == "ack" and msg.ack.heartbeat_sequence:
                        return msg
                # "ack" means results or refusals: a heartbeat's own ack is skipped.
                elif got == kind and (kind != "ack" or msg.ack.results or msg.ack.refused):
                    return msg

        if not fail_fast or self._reader is None:
            return await asyncio.wait_for(find(), timeout)
        finder = asyncio.ensure_future(find())
        done, _ = await asyncio.wait(
            {finder, self._reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if finder in done:
            return finder.result()
        finder.cancel()
        if self._reader in done:
            self._reader.result()  # raises the stream's error
            raise EOFError("the stream ended without a welcome")
        raise TimeoutError(f"no {kind} within {timeout}s")

    async def grants(self, n: int, timeout: float = 5.0, *, beat: bool = True) -> list[wpb.Lease]:
        """Waits until ``n`` leases have been granted in total, returns the new ones.

        ``beat``: heartbeat at the Welcome's cadence while waiting, as a real worker does (a
        session whose heartbeats stop echoing recent acks is leased nothing)."""
        beats = asyncio.create_task(self._beat()) if beat else None
        try:
            got: list[wpb.Lease] = []
            while len(got) < n:
                msg = await self.next("lease_grant", timeout)
                got.extend(msg.lease_grant.leases)
            return got
        finally:
            if beats is not None:
                beats.cancel()

    async def _beat(self) -> None:
        interval = 0.25
        if self.welcome is not None and self.welcome.HasField("heartbeat_interval"):
            interval = self.welcome.heartbeat_interval.ToTimedelta().total_seconds()
        while True:
            await asyncio.sleep(interval)
            self.heartbeat()

    async def chatter(self, every: float = 0.1) -> None:
        """Sends an empty Credit every ``every`` seconds: the stream is not silent (so the
        coordinator does not close it), yet nothing renews the leases. Cancel the task to stop."""
        while True:
            self.send(credit=wpb.Credit(slots=0))
            await asyncio.sleep(every)

    def heartbeat(self, leases: list[wpb.Lease] | None = None) -> None:
        self.hb_seq += 1
        held = self.leases.values() if leases is None else leases
        self.send(
            heartbeat=wpb.Heartbeat(
                sequence=self.hb_seq,
                last_grant_sequence=self.grant_seq,
                last_ack_sequence=self.heard_ack,
                leases=[
                    wpb.LeaseReport(lease_id=l.lease_id, fencing_token=l.fencing_token)
                    for l in held
                ],
            )
        )

    def finish(
        self,
        lease: wpb.Lease,
        outputs: str = "{}",
        outcome: int = wpb.ACTION_OUTCOME_SUCCEEDED,
        token: int | None = None,
    ) -> None:
        self.leases.pop(lease.lease_id, None)
        self.send(
            action_finished=wpb.ActionFinished(
                results=[
                    wpb.ActionResult(
                        lease_id=lease.lease_id,
                        fencing_token=lease.fencing_token if token is None else token,
                        outcome=outcome,
                        outputs_json=outputs,
                    )
                ]
            )
        )  # type: ignore[arg-type]

    def credit(self, n: int) -> None:
        self.send(credit=wpb.Credit(slots=n))

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()
