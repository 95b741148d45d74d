/**
 * The session against a scripted coordinator (test/fake.ts): Hello/Welcome, heartbeats and
 * their ack echo, credit accounting, results kept and re-sent until acked, cancel, Welcome.kill,
 * typed errors, progress, HLC merging, self-fencing and drain.
 */
import assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";
import { ManualClock } from "../src/clock";
import { Code } from "../src/errors";
import { ActionOutcome, CancelReason } from "../src/gen/plait/v1/worker_service";
import { ActionError, compareHlc, Worker, type WorkerOptions } from "../src/index";
import { deferred, eventually, FakeCoordinator, lease } from "./fake";

let coord: FakeCoordinator;
let worker: Worker | undefined;
let running: Promise<void> | undefined;
const logs: string[] = [];
/** Handler `hold` waits here, per action id, until the test settles it. */
let gates: Map<string, ReturnType<typeof deferred<unknown>>>;

function gate(id: string) {
  let g = gates.get(id);
  if (g === undefined) gates.set(id, (g = deferred<unknown>()));
  return g;
}

function start(opts: Partial<WorkerOptions> = {}): Worker {
  const w = new Worker({
    coordinator: coord.address,
    id: "ts-test",
    slots: 2,
    reconnectBackoff: { initialMs: 10, maxMs: 20 },
    logger: (level, message) => logs.push(`${level}: ${message}`),
    progressIntervalMs: 100,
    ...opts,
  });
  w.handle("hold", (ctx) => {
    const g = gate(ctx.actionId);
    ctx.signal.addEventListener("abort", () => g.reject(ctx.signal.reason));
    return g.promise;
  });
  w.handle("typed", () => {
    throw new ActionError("slow down", { type: "RateLimited" });
  });
  w.handle("plain", () => {
    throw new TypeError("no such thing");
  });
  w.handle("echo", (_ctx, inputs) => ({ value: inputs.input }));
  w.handle("ignore-abort", () => new Promise(() => {}));
  worker = w;
  running = w.run();
  return w;
}

beforeEach(async () => {
  coord = await FakeCoordinator.start();
  gates = new Map();
  logs.length = 0;
});

afterEach(async () => {
  worker?.stop("test over");
  await running;
  worker = undefined;
  running = undefined;
  coord.close();
});

test("Hello introduces the worker; heartbeats start at once and echo the acks heard", async () => {
  start({ labels: { zone: "a" } });
  const s = await coord.stream(0);
  const hello = await s.take("hello");
  assert.equal(hello.workerId, "ts-test");
  assert.equal(hello.slots, 2);
  assert.deepEqual(hello.handlers, ["echo", "hold", "ignore-abort", "plain", "typed"]);
  assert.deepEqual(hello.labels, { zone: "a" });
  assert.equal(hello.resumeToken, "");
  assert.deepEqual(hello.running, []);
  assert.ok(hello.hlc !== undefined && hello.hlc.physicalMs > 0n);
  assert.equal(s.seen("heartbeat").length, 0, "no heartbeat before Welcome");

  s.welcome({ heartbeatInterval: { seconds: 0n, nanos: 50_000_000 } });
  const hb1 = await s.take("heartbeat");
  assert.equal(hb1.sequence, 1n, "sequence starts at 1 (0 would be read as 'no heartbeat')");
  assert.equal(hb1.lastAckSequence, 0n, "0 before the first ack: it proves the Welcome");
  assert.equal(hb1.freeSlots, 2);
  s.send({ $case: "ack", value: { results: [], heartbeatSequence: 1n, refused: [] } });
  const echoed = await eventually("a heartbeat echoing ack 1", () =>
    s.seen("heartbeat").find((h) => h.lastAckSequence === 1n),
  );
  assert.ok(echoed.sequence > 1n);
  // A results-only ack (heartbeat_sequence 0) never lowers what is echoed.
  s.send({ $case: "ack", value: { results: [], heartbeatSequence: 0n, refused: [] } });
  const later = await eventually("a later heartbeat", () =>
    s.seen("heartbeat").find((h) => h.sequence > echoed.sequence + 1n),
  );
  assert.equal(later.lastAckSequence, 1n);
});

