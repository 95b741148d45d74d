import assert from "node:assert/strict";
import { test } from "node:test";
import { Backoff } from "../src/backoff";

test("full jitter: each delay is uniform below a ceiling that doubles up to the maximum", () => {
  const b = new Backoff(100, 1000, () => 0.999999);
  const delays = Array.from({ length: 6 }, () => b.nextDelayMs());
  const ceilings = [100, 200, 400, 800, 1000, 1000];
  delays.forEach((d, i) => assert.ok(d < ceilings[i] && d > ceilings[i] * 0.99, `delay ${i}: ${d}`));
  assert.equal(b.failureCount, 6);
});

test("jitter reaches down to zero", () => {
  const b = new Backoff(100, 1000, () => 0);
  assert.equal(b.nextDelayMs(), 0);
});

test("reset after a Welcome starts from the initial ceiling again", () => {
  const b = new Backoff(100, 1000, () => 0.5);
  for (let i = 0; i < 5; i++) b.nextDelayMs();
  b.reset();
  assert.equal(b.ceilingMs(), 100);
  assert.equal(b.nextDelayMs(), 50);
});

test("the ceiling does not overflow after many failures", () => {
  const b = new Backoff(100, 10_000, () => 1);
  for (let i = 0; i < 2000; i++) b.nextDelayMs();
  assert.equal(b.ceilingMs(), 10_000);
});

test("bad bounds are refused", () => {
  assert.throws(() => new Backoff(0, 10), RangeError);
  assert.throws(() => new Backoff(100, 50), RangeError);
});
