/**
 * The worker's attempts and their results: what it runs, the slots they hold, and every result
 * until a ResultAck for its (lease, token) arrives (**ack means durable**: the session re-sends
 * unacked results after every reconnect). Mirrors the Python SDK's `plait.worker.attempts`.
 *
 * It sends nothing itself: it tells the session through {@link BookEvents} that an attempt
 * started, made progress or finished (with the slots it freed), and the session batches those
 * onto the stream.
 */
import type { Clock } from "./clock";
import { Code, errorTypeOf, errorTypeProblem } from "./errors";
import type { HybridLogicalClock } from "./hlc";
import { type ActionContext, type Handler, MAX_PROGRESS_BYTES, outputsResult, parseInputs } from "./handler";
import {
  ActionOutcome,
  type ActionResult,
  type Lease,
  type LeaseProgress,
  type LeaseReport,
  type ResultAck,
} from "./gen/plait/v1/worker_service";

/** Why the worker killed an attempt (the Python SDK's CancelCause). */
export type CancelCause = "cancelled" | "lease_lost" | "timeout" | "other";

/** How an attempt ended, before the book adds lease, token, duration and HLC. */
export interface AttemptOutcome {
  outcome: ActionOutcome;
  outputsJson?: string;
  error?: string;
  /** google.rpc code of `error`; defaults by outcome (FAILED: UNKNOWN, CANCELLED: CANCELLED). */
  code?: number;
  /** Sent with FAILED only: what `retryable_errors` matches. */
  errorType?: string;
  stdoutTail?: string;
  stderrTail?: string;
}

/** What the book tells the session. */
export interface BookEvents {
  started(report: LeaseReport): void;
  /** A result to send (undefined: dropped, see {@link Attempt.dropResult}) and the slots freed. */
  finished(result: ActionResult | undefined, freedSlots: number): void;
  progress(report: LeaseProgress): void;
  log(level: "info" | "warn" | "error", message: string): void;
}

const TAIL_CHARS = 4096;
const DEFAULT_CODE: Partial<Record<ActionOutcome, number>> = {
  [ActionOutcome.ACTION_OUTCOME_FAILED]: Code.UNKNOWN,
  [ActionOutcome.ACTION_OUTCOME_CANCELLED]: Code.CANCELLED,
  [ActionOutcome.ACTION_OUTCOME_TIMED_OUT]: Code.DEADLINE_EXCEEDED,
};

/** The key of a result: one per (lease, token). */
export const resultKey = (leaseId: string, token: bigint): string => `${leaseId}\u0000${token}`;

/** One running attempt. */
export class Attempt {
  readonly controller = new AbortController();
  done = false;
  cancelling = false;
  cause: CancelCause | "" = "";
  /** The coordinator said it will refuse this attempt's result (Welcome.kill): send none. */
  dropResult = false;
  killTimer: NodeJS.Timeout | undefined;
  readonly logLines: string[] = [];

  constructor(
    readonly leaseId: string,
    readonly token: bigint,
    public slots: number,
    readonly startedMs: number,
  ) {}

  /** The attempt's log (its stdout tail), bounded, newest last. */
  logTail(): string {
    return this.logLines.join("\n").slice(-TAIL_CHARS);
  }
}

/** Running attempts, the slots they hold, and results not yet acknowledged. */
export class AttemptBook {
  /** Running attempts by lease id. */
  readonly attempts = new Map<string, Attempt>();
  /** Slots held by running attempts. */
  used = 0;
  /** Results by (lease, token) until the coordinator acknowledges (or refuses) them. */
  readonly unacked = new Map<string, ActionResult>();

  constructor(
    readonly slots: number,
    readonly workerId: string,
    private readonly handlers: ReadonlyMap<string, Handler>,
    private readonly clock: Clock,
    private readonly hlc: HybridLogicalClock,
    private readonly killGraceMs: () => number,
    private readonly events: BookEvents,
  ) {}

  /** Every lease held: running attempts (with their slots), then unacked results (slots 0). */
  heldReports(): LeaseReport[] {
    const running = [...this.attempts.values()].map((a) => ({
      leaseId: a.leaseId,
      fencingToken: a.token,
      slots: a.slots,
    }));
    const finished = [...this.unacked.values()].map((r) => ({
      leaseId: r.leaseId,
      fencingToken: r.fencingToken,
      slots: 0,
    }));
    return [...running, ...finished];
  }

