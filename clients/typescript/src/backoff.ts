/**
 * Reconnect backoff: exponential with full jitter (AWS Architecture Blog, "Exponential Backoff
 * And Jitter"), so a fleet of workers that lost the coordinator at one moment do not all come
 * back in lock-step. The same rule as the Python SDK's `plait.worker.backoff`.
 */

/** Delays `uniform(0, min(maxMs, initialMs * 2**n))` for the n-th failure in a row. */
export class Backoff {
  private failures = 0;

  constructor(
    readonly initialMs = 200,
    readonly maxMs = 10_000,
    private readonly random: () => number = Math.random,
  ) {
    if (!(initialMs > 0)) throw new RangeError(`backoff initialMs must be positive, got ${initialMs}`);
    if (!(maxMs >= initialMs)) throw new RangeError(`backoff maxMs ${maxMs} is below its initialMs ${initialMs}`);
  }

  /** Failures since the last {@link reset}. */
  get failureCount(): number {
    return this.failures;
  }

  /** The upper bound of the next delay, in ms. */
  ceilingMs(): number {
    return Math.min(this.maxMs, this.initialMs * 2 ** Math.min(this.failures, 62));
  }

  /** Ms to wait before the next try; each call counts one more failure. */
  nextDelayMs(): number {
    const delay = this.random() * this.ceilingMs();
    this.failures += 1;
    return delay;
  }

  /** After a success (a Welcome): the next failure starts from `initialMs` again. */
  reset(): void {
    this.failures = 0;
  }
}