test("credits are deltas: results carry the slots they free, never more than were taken", async () => {
  start();
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome();
  await s.take("heartbeat");
  s.grant(1n, [lease("a", "hold"), lease("b", "hold")]);
  const started = await s.take("actionStarted");
  assert.deepEqual(
    started.leases.map((l) => l.leaseId),
    ["a", "b"],
  );
  gate("a").resolve({ n: 1 });
  const first = await s.take("actionFinished");
  assert.equal(first.credit, 1);
  assert.equal(first.results[0].outcome, ActionOutcome.ACTION_OUTCOME_SUCCEEDED);
  assert.equal(first.results[0].outputsJson, '{"n":1}');
  assert.equal(first.results[0].fencingToken, 1n);

  // Over-grant: a lease needing 2 slots with 1 free fails at once and credits nothing.
  s.grant(2n, [lease("big", "hold", { slots: 2 })]);
  const over = await s.take("actionFinished");
  assert.equal(over.results[0].leaseId, "big");
  assert.equal(over.results[0].outcome, ActionOutcome.ACTION_OUTCOME_FAILED);
  assert.equal(over.results[0].error?.code, Code.RESOURCE_EXHAUSTED);
  assert.equal(over.credit, 0);

  // A handler the worker does not serve took a slot: it comes back.
  s.grant(3n, [lease("who", "nobody")]);
  const unknown = await s.take("actionFinished");
  assert.equal(unknown.results[0].error?.code, Code.UNIMPLEMENTED);
  assert.equal(unknown.results[0].errorType, "", "the SDK's own failures carry no type");
  assert.equal(unknown.credit, 1);

  gate("b").resolve(undefined);
  const last = await s.take("actionFinished");
  assert.equal(last.credit, 1);
  assert.equal(last.results[0].outputsJson, "{}");
  assert.equal(s.seen("credit").length, 0, "every credit rode on a result");
  await eventually("every slot free", () => (worker!.freeSlots === 2 ? true : undefined));
});

test("results are kept until acked, re-sent after a reconnect without credit, then forgotten", async () => {
  start();
  const s0 = await coord.stream(0);
  await s0.take("hello");
  s0.welcome({ resumeToken: "secret-0" });
  s0.grant(1n, [
    lease("a", "hold", { token: 4n }),
    lease("r", "hold", { token: 2n }),
    lease("k", "hold", { token: 3n }),
  ]);
  await s0.take("actionStarted");
  gate("a").resolve({ ok: true });
  gate("r").resolve({});
  gate("k").resolve({});
  await eventually("three results", () =>
    s0.seen("actionFinished").flatMap((f) => f.results).length === 3 ? true : undefined,
  );
  // Not acked: the stream breaks.
  s0.end(14, "coordinator restarting");
  const s1 = await coord.stream(1);
  const hello = await s1.take("hello");
  assert.equal(hello.resumeToken, "secret-0");
  assert.deepEqual(
    hello.running.map((r) => [r.leaseId, r.fencingToken, r.slots]).sort(),
    [
      ["a", 4n, 0],
      ["k", 3n, 0],
      ["r", 2n, 0],
    ],
    "finished, unacked attempts are held with 0 slots",
  );
  s1.welcome({ adopted: hello.running });
  const again = await s1.take("actionFinished");
  assert.deepEqual(again.results.map((r) => r.leaseId).sort(), ["a", "k", "r"]);
  assert.equal(again.credit, 0, "Hello already accounted for those slots");
  // a: OK with the status unset; r: refused (FAILED_PRECONDITION: forget it); k: another code: keep.
  s1.send({
    $case: "ack",
    value: {
      heartbeatSequence: 0n,
      refused: [],
      results: [
        { leaseId: "a", fencingToken: 4n, status: undefined },
        {
          leaseId: "r",
          fencingToken: 2n,
          status: { code: Code.FAILED_PRECONDITION, message: "lease token 2 superseded by 3", details: [] },
        },
        { leaseId: "k", fencingToken: 3n, status: { code: 14, message: "not now", details: [] } },
      ],
    },
  });
  await eventually("only k left unacked", () => (worker!.unackedCount === 1 ? true : undefined));
  s1.send({
    $case: "ack",
    value: {
      heartbeatSequence: 0n,
      refused: [],
      results: [{ leaseId: "k", fencingToken: 3n, status: { code: 0, message: "", details: [] } }],
    },
  });
  await eventually("nothing unacked", () => (worker!.unackedCount === 0 ? true : undefined));
});