  /** Starts an attempt of a granted lease, or fails it at once when it cannot run here. */
  start(lease: Lease): void {
    const { leaseId, fencingToken: token } = lease;
    if (this.attempts.has(leaseId) || this.unacked.has(resultKey(leaseId, token))) {
      this.events.log("warn", `ignoring a second grant of lease ${leaseId} (token ${token})`);
      return;
    }
    const need = lease.action?.slots || 1; // ActionSpec.slots: 0 means the default, 1
    const att = new Attempt(leaseId, token, need, this.clock.monotonicMs());
    if (this.used + need > this.slots) {
      const free = this.slots - this.used;
      this.events.log(
        "error",
        `over-grant (protocol error): lease ${leaseId} needs ${need} slot(s), ${free} of ${this.slots} free`,
      );
      att.slots = 0; // it never held a slot, so no credit comes back for it
      const error = `worker ${this.workerId} was granted a lease needing ${need} slot(s) with ${free} of ${this.slots} free (over-grant)`;
      this.finish(att, { outcome: ActionOutcome.ACTION_OUTCOME_FAILED, error, code: Code.RESOURCE_EXHAUSTED });
      return;
    }
    this.attempts.set(leaseId, att);
    this.used += need;
    const kind = lease.action?.kind;
    const handler = kind?.$case === "handler" ? this.handlers.get(kind.value) : undefined;
    if (handler === undefined) {
      const error =
        kind?.$case === "handler"
          ? `worker ${this.workerId} does not serve handler ${JSON.stringify(kind.value)}`
          : kind?.$case === "exec"
            ? `worker ${this.workerId} does not run exec actions`
            : `action ${JSON.stringify(lease.action?.id ?? "")} has neither exec nor handler`;
      this.finish(att, { outcome: ActionOutcome.ACTION_OUTCOME_FAILED, error, code: Code.UNIMPLEMENTED });
      return;
    }
    this.events.started({ leaseId, fencingToken: token, slots: need });
    this.run(att, lease, handler);
  }

  private run(att: Attempt, lease: Lease, handler: Handler): void {
    const ctx: ActionContext = {
      workflowId: lease.workflowId,
      actionId: lease.actionId,
      attempt: lease.attempt,
      leaseId: lease.leaseId,
      fencingToken: lease.fencingToken,
      idempotencyKey: lease.idempotencyKey,
      traceparent: lease.traceparent,
      signal: att.controller.signal,
      progress: (details?: unknown) => this.progress(att, details),
      log: (line: string) => {
        att.logLines.push(String(line));
        while (att.logLines.length > 1 && att.logLines.join("\n").length > TAIL_CHARS) att.logLines.shift();
      },
    };
    // The handler runs on a later turn: a synchronous throw becomes a rejection like any other.
    Promise.resolve()
      .then(() => handler(ctx, parseInputs(lease.inputsJson, lease.action?.inputJson ?? "")))
      .then(
        (out) =>
          this.finish(
            att,
            att.controller.signal.aborted ? this.cancelledOutcome(att) : outputsResult(out, att.logTail()),
          ),
        (err: unknown) =>
          this.finish(
            att,
            att.controller.signal.aborted ? this.cancelledOutcome(att) : exceptionOutcome(err, att.logTail()),
          ),
      );
  }

  private cancelledOutcome(att: Attempt): AttemptOutcome {
    const reason = att.controller.signal.reason;
    const error = reason instanceof Error ? reason.message : String(reason ?? "cancelled");
    return { outcome: ActionOutcome.ACTION_OUTCOME_CANCELLED, error, stdoutTail: att.logTail() };
  }

  private progress(att: Attempt, details: unknown): void {
    const text = JSON.stringify(details ?? null);
    if (text === undefined) throw new TypeError("progress details are not JSON-serialisable");
    const size = Buffer.byteLength(text, "utf8");
    if (size > MAX_PROGRESS_BYTES)
      throw new RangeError(`progress details are ${size} bytes of JSON, over the 64 KiB limit`);
    if (att.done || this.attempts.get(att.leaseId) !== att) return; // its result has been sent
    this.events.progress({ leaseId: att.leaseId, fencingToken: att.token, detailsJson: text });
  }

  /**
   * Aborts the attempt's signal (once). The attempt reports when its handler settles; a
   * handler that ignores the signal is abandoned after kill grace (reported CANCELLED, its
   * slot freed), as a process that ignores SIGTERM is killed. False if none runs.
   */
  cancel(leaseId: string, reason: string, cause: CancelCause = "cancelled"): boolean {
    const att = this.attempts.get(leaseId);
    if (att === undefined) return false;
    if (att.cancelling || att.done) return true;
    att.cancelling = true;
    att.cause = cause;
    att.controller.abort(new Error(reason));
    att.killTimer = setTimeout(() => {
      this.events.log(
        "warn",
        `lease ${leaseId}: the handler ignored its abort signal for the kill grace; abandoning it`,
      );
      this.finish(att, this.cancelledOutcome(att));
    }, this.killGraceMs());
    return true;
  }

