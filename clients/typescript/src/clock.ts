/**
 * The one place the SDK reads time. Everything else gets a {@link Clock}, so tests move time
 * by hand and a worker's wall clock can be skewed on purpose (`PLAIT_CLOCK_OFFSET`) to prove
 * that no timeout depends on it. Wall time feeds only the HLC; every duration (lease TTL,
 * fencing, backoff) is measured on the monotonic clock.
 */

/** A source of wall and monotonic time, both in milliseconds. */
export interface Clock {
  /** Unix time in ms (may jump; never use it for durations). */
  wallMs(): number;
  /** Ms on a clock that never goes backwards; only differences mean anything. */
  monotonicMs(): number;
}

/** The real clocks, with an optional wall-clock offset for skew tests. */
export class SystemClock implements Clock {
  constructor(readonly offsetMs = 0) {}
  wallMs(): number {
    return Date.now() + this.offsetMs;
  }
  monotonicMs(): number {
    return performance.now();
  }
}

/** A clock tests move by hand. */
export class ManualClock implements Clock {
  constructor(
    private wall = 1_700_000_000_000,
    private mono = 1_000_000,
  ) {}
  wallMs(): number {
    return this.wall;
  }
  monotonicMs(): number {
    return this.mono;
  }
  /** Moves both clocks forward. */
  advance(ms: number): void {
    this.mono += ms;
    this.wall += Math.trunc(ms);
  }
  /** Jumps the wall clock only (as NTP might). */
  setWallMs(ms: number): void {
    this.wall = ms;
  }
}

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Parses `250ms`, `2s`, `1.5m`, `1h30m` (a bare number means seconds) into ms. */
export function parseDurationMs(text: string, field = "duration"): number {
  const s = text.trim();
  const bad = new RangeError(`${field}: expected a duration such as 250ms, 2s or 5m, got ${JSON.stringify(text)}`);
  if (/^\d+(\.\d+)?$/.test(s)) return Number(s) * 1000;
  const part = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/y;
  let total = 0;
  let pos = 0;
  while (pos < s.length) {
    part.lastIndex = pos;
    const m = part.exec(s);
    if (!m) throw bad;
    total += Number(m[1]) * UNITS[m[2]];
    pos = part.lastIndex;
  }
  if (!s || !Number.isFinite(total)) throw bad;
  return total;
}

/**
 * A signed wall-clock offset in ms, as `PLAIT_CLOCK_OFFSET` gives it: `1h`, `-90s`, or plain
 * milliseconds (`-1500`), exactly as the Python SDK reads it.
 */
export function parseClockOffset(text: string, field = "PLAIT_CLOCK_OFFSET"): number {
  const s = text.trim();
  if (!s) return 0;
  const sign = s.startsWith("-") ? -1 : 1;
  const body = s.replace(/^[+-]+/, "").trim();
  if (/^\d+$/.test(body)) return sign * Number(body);
  return sign * Math.round(parseDurationMs(body, field));
}

/** The system clock, skewed by `PLAIT_CLOCK_OFFSET` when it is set. */
export function clockFromEnv(env: NodeJS.ProcessEnv = process.env): SystemClock {
  return new SystemClock(parseClockOffset(env.PLAIT_CLOCK_OFFSET ?? ""));
}
