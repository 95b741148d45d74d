/**
 * Self-fencing: when a worker must kill its attempts. Pure bookkeeping, times (monotonic ms)
 * come in as arguments; the same rule as the Python SDK's `plait.worker.fence`.
 *
 * Each heartbeat's monotonic send time is remembered. The Ack that echoes heartbeat N moves the
 * fence deadline to `send_time(N) + lease_ttl` (a Welcome does the same for the Hello it
 * answers): the coordinator renewed the leases no earlier than it received that heartbeat, so
 * they cannot be given away before then. At `deadline - kill_grace - margin` (margin: one
 * heartbeat interval) every attempt is killed, connected or not; once the deadline itself has
 * passed the stream is dropped too.
 */

/** What one look at the fence decided. */
export interface FenceCheck {
  /** Kill every attempt not already being cancelled: its lease may be lost soon. */
  kill: boolean;
  /** Drop the stream: no heartbeat was acknowledged for a lease TTL. */
  abort: boolean;
  /** Ms until the fence should be looked at again. */
  nextCheckMs: number;
}

/** The fence deadline, from heartbeat send times and the acks that echo them. */
export class SelfFence {
  /** Monotonic ms by which every attempt must be dead unless a newer ack arrives. */
  deadline = -Infinity;
  private readonly sent = new Map<bigint, number>();

  /** Remembers when heartbeat `sequence` was sent (taken before the send). */
  heartbeatSent(sequence: bigint, at: number): void {
    this.sent.set(sequence, at);
  }

  /** Forgets unacknowledged heartbeats: their stream has ended. */
  forgetHeartbeats(): void {
    this.sent.clear();
  }

  /** A Welcome answers Hello: adopted leases are renewed no earlier than Hello left. */
  welcomed(helloSent: number, leaseTtlMs: number): void {
    this.deadline = Math.max(this.deadline, helloSent + leaseTtlMs);
  }

  /** An Ack echoed heartbeat `sequence` (0: it answers results only, and says nothing). */
  acked(sequence: bigint, leaseTtlMs: number): void {
    if (sequence === 0n) return;
    const at = this.sent.get(sequence);
    if (at === undefined) return;
    this.deadline = Math.max(this.deadline, at + leaseTtlMs);
    for (const s of [...this.sent.keys()]) if (s <= sequence) this.sent.delete(s);
  }

  /** Decides, at monotonic ms `now`, whether to kill attempts and drop the stream. */
  check(now: number, killGraceMs: number, marginMs: number, heartbeatMs: number): FenceCheck {
    const killAt = this.deadline - killGraceMs - marginMs;
    const nextCheckMs = killAt > now ? Math.min(killAt - now, heartbeatMs) : heartbeatMs;
    return { kill: now >= killAt, abort: now >= this.deadline, nextCheckMs };
  }
}