  /** Cancels every running attempt. */
  cancelAll(reason: string, cause: CancelCause = "other"): void {
    for (const leaseId of [...this.attempts.keys()]) this.cancel(leaseId, reason, cause);
  }

  /** Records how an attempt ended (once), keeps its result until acked, frees its slots. */
  finish(att: Attempt, o: AttemptOutcome): void {
    if (att.done) return;
    att.done = true;
    clearTimeout(att.killTimer);
    this.attempts.delete(att.leaseId);
    this.used -= att.slots;
    if (att.dropResult) {
      this.events.finished(undefined, att.slots);
      return;
    }
    const succeeded = o.outcome === ActionOutcome.ACTION_OUTCOME_SUCCEEDED;
    const ms = this.clock.monotonicMs() - att.startedMs;
    const result: ActionResult = {
      leaseId: att.leaseId,
      fencingToken: att.token,
      outcome: o.outcome,
      outputsJson: o.outputsJson || (succeeded ? "{}" : ""),
      error:
        !succeeded || o.error
          ? { code: o.code ?? DEFAULT_CODE[o.outcome] ?? Code.UNKNOWN, message: o.error ?? "", details: [] }
          : undefined,
      exitCode: 0,
      stdoutTail: o.stdoutTail ?? "",
      stderrTail: o.stderrTail ?? "",
      duration: { seconds: BigInt(Math.floor(ms / 1000)), nanos: Math.round((ms % 1000) * 1e6) },
      finishedHlc: this.hlc.now(),
      errorType:
        o.outcome === ActionOutcome.ACTION_OUTCOME_FAILED && o.errorType ? this.checkedType(att, o.errorType) : "",
    };
    this.unacked.set(resultKey(att.leaseId, att.token), result);
    this.events.finished(result, att.slots);
  }

  private checkedType(att: Attempt, type: string): string {
    const problem = errorTypeProblem(type); // the coordinator would end the stream over it
    if (problem === undefined) return type;
    this.events.log(
      "warn",
      `lease ${att.leaseId} (token ${att.token}): error type ${JSON.stringify(type.slice(0, 64))} ${problem}; sent without a type`,
    );
    return "";
  }

  /**
   * Forgets results the coordinator committed (status unset or OK) or refused
   * (FAILED_PRECONDITION: another attempt owns the action); keeps any other for a re-send.
   */
  acked(acks: readonly ResultAck[]): void {
    for (const ack of acks) {
      const key = resultKey(ack.leaseId, ack.fencingToken);
      if (!this.unacked.has(key)) continue;
      const code = ack.status?.code ?? Code.OK;
      if (code === Code.FAILED_PRECONDITION) {
        this.events.log(
          "warn",
          `result of lease ${ack.leaseId} (token ${ack.fencingToken}) refused: ${ack.status?.message ?? ""}`,
        );
      } else if (code !== Code.OK) {
        this.events.log(
          "warn",
          `result of lease ${ack.leaseId} (token ${ack.fencingToken}) not committed (code ${code}); keeping it`,
        );
        continue;
      }
      this.unacked.delete(key);
    }
  }

  /** Kills attempts whose start or progress was refused (Ack.refused: not held by this session). */
  refused(refusals: readonly ResultAck[]): void {
    for (const r of refusals) {
      const att = this.attempts.get(r.leaseId);
      if (att === undefined || (r.fencingToken !== 0n && r.fencingToken !== att.token)) continue;
      if (att.cancelling || att.done) continue;
      const why = r.status?.message || "lease not held by this session";
      this.events.log(
        "warn",
        `lease ${r.leaseId} (token ${att.token}) refused by the coordinator: ${why}; killing the attempt`,
      );
      this.cancel(r.leaseId, `refused by the coordinator: ${why}`, "lease_lost");
    }
  }
}

/** The FAILED outcome of a handler that threw: typed by ActionError.type or the Error's name. */
export function exceptionOutcome(err: unknown, stdoutTail = ""): AttemptOutcome {
  const errorType = errorTypeOf(err);
  const message = err instanceof Error ? err.message : String(err);
  const stack = err instanceof Error ? (err.stack ?? "") : "";
  return {
    outcome: ActionOutcome.ACTION_OUTCOME_FAILED,
    error: errorType ? `${errorType}: ${message}` : message,
    code: Code.UNKNOWN,
    errorType,
    stdoutTail,
    stderrTail: stack.slice(-TAIL_CHARS),
  };
}
