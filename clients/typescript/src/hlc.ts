/**
 * Hybrid logical clocks (Kulkarni et al., 2014), as docs/protocol.md "Hybrid logical clocks"
 * and the Python SDK's `plait.hlc` define them. Every ConnectRequest is stamped with
 * {@link HybridLogicalClock.now}; every ConnectResponse's stamp is merged with
 * {@link HybridLogicalClock.observe}, so a result is always stamped after the lease that caused
 * it, whatever the hosts' wall clocks say. `physical_ms` is a uint64 on the wire: a bigint here.
 */
import type { Clock } from "./clock";
import type { HlcTimestamp } from "./gen/plait/v1/hlc";

export type { HlcTimestamp };

/** Orders two readings: negative, zero or positive, as (physical_ms, logical) pairs order. */
export function compareHlc(a: HlcTimestamp, b: HlcTimestamp): number {
  if (a.physicalMs !== b.physicalMs) return a.physicalMs < b.physicalMs ? -1 : 1;
  return a.logical - b.logical;
}

/** `physical.logical` with a zero-padded logical part, as the Python SDK prints readings. */
export function formatHlc(ts: HlcTimestamp): string {
  return `${ts.physicalMs}.${String(ts.logical).padStart(4, "0")}`;
}

/** A remote reading too far ahead of our wall clock to merge. */
export class ClockOffsetError extends Error {
  constructor(
    readonly remote: HlcTimestamp,
    readonly offsetMs: bigint,
    readonly maxOffsetMs: number,
  ) {
    super(`remote clock is ${offsetMs} ms ahead (max_clock_offset ${maxOffsetMs} ms); not merged`);
    this.name = "ClockOffsetError";
  }
}

/** A hybrid logical clock over an injected wall clock. */
export class HybridLogicalClock {
  private l = 0n;
  private c = 0;

  constructor(
    private readonly clock: Clock,
    /** How far ahead of our wall clock a bounded merge accepts (a Welcome may set it). */
    public maxOffsetMs = 500,
  ) {}

  /** The latest reading handed out or merged, without advancing. */
  get last(): HlcTimestamp {
    return { physicalMs: this.l, logical: this.c };
  }

  /** Advances for a send (or local) event and returns the new reading. */
  now(): HlcTimestamp {
    const pt = BigInt(Math.floor(this.clock.wallMs()));
    if (pt > this.l) {
      this.l = pt;
      this.c = 0;
    } else {
      this.c += 1;
    }
    return this.last;
  }

  /**
   * Merges a received reading; the new reading is above both the local and the remote one.
   * An unset stamp (`physical_ms` 0, or none) only advances the clock. `bounded: false` merges
   * a reading however far ahead it is: a worker merges its coordinator's stamps so, because
   * the coordinator orders the history and a report must come after the lease that caused it.
   *
   * @throws ClockOffsetError when bounded and the remote reading is more than `maxOffsetMs`
   *   ahead of our wall clock; nothing is merged then.
   */
  observe(remote: HlcTimestamp | undefined, bounded = true): HlcTimestamp {
    if (remote === undefined || remote.physicalMs === 0n) return this.now();
    const pt = BigInt(Math.floor(this.clock.wallMs()));
    const rl = remote.physicalMs;
    if (bounded && rl - pt > BigInt(this.maxOffsetMs)) throw new ClockOffsetError(remote, rl - pt, this.maxOffsetMs);
    const old = this.l;
    const next = [old, rl, pt].reduce((a, b) => (b > a ? b : a));
    if (next === old && next === rl) this.c = Math.max(this.c, remote.logical) + 1;
    else if (next === old) this.c += 1;
    else if (next === rl) this.c = remote.logical + 1;
    else this.c = 0;
    this.l = next;
    return this.last;
  }
}