test("a result acked under another token is not forgotten", async () => {
  start();
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome();
  s.grant(1n, [lease("a", "echo", { token: 5n, input: 1 })]);
  await s.take("actionFinished");
  s.send({
    $case: "ack",
    value: { heartbeatSequence: 0n, refused: [], results: [{ leaseId: "a", fencingToken: 4n, status: undefined }] },
  });
  // Messages are handled in order: once b's result is out, the ack above has been handled.
  s.grant(2n, [lease("b", "echo", { input: 2 })]);
  await s.take("actionFinished");
  assert.equal(worker!.unackedCount, 2);
});

test("CancelLease aborts the handler's signal; the attempt reports CANCELLED and credits its slot", async () => {
  start();
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome();
  s.grant(1n, [lease("a", "hold")]);
  await s.take("actionStarted");
  s.send({
    $case: "cancelLease",
    value: { leases: [{ leaseId: "a", fencingToken: 1n, reason: CancelReason.CANCEL_REASON_USER, message: "user" }] },
  });
  const done = await s.take("actionFinished");
  assert.equal(done.results[0].outcome, ActionOutcome.ACTION_OUTCOME_CANCELLED);
  assert.equal(done.results[0].error?.code, Code.CANCELLED);
  assert.match(done.results[0].error?.message ?? "", /CANCEL_REASON_USER/);
  assert.equal(done.credit, 1);
});

test("a handler that ignores its abort signal is abandoned after the kill grace", async () => {
  start();
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome({ killGrace: { seconds: 0n, nanos: 100_000_000 } });
  s.grant(1n, [lease("stuck", "ignore-abort")]);
  await s.take("actionStarted");
  s.send({
    $case: "cancelLease",
    value: {
      leases: [{ leaseId: "stuck", fencingToken: 1n, reason: CancelReason.CANCEL_REASON_TIMEOUT, message: "" }],
    },
  });
  const done = await s.take("actionFinished");
  assert.equal(done.results[0].outcome, ActionOutcome.ACTION_OUTCOME_CANCELLED);
  assert.equal(done.credit, 1);
  assert.ok(logs.some((l) => /ignored its abort signal/.test(l)));
});

test("Welcome.kill: the attempt is aborted, its result dropped, its slot credited back", async () => {
  start();
  const s0 = await coord.stream(0);
  await s0.take("hello");
  s0.welcome();
  s0.grant(1n, [lease("a", "hold", { token: 1n }), lease("done", "echo", { token: 9n })]);
  await s0.take("actionStarted");
  await s0.take("actionFinished"); // done's result, never acked
  s0.end(14, "gone");
  const s1 = await coord.stream(1);
  const hello = await s1.take("hello");
  assert.deepEqual(
    hello.running.map((r) => [r.leaseId, r.slots]),
    [
      ["a", 1],
      ["done", 0],
    ],
  );
  s1.welcome({ kill: hello.running.map((r) => ({ ...r, slots: 0 })) });
  const credit = await s1.take("credit");
  assert.equal(credit.slots, 1, "Hello counted a's slot busy: it comes back");
  // A bare Credit means no result left in that flush (a result would have carried it).
  assert.equal(s1.seen("actionFinished").length, 0, "no result for a killed lease");
  assert.equal(worker!.unackedCount, 0);
  assert.deepEqual(worker!.running, []);
});

