"""ConnectResponse.batch on the coordinator's side (services.worker.batched): queued messages go
in as few stream writes as fit the batch limit, in order, stamped once."""

from __future__ import annotations

from plait.coordinator.services import worker as svc
from plait.v1 import worker_service_pb2 as wpb


def msg(n: int, inputs: int = 0) -> wpb.ConnectResponse:
    m = wpb.ConnectResponse()
    m.hlc.physical_ms = 1000 + n
    m.lease_grant.sequence = n
    if inputs:
        m.lease_grant.leases.add(lease_id=f"l{n}", inputs_json="x" * inputs)
    return m


def test_one_message_goes_as_it_is() -> None:
    one = msg(1)
    assert svc.batched([one]) == [one]


def test_several_go_in_one_batch_in_order_with_the_last_stamp() -> None:
    (b,) = svc.batched([msg(1), msg(2), msg(3)])
    assert b.WhichOneof("message") == "batch"
    assert [m.lease_grant.sequence for m in b.batch.messages] == [1, 2, 3]
    assert b.hlc.physical_ms == 1003
    assert not any(m.HasField("hlc") for m in b.batch.messages)


def test_batches_stay_under_the_limit_and_a_big_message_goes_alone() -> None:
    third = svc.BATCH_BYTES // 3
    out = svc.batched([msg(1, third), msg(2, third), msg(3, third), msg(4, 2 * svc.BATCH_BYTES)])
    assert all(o.ByteSize() <= svc.BATCH_BYTES + 64 for o in out[:-1])
    assert out[-1].WhichOneof("message") == "lease_grant"  # too big to share: alone, unwrapped
    sequences = [
        m.lease_grant.sequence
        for o in out
        for m in (o.batch.messages if o.WhichOneof("message") == "batch" else [o])
    ]
    assert sequences == [1, 2, 3, 4] and len(out) >= 3
