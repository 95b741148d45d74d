import assert from "node:assert/strict";
import { test } from "node:test";
import { SelfFence } from "../src/fence";

const TTL = 2000;
const GRACE = 250;
const HB = 250;

test("no deadline before a Welcome: kill and abort at once (nothing may run unproven)", () => {
  const c = new SelfFence().check(1000, GRACE, HB, HB);
  assert.equal(c.kill, true);
  assert.equal(c.abort, true);
});

test("Welcome proves leases until Hello's send time + TTL", () => {
  const f = new SelfFence();
  f.welcomed(1000, TTL);
  assert.equal(f.deadline, 3000);
  assert.equal(f.check(3000 - GRACE - HB - 1, GRACE, HB, HB).kill, false);
  const atKill = f.check(3000 - GRACE - HB, GRACE, HB, HB);
  assert.deepEqual([atKill.kill, atKill.abort], [true, false]);
  assert.equal(f.check(3000, GRACE, HB, HB).abort, true);
});

test("an ack moves the deadline from the heartbeat's send time, not the ack's arrival", () => {
  const f = new SelfFence();
  f.welcomed(0, TTL);
  f.heartbeatSent(1n, 100);
  f.heartbeatSent(2n, 350);
  f.acked(2n, TTL); // arrives much later: irrelevant
  assert.equal(f.deadline, 350 + TTL);
  f.acked(1n, TTL); // older, and forgotten once 2 was acked: never moves it back
  assert.equal(f.deadline, 350 + TTL);
});

test("an ack of 0 (results only) or of an unknown heartbeat says nothing", () => {
  const f = new SelfFence();
  f.welcomed(0, TTL);
  f.heartbeatSent(1n, 500);
  f.acked(0n, TTL);
  f.acked(7n, TTL);
  assert.equal(f.deadline, TTL);
  f.forgetHeartbeats(); // the stream ended: its heartbeats prove nothing any more
  f.acked(1n, TTL);
  assert.equal(f.deadline, TTL);
});

test("the next check comes at the kill time or one heartbeat, whichever is first", () => {
  const f = new SelfFence();
  f.welcomed(0, TTL);
  assert.equal(f.check(0, GRACE, HB, HB).nextCheckMs, HB);
  assert.equal(f.check(1400, GRACE, HB, HB).nextCheckMs, 100);
  assert.equal(f.check(1600, GRACE, HB, HB).nextCheckMs, HB);
});