test("Ack.refused kills the attempt the coordinator says this session does not hold", async () => {
  start();
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome();
  s.grant(1n, [lease("a", "hold", { token: 2n })]);
  await s.take("actionStarted");
  s.send({
    $case: "ack",
    value: {
      heartbeatSequence: 0n,
      results: [],
      refused: [
        {
          leaseId: "a",
          fencingToken: 2n,
          status: { code: Code.FAILED_PRECONDITION, message: "LEASE_NOT_HELD", details: [] },
        },
      ],
    },
  });
  const done = await s.take("actionFinished");
  assert.equal(done.results[0].outcome, ActionOutcome.ACTION_OUTCOME_CANCELLED);
});

test("typed errors: ActionError's type and an Error's name travel as error_type with a google.rpc.Status", async () => {
  start();
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome();
  s.grant(1n, [lease("t", "typed"), lease("p", "plain")]);
  const results = await eventually("two results", () => {
    const all = s.seen("actionFinished").flatMap((f) => f.results);
    return all.length === 2 ? all : undefined;
  });
  const byId = Object.fromEntries(results.map((r) => [r.leaseId, r]));
  assert.equal(byId.t.outcome, ActionOutcome.ACTION_OUTCOME_FAILED);
  assert.equal(byId.t.errorType, "RateLimited");
  assert.deepEqual([byId.t.error?.code, byId.t.error?.message], [Code.UNKNOWN, "RateLimited: slow down"]);
  assert.equal(byId.p.errorType, "TypeError");
  assert.match(byId.p.stderrTail, /TypeError: no such thing/);
  assert.throws(() => new ActionError("x", { type: "bad\ntype" }), RangeError);
  assert.throws(() => new ActionError("x", { type: "é".repeat(129) }), RangeError);
  class RateLimited extends ActionError {}
  assert.equal(new RateLimited("x").type, "RateLimited");
});

test("progress: the latest details per lease, throttled, never after the result", async () => {
  const w = start({ progressIntervalMs: 200 });
  w.handle("report", async (ctx) => {
    for (let i = 0; i < 5; i++) ctx.progress({ i });
    await new Promise((r) => setTimeout(r, 50));
    ctx.progress({ i: 99 });
    await new Promise((r) => setTimeout(r, 300));
    return {};
  });
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome();
  s.grant(1n, [lease("p", "report")]);
  const first = await s.take("actionProgress");
  assert.deepEqual(
    first.leases.map((l) => [l.leaseId, l.detailsJson]),
    [["p", '{"i":4}']],
  );
  const second = await s.take("actionProgress");
  assert.equal(second.leases[0].detailsJson, '{"i":99}');
  await s.take("actionFinished");
  await new Promise((r) => setTimeout(r, 250));
  assert.equal(s.seen("actionProgress").length, 0);
});

test("HLC: every message is stamped after the coordinator stamps it has seen, even from 1 h ahead", async () => {
  const w = start();
  const s = await coord.stream(0);
  await s.take("hello");
  const ahead = { physicalMs: BigInt(Date.now() + 300), logical: 41 };
  s.welcome({ maxClockOffset: { seconds: 1n, nanos: 0 } }, ahead);
  const hb = await s.take("heartbeat");
  assert.ok(hb.hlc !== undefined && compareHlc(hb.hlc, ahead) > 0, "stamped after the Welcome it answers");
  assert.equal(w.stats.clockOffsetErrors, 0, "300 ms ahead is within the Welcome's 1 s");
  // The coordinator's clock is 1 h ahead of ours: the lease's stamp is merged all the same, so
  // the result is stamped after it; the disagreement is counted (and logged once a minute).
  const far = { physicalMs: BigInt(Date.now() + 3_600_000), logical: 0 };
  s.send({ $case: "leaseGrant", value: { sequence: 1n, leases: [lease("e", "echo", { input: "x" })] } }, far);
  const done = await s.take("actionFinished");
  assert.equal(w.stats.clockOffsetErrors, 1);
  assert.ok(done.hlc !== undefined && compareHlc(done.hlc, far) > 0);
  assert.ok(done.results[0].finishedHlc !== undefined && compareHlc(done.results[0].finishedHlc, far) > 0);
  assert.ok(logs.some((l) => /coordinator HLC: remote clock is \d+ ms ahead/.test(l)));
});

