import assert from "node:assert/strict";
import { test } from "node:test";
import { ManualClock, parseClockOffset, parseDurationMs, SystemClock } from "../src/clock";
import { ConnectRequest } from "../src/gen/plait/v1/worker_service";
import { ClockOffsetError, compareHlc, formatHlc, HybridLogicalClock } from "../src/hlc";

const WALL = 1_700_000_000_000;

test("now() never goes backwards, even when the wall clock does", () => {
  const clock = new ManualClock(WALL);
  const hlc = new HybridLogicalClock(clock);
  const a = hlc.now();
  assert.deepEqual(a, { physicalMs: BigInt(WALL), logical: 0 });
  const b = hlc.now(); // same ms: the logical part moves
  assert.deepEqual(b, { physicalMs: BigInt(WALL), logical: 1 });
  clock.setWallMs(WALL - 5000); // NTP stepped back
  const c = hlc.now();
  assert.ok(compareHlc(c, b) > 0);
  clock.setWallMs(WALL + 10);
  assert.deepEqual(hlc.now(), { physicalMs: BigInt(WALL + 10), logical: 0 });
});

test("observe() lands above both the local and the remote reading", () => {
  const clock = new ManualClock(WALL);
  const hlc = new HybridLogicalClock(clock);
  hlc.now();
  // Remote ahead within the offset: its physical time is adopted, logical bumped past it.
  const remote = { physicalMs: BigInt(WALL + 300), logical: 7 };
  assert.deepEqual(hlc.observe(remote), { physicalMs: BigInt(WALL + 300), logical: 8 });
  // Equal physical parts: the larger logical part wins, plus one.
  assert.deepEqual(hlc.observe({ physicalMs: BigInt(WALL + 300), logical: 20 }), {
    physicalMs: BigInt(WALL + 300),
    logical: 21,
  });
  // Remote behind: the local reading just advances.
  assert.deepEqual(hlc.observe({ physicalMs: BigInt(WALL - 3_600_000), logical: 0 }), {
    physicalMs: BigInt(WALL + 300),
    logical: 22,
  });
  // The next send is after everything observed.
  assert.ok(compareHlc(hlc.now(), { physicalMs: BigInt(WALL + 300), logical: 22 }) > 0);
});

test("a worker whose clock is 1 h behind still stamps after what the coordinator sent", () => {
  const hlc = new HybridLogicalClock(new ManualClock(WALL - 3_600_000));
  const lease = { physicalMs: BigInt(WALL), logical: 3 };
  // 1 h behind: the coordinator's stamp is 1 h ahead, beyond max_clock_offset. A bounded merge
  // refuses it; the worker merges it unbounded (and counts the disagreement).
  assert.throws(() => hlc.observe(lease), ClockOffsetError);
  hlc.observe(lease, false);
  assert.ok(compareHlc(hlc.now(), lease) > 0);
});

test("a bounded merge refuses a stamp further ahead than max_clock_offset and merges nothing", () => {
  const hlc = new HybridLogicalClock(new ManualClock(WALL), 500);
  const before = hlc.now();
  const err = assert.throws(() => hlc.observe({ physicalMs: BigInt(WALL + 501), logical: 0 }), ClockOffsetError);
  void err;
  assert.deepEqual(hlc.last, before);
  assert.doesNotThrow(() => hlc.observe({ physicalMs: BigInt(WALL + 500), logical: 0 }));
  hlc.maxOffsetMs = 2000; // as a Welcome's max_clock_offset sets it
  assert.doesNotThrow(() => hlc.observe({ physicalMs: BigInt(WALL + 1999), logical: 0 }));
});

test("an unset stamp (physical_ms 0 or none) only advances the clock", () => {
  const hlc = new HybridLogicalClock(new ManualClock(WALL));
  hlc.now();
  assert.deepEqual(hlc.observe(undefined), { physicalMs: BigInt(WALL), logical: 1 });
  assert.deepEqual(hlc.observe({ physicalMs: 0n, logical: 0 }), { physicalMs: BigInt(WALL), logical: 2 });
});

test("64-bit stamps round-trip on the wire as bigint; logical 0 is omitted but decodes as 0", () => {
  const big = 2n ** 63n + 12345n; // beyond Number.MAX_SAFE_INTEGER and int64
  const msg = ConnectRequest.fromPartial({
    hlc: { physicalMs: big, logical: 0 },
    message: { $case: "credit", value: { slots: 1 } },
  });
  const bytes = ConnectRequest.encode(msg).finish();
  const back = ConnectRequest.decode(bytes);
  assert.equal(typeof back.hlc?.physicalMs, "bigint");
  assert.equal(back.hlc?.physicalMs, big);
  assert.equal(back.hlc?.logical, 0);
  // Field 2 (logical) is absent from the encoding when it is 0.
  const plain = ConnectRequest.encode(ConnectRequest.fromPartial({ hlc: { physicalMs: 5n, logical: 0 } })).finish();
  assert.deepEqual([...plain], [0x0a, 0x02, 0x08, 0x05]);
  assert.equal(formatHlc({ physicalMs: 1700000000000n, logical: 4 }), "1700000000000.0004");
});

test("PLAIT_CLOCK_OFFSET reads like the Python SDK's parse_clock_offset", () => {
  assert.equal(parseClockOffset("1h"), 3_600_000);
  assert.equal(parseClockOffset("-90s"), -90_000);
  assert.equal(parseClockOffset("-1500"), -1500);
  assert.equal(parseClockOffset("+1h30m"), 5_400_000);
  assert.equal(parseClockOffset("250ms"), 250);
  assert.equal(parseClockOffset(""), 0);
  assert.throws(() => parseClockOffset("soon"), RangeError);
  assert.equal(parseDurationMs("1.5"), 1500);
  const skewed = new SystemClock(-3_600_000);
  assert.ok(Math.abs(skewed.wallMs() - (Date.now() - 3_600_000)) < 1000);
});