test("self-fencing: attempts are aborted at deadline - kill grace - one heartbeat, the stream dropped at the deadline", async () => {
  const clock = new ManualClock();
  const w = start({ clock });
  const s = await coord.stream(0);
  await s.take("hello");
  // TTL 2 s, heartbeat 250 ms, kill grace 250 ms: kill 1.5 s after Hello left, drop at 2 s.
  s.welcome({
    heartbeatInterval: { seconds: 60n, nanos: 0 },
    leaseTtl: { seconds: 2n, nanos: 0 },
    killGrace: { seconds: 0n, nanos: 250_000_000 },
  });
  await s.take("heartbeat");
  w.heartbeatMs = 250; // the margin; the real heartbeat timer stays at 60 s
  s.grant(1n, [lease("a", "hold")]);
  await s.take("actionStarted");
  clock.advance(1499);
  w.checkFence();
  assert.deepEqual(w.running, ["a"]);
  assert.equal(w.fenceDeadline, 1_000_000 + 2000, "Hello's send time + TTL");
  clock.advance(1);
  w.checkFence();
  const done = await s.take("actionFinished");
  assert.equal(done.results[0].outcome, ActionOutcome.ACTION_OUTCOME_CANCELLED);
  assert.match(done.results[0].error?.message ?? "", /self-fenced/);
  assert.equal(w.stats.selfFences, 1);
  assert.equal(s.ended, false);
  clock.advance(500);
  w.checkFence();
  await eventually("the stream dropped", () => (s.ended ? true : undefined));
  await coord.stream(1); // and a new one dialled
});

test("drain: no more credit, results acked, Goodbye, half-close; run() returns", async () => {
  const w = start();
  const s = await coord.stream(0);
  await s.take("hello");
  s.welcome();
  s.grant(1n, [lease("a", "hold")]);
  await s.take("actionStarted");
  s.send({ $case: "drain", value: { reason: "operator" } });
  await eventually("the drain heard", () => logs.some((l) => /draining \(coordinator: operator\)/.test(l)));
  gate("a").resolve({});
  const done = await s.take("actionFinished");
  assert.equal(done.credit, 0, "a draining worker credits nothing");
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(s.seen("goodbye").length, 0, "not before the result is acked");
  s.send({
    $case: "ack",
    value: { heartbeatSequence: 0n, refused: [], results: [{ leaseId: "a", fencingToken: 1n, status: undefined }] },
  });
  const bye = await s.take("goodbye");
  assert.equal(bye.reason, "drained");
  await eventually("the half-close", () => (s.ended ? true : undefined));
  s.end();
  await running;
  assert.equal(w.connected, false);
});

test("options are checked as the coordinator would", async () => {
  const base = { coordinator: "127.0.0.1:1", id: "w1", slots: 1 };
  assert.throws(() => new Worker({ ...base, id: "bad id!" }), RangeError);
  assert.throws(() => new Worker({ ...base, id: "a..b" }), RangeError);
  assert.throws(() => new Worker({ ...base, id: "-a" }), RangeError);
  assert.throws(() => new Worker({ ...base, slots: 0 }), RangeError);
  assert.throws(() => new Worker({ ...base, slots: 100_001 }), RangeError);
  assert.throws(() => new Worker({ ...base, coordinator: "10.0.0.1:7450", token: "t" }), RangeError);
  assert.doesNotThrow(() => new Worker({ ...base, token: "t" }));
  assert.throws(() => new Worker(base).handle("no spaces", () => ({})), RangeError);
  await assert.rejects(new Worker(base).run(), /at least one handler/);
});
