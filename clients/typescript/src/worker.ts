/**
 * The worker's session: `WorkerService.Connect` as docs/protocol.md specifies it, with the
 * Python SDK's `plait.worker.session` as the reference behaviour.
 *
 * - **Hello / Welcome.** Each stream opens on a fresh channel, waits for the coordinator to
 *   accept it, and sends Hello with every lease still held (`running`) and the last Welcome's
 *   `resume_token`. Welcome sets the heartbeat interval, lease TTL and kill grace; its `kill`
 *   list is killed at once and those results dropped.
 * - **Heartbeats** right after Welcome, then every interval: every lease held, the highest grant
 *   sequence processed, an increasing `sequence`, and `last_ack_sequence` (the highest
 *   Ack.heartbeat_sequence heard on this stream: the coordinator leases nothing to a session
 *   that does not echo recent acks).
 * - **Credits are deltas** ({@link Outbox}); **results are kept until acked** and re-sent
 *   after every reconnect ({@link AttemptBook}).
 * - **Self-fencing** ({@link SelfFence}): from the send time of the last acked heartbeat plus
 *   the TTL; at `deadline - kill_grace - one interval` every handler's signal is aborted, at the
 *   deadline the stream is dropped.
 * - **Drain**: no more credit, finish, get results acked, Goodbye, half-close.
 * - **Reconnect** with full-jitter exponential backoff ({@link Backoff}).
 * - **HLC**: every message stamped, every coordinator stamp merged ({@link HybridLogicalClock}).
 */
import * as os from "node:os";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { AttemptBook, type CancelCause, resultKey } from "./attempts";
import { Backoff } from "./backoff";
import { type Clock, clockFromEnv } from "./clock";
import { type DialOptions, Link, type StreamEnd, type TlsOptions } from "./connect";
import { SelfFence } from "./fence";
import {
  CancelReason,
  type Ack,
  type ConnectRequest,
  type ConnectResponse,
  type LeaseGrant,
  type Welcome,
} from "./gen/plait/v1/worker_service";
import type { Duration } from "./gen/google/protobuf/duration";
import type { Handler } from "./handler";
import { ClockOffsetError, HybridLogicalClock, type HlcTimestamp } from "./hlc";
import { Outbox, progressMessages, resultMessages } from "./outbox";

export const AGENT = "plait-typescript/0.1.0";
/** The coordinator's id rule (plait.ids), for worker ids and handler names alike. */
const ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
const ID_RULE = "must be 1 to 128 of [A-Za-z0-9_.-], start with a letter or digit, no '..'";
const isId = (s: string) => ID.test(s) && !s.includes("..");
const MAX_SLOTS = 100_000;
const OFFSET_LOG_EVERY_MS = 60_000;
const CANCEL_CAUSES: Partial<Record<CancelReason, CancelCause>> = {
  [CancelReason.CANCEL_REASON_USER]: "cancelled",
  [CancelReason.CANCEL_REASON_SUPERSEDED]: "lease_lost",
  [CancelReason.CANCEL_REASON_TIMEOUT]: "timeout",
  [CancelReason.CANCEL_REASON_UNKNOWN_LEASE]: "lease_lost",
};

export type Logger = (level: "info" | "warn" | "error", message: string) => void;

export interface WorkerOptions {
  /** `HOST:PORT` of the coordinator, or several comma-separated (tried in turn). */
  coordinator: string;
  /** Stable, unique worker id. */
  id: string;
  /** Slots: how many attempts (of ActionSpec.slots 1) run at once. */
  slots: number;
  labels?: Record<string, string>;
  /** Amounts offered (`{"cpu": 8, "gpu": 2}`), matched against ActionSpec.resources. */
  resources?: Record<string, number>;
  tls?: TlsOptions;
  token?: string;
  reconnectBackoff?: { initialMs: number; maxMs: number };
  /** Default: the system clock skewed by `PLAIT_CLOCK_OFFSET`. */
  clock?: Clock;
  /** Warn when a coordinator HLC stamp is further ahead of our wall clock (default 500; Welcome sets it). */
  maxClockOffsetMs?: number;
  /** At most one ActionProgress per this many ms (default 500). */
  progressIntervalMs?: number;
  /** Give up on a stream whose Welcome has not come after Hello (default 3000). */
  welcomeTimeoutMs?: number;
  /** Wait this long for the coordinator to end the stream after Goodbye (default 5000). */
  closeTimeoutMs?: number;
  maxMessageBytes?: number;
  agent?: string;
  logger?: Logger;
  /** Jitter source for the backoff (tests). */
  random?: () => number;
}

/** Counters, for tests and the curious. */
export interface WorkerStats {
  connects: number;
  heartbeatsSent: number;
  resultsSent: number;
  selfFences: number;
  clockOffsetErrors: number;
}

const ms = (d: Duration | undefined, fallback: number) =>
  d === undefined ? fallback : Number(d.seconds) * 1000 + d.nanos / 1e6;
const defaultLogger: Logger = (level, message) => process.stderr.write(`plait-worker ${level}: ${message}\n`);

/** A worker serving named handlers to a Plait coordinator. */
export class Worker {
  readonly stats: WorkerStats = { connects: 0, heartbeatsSent: 0, resultsSent: 0, selfFences: 0, clockOffsetErrors: 0 };
  /** Timing from the last Welcome (these defaults until then). */
  heartbeatMs = 5000;
  leaseTtlMs = 30_000;
  killGraceMs = 10_000;
  sessionId = "";

  private readonly handlers = new Map<string, Handler>();
  private readonly clock: Clock;
  private readonly hlc: HybridLogicalClock;
  private readonly backoff: Backoff;
  private readonly fence = new SelfFence();
  private readonly outbox = new Outbox();
  private readonly book: AttemptBook;
  private readonly log: Logger;
  private link: Link | undefined;
  private welcomed = false;
  private resumeToken = "";
  private helloSentAt = 0;
  private hbSeq = 0n;
  private lastGrantSeq = 0n;
  private lastAckSeq = 0n;
  private draining = false;
  private stopping = false;
  private done = false;
  private markDone: () => void = () => {};
  private readonly finished = new Promise<void>((resolve) => (this.markDone = resolve));
  private flushScheduled = false;
  private nextProgressAt = -Infinity;
  private lastOffsetLog = -Infinity;
  private timers: Record<"heartbeat" | "fence" | "welcome" | "progress" | "close", NodeJS.Timeout | undefined> = {
    heartbeat: undefined,
    fence: undefined,
    welcome: undefined,
    progress: undefined,
    close: undefined,
  };

  constructor(private readonly opts: WorkerOptions) {
    if (!isId(opts.id)) throw new RangeError(`worker id ${JSON.stringify(opts.id)} ${ID_RULE}`);
    if (!Number.isInteger(opts.slots) || opts.slots < 1 || opts.slots > MAX_SLOTS) {
      throw new RangeError(`slots must be an integer from 1 to ${MAX_SLOTS}, got ${opts.slots}`);
    }
    if (opts.token && !opts.tls && !opts.coordinator.split(",").every(isLoopback)) {
      throw new RangeError("a token must not travel in plaintext beyond loopback: give tls options too");
    }
    this.clock = opts.clock ?? clockFromEnv();
    this.hlc = new HybridLogicalClock(this.clock, opts.maxClockOffsetMs ?? 500);
    this.backoff = new Backoff(
      opts.reconnectBackoff?.initialMs ?? 200,
      opts.reconnectBackoff?.maxMs ?? 10_000,
      opts.random,
    );
    this.log = opts.logger ?? defaultLogger;
    this.book = new AttemptBook(opts.slots, opts.id, this.handlers, this.clock, this.hlc, () => this.killGraceMs, {
      started: (report) => {
        this.outbox.addStarted(report);
        this.scheduleFlush();
      },
      finished: (result, freed) => this.onFinished(result, freed),
      progress: (report) => {
        this.outbox.addProgress(report);
        this.scheduleFlush();
      },
      log: this.log,
    });
  }

  /** Serves `handler` as ActionSpec.handler `name`. */
  handle(name: string, handler: Handler): this {
    if (!isId(name)) throw new RangeError(`handler name ${JSON.stringify(name)} ${ID_RULE}`);
    if (this.handlers.has(name)) throw new RangeError(`handler ${JSON.stringify(name)} is already registered`);
    this.handlers.set(name, handler);
    return this;
  }

  /** Whether a stream is up and welcomed. */
  get connected(): boolean {
    return this.welcomed;
  }
  /** Slots not held by a running attempt. */
  get freeSlots(): number {
    return this.opts.slots - this.book.used;
  }
  /** Lease ids of running attempts. */
  get running(): string[] {
    return [...this.book.attempts.keys()];
  }
  /** Results not yet acknowledged. */
  get unackedCount(): number {
    return this.book.unacked.size;
  }
  /** Monotonic ms by which every attempt must be dead unless a newer ack arrives. */
  get fenceDeadline(): number {
    return this.fence.deadline;
  }

  /** Takes no new work; finishes what runs, gets results acked, says Goodbye; run() returns. */
  drain(reason = "drain requested"): void {
    if (this.draining) return;
    this.draining = true;
    this.outbox.forgetCredit();
    this.log(
      "info",
      `draining (${reason}): ${this.book.attempts.size} attempt(s) running, ${this.book.unacked.size} result(s) awaiting ack`,
    );
    this.maybeFinish();
  }

  /** Aborts every running attempt and leaves as soon as they have ended (no ack wait). */
  stop(reason = "worker stopping"): void {
    if (this.stopping) return;
    this.stopping = true;
    this.draining = true;
    this.outbox.forgetCredit();
    this.book.cancelAll(reason);
    this.maybeFinish();
  }

  /** Serves until drained or stopped, reconnecting after every stream failure. */
  async run(): Promise<void> {
    // The coordinator refuses a Hello that serves nothing: it would be refused forever.
    if (this.handlers.size === 0)
      throw new RangeError("a worker must serve at least one handler: call handle() before run()");
    const addresses = this.opts.coordinator
      .split(",")
      .map((a) => a.trim())
      .filter(Boolean);
    this.scheduleFence(0);
    try {
      for (let i = 0; !this.done; i++) {
        const end = await this.serveOnce(addresses[i % addresses.length]);
        if (this.done) break;
        this.logEnd(addresses[i % addresses.length], end);
        const delay = this.backoff.nextDelayMs();
        this.log("info", `reconnecting to ${addresses[(i + 1) % addresses.length]} in ${(delay / 1000).toFixed(2)}s`);
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([new Promise((r) => (timer = setTimeout(r, delay))), this.finished]);
        clearTimeout(timer);
      }
    } finally {
      for (const t of Object.values(this.timers)) clearTimeout(t);
    }
  }

  // ----------------------------------------------------------------- one stream

  private async serveOnce(address: string): Promise<StreamEnd> {
    const dial: DialOptions = {
      tls: this.opts.tls,
      token: this.opts.token,
      maxMessageBytes: this.opts.maxMessageBytes ?? 4 << 20,
      reconnectInitialMs: this.backoff.initialMs,
      reconnectMaxMs: this.backoff.maxMs,
    };
    const link: Link = new Link(address, dial, (msg) => this.receive(link, msg));
    this.link = link;
    try {
      const welcomeMs = this.opts.welcomeTimeoutMs ?? 3000;
      if ((await link.accepted(Math.min(1000, welcomeMs))) && !this.done) {
        this.sendHello(link);
        this.timers.welcome = setTimeout(() => link.abort(`no Welcome within ${welcomeMs} ms`), welcomeMs);
      } else {
        link.abort("worker leaving");
      }
      return await link.ended;
    } finally {
      clearTimeout(this.timers.welcome);
      clearTimeout(this.timers.heartbeat);
      this.link = undefined;
      this.welcomed = false;
      this.fence.forgetHeartbeats();
      link.close();
    }
  }

  private send(link: Link, message: ConnectRequest["message"]): void {
    link.send({ hlc: this.hlc.now(), message });
  }

  private sendHello(link: Link): void {
    // The coordinator's ledger restarts from this Hello: slots - running.
    this.outbox.reset();
    this.lastGrantSeq = 0n;
    this.lastAckSeq = 0n;
    this.fence.forgetHeartbeats();
    this.helloSentAt = this.clock.monotonicMs();
    this.send(link, {
      $case: "hello",
      value: {
        workerId: this.opts.id,
        labels: { ...this.opts.labels },
        slots: this.opts.slots,
        handlers: [...this.handlers.keys()].sort(),
        execEnabled: false,
        running: this.book.heldReports(),
        agent: this.opts.agent ?? AGENT,
        hostname: os.hostname(),
        // No prefetch and no batches: this worker takes only what it credited, one message at
        // a time (protocol.md, "Prefetch").
        prefetch: 0,
        acceptsBatch: false,
        resources: { ...this.opts.resources },
        resumeToken: this.resumeToken,
      },
    });
  }

  private onWelcome(link: Link, w: Welcome): void {
    clearTimeout(this.timers.welcome);
    this.heartbeatMs = ms(w.heartbeatInterval, this.heartbeatMs);
    this.leaseTtlMs = ms(w.leaseTtl, this.leaseTtlMs);
    this.killGraceMs = ms(w.killGrace, this.killGraceMs);
    if (w.maxClockOffset !== undefined) this.hlc.maxOffsetMs = Math.max(1, Math.round(ms(w.maxClockOffset, 500)));
    this.sessionId = w.sessionId;
    this.resumeToken = w.resumeToken;
    // Welcome answers Hello: every lease it adopts was renewed no earlier than Hello left.
    this.fence.welcomed(this.helloSentAt, this.leaseTtlMs);
    for (const k of w.kill) {
      // Superseded or unknown: kill it and drop its result (it would be refused); its slots,
      // counted busy by Hello.running, come back as credit.
      this.book.unacked.delete(resultKey(k.leaseId, k.fencingToken));
      const att = this.book.attempts.get(k.leaseId);
      if (att !== undefined) att.dropResult = true;
      this.book.cancel(k.leaseId, "the coordinator does not adopt this lease (superseded or unknown)", "lease_lost");
    }
    this.welcomed = true;
    this.backoff.reset();
    this.stats.connects += 1;
    this.log(
      "info",
      `connected to ${link.address} as ${this.opts.id} (session ${this.sessionId}): heartbeat ${this.heartbeatMs} ms, lease TTL ${this.leaseTtlMs} ms, kill grace ${this.killGraceMs} ms; ${w.adopted.length} adopted, ${w.kill.length} killed, ${this.book.unacked.size} result(s) to re-send`,
    );
    const unacked = [...this.book.unacked.values()];
    if (unacked.length > 0) this.sendResults(link, unacked, 0);
    this.outbox.forgetResults();
    this.flush();
    this.heartbeat(link);
    this.scheduleFence(0);
    this.maybeFinish();
  }

  private heartbeat(link: Link): void {
    if (this.link !== link || !this.welcomed) return;
    this.hbSeq += 1n;
    // Taken before the send, so the fence deadline derived from it is never late.
    this.fence.heartbeatSent(this.hbSeq, this.clock.monotonicMs());
    this.stats.heartbeatsSent += 1;
    this.send(link, {
      $case: "heartbeat",
      value: {
        leases: this.book.heldReports(),
        lastGrantSequence: this.lastGrantSeq,
        freeSlots: Math.max(0, this.freeSlots),
        sequence: this.hbSeq,
        lastAckSequence: this.lastAckSeq,
      },
    });
    this.timers.heartbeat = setTimeout(() => this.heartbeat(link), this.heartbeatMs);
  }

  private sendResults(link: Link, results: ConnectRequestResults, credit: number): void {
    for (const msg of resultMessages(results, credit)) this.send(link, msg.message);
    this.stats.resultsSent += results.length;
  }

  // ----------------------------------------------------------------- incoming

  private receive(link: Link, msg: ConnectResponse): void {
    if (link !== this.link) return; // a late message on a stream already given up
    this.observe(msg.hlc);
    const m = msg.message;
    if (!this.welcomed) {
      if (m?.$case === "welcome") this.onWelcome(link, m.value);
      else link.abort(`protocol error: expected Welcome, got ${m?.$case ?? "nothing"}`);
      return;
    }
    switch (m?.$case) {
      case "ack":
        return this.onAck(m.value);
      case "leaseGrant":
        return this.onGrant(m.value);
      case "cancelLease":
        for (const c of m.value.leases) {
          const why = `cancelled by the coordinator (${CancelReason[c.reason] ?? c.reason}) ${c.message}`.trim();
          this.book.cancel(c.leaseId, why, CANCEL_CAUSES[c.reason] ?? "cancelled");
        }
        return;
      case "drain":
        return this.drain(`coordinator: ${m.value.reason || "drain"}`);
      default:
        this.log("warn", `ignoring a coordinator message (${m?.$case ?? "empty"}) on session ${this.sessionId}`);
    }
  }

  private observe(stamp: HlcTimestamp | undefined): void {
    try {
      this.hlc.observe(stamp);
    } catch (err) {
      if (!(err instanceof ClockOffsetError)) throw err;
      // Merged all the same: the coordinator's stamps order the history, and this worker's
      // reports must come after the leases that caused them. The warning says the clocks disagree.
      this.hlc.observe(stamp, false);
      this.stats.clockOffsetErrors += 1;
      const now = this.clock.monotonicMs();
      if (now - this.lastOffsetLog >= OFFSET_LOG_EVERY_MS) {
        this.lastOffsetLog = now;
        this.log(
          "warn",
          `coordinator HLC: ${err.message} (${this.stats.clockOffsetErrors} in all; logged at most once a minute)`,
        );
      }
    }
  }

  private onAck(ack: Ack): void {
    // Echoed in the next heartbeat: the coordinator's proof that this session hears it.
    if (ack.heartbeatSequence > this.lastAckSeq) this.lastAckSeq = ack.heartbeatSequence;
    this.fence.acked(ack.heartbeatSequence, this.leaseTtlMs);
    this.book.acked(ack.results);
    this.book.refused(ack.refused);
    this.maybeFinish();
  }

  private onGrant(grant: LeaseGrant): void {
    for (const lease of grant.leases) this.book.start(lease);
    if (grant.sequence > this.lastGrantSeq) this.lastGrantSeq = grant.sequence;
  }

  // ----------------------------------------------------------------- outgoing batches

  private onFinished(result: Parameters<Outbox["addFinished"]>[0], freed: number): void {
    this.outbox.addFinished(result, this.draining ? 0 : freed);
    this.scheduleFlush();
    if (this.book.attempts.size === 0) this.maybeFinish();
  }

  /** Everything that happens in this loop turn leaves together on the next one. */
  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => this.flush());
  }

  private flush(): void {
    this.flushScheduled = false;
    const link = this.welcomed ? this.link : undefined;
    if (link === undefined) {
      // Covered after the next Welcome: Hello.running and the re-send of unacked results.
      this.outbox.forgetReports();
      return;
    }
    const { started, finished, credit } = this.outbox.take(this.draining);
    if (started.length > 0) this.send(link, { $case: "actionStarted", value: { leases: started } });
    if (this.outbox.hasProgress) this.flushProgress(link);
    // The credit rides with the results, so the coordinator can lease the next actions in the
    // same commit (ActionFinished.credit).
    if (finished.length > 0) this.sendResults(link, finished, credit);
    else if (credit > 0) this.send(link, { $case: "credit", value: { slots: credit } });
  }

  private flushProgress(link: Link): void {
    const now = this.clock.monotonicMs();
    if (now < this.nextProgressAt) {
      this.timers.progress ??= setTimeout(() => {
        this.timers.progress = undefined;
        this.scheduleFlush();
      }, this.nextProgressAt - now);
      return;
    }
    this.nextProgressAt = now + (this.opts.progressIntervalMs ?? 500);
    for (const msg of progressMessages(this.outbox.takeProgress())) this.send(link, msg.message);
  }

  private maybeFinish(): void {
    if (this.done || !this.draining || this.book.attempts.size > 0) return;
    if (this.book.unacked.size > 0 && !this.stopping) return;
    this.flush();
    const link = this.link;
    if (link !== undefined && this.welcomed) {
      this.send(link, { $case: "goodbye", value: { reason: this.stopping ? "stopping" : "drained" } });
      link.halfClose();
      const wait = this.stopping
        ? Math.min(1000, this.opts.closeTimeoutMs ?? 5000)
        : (this.opts.closeTimeoutMs ?? 5000);
      this.timers.close = setTimeout(() => link.abort("the coordinator did not end the stream after Goodbye"), wait);
    } else {
      link?.abort("worker leaving");
    }
    this.log("info", `${this.stopping ? "stopped" : "drained"}: leaving`);
    this.done = true;
    this.markDone();
  }

  // ----------------------------------------------------------------- self-fencing

  /** Kills attempts whose leases may be lost soon; returns ms until the next check. */
  checkFence(): number {
    const now = this.clock.monotonicMs();
    const check = this.fence.check(now, this.killGraceMs, this.heartbeatMs, this.heartbeatMs);
    if (check.kill) {
      const victims = [...this.book.attempts.values()].filter((a) => !a.cancelling);
      if (victims.length > 0) {
        this.stats.selfFences += 1;
        const left = Math.max(0, this.fence.deadline - now) / 1000;
        this.log(
          "warn",
          `self-fencing: no heartbeat acknowledged in time (leases may be lost in ${left.toFixed(2)}s); killing ${victims.length} attempt(s)`,
        );
        for (const a of victims)
          this.book.cancel(a.leaseId, "self-fenced: the lease could not be renewed in time", "lease_lost");
      }
    }
    if (check.abort && this.welcomed)
      this.link?.abort(`no heartbeat acknowledged for a lease TTL (${this.leaseTtlMs} ms)`);
    return check.nextCheckMs;
  }

  private scheduleFence(delayMs: number): void {
    clearTimeout(this.timers.fence);
    if (this.done) return;
    this.timers.fence = setTimeout(() => this.scheduleFence(this.checkFence()), Math.max(delayMs, 5));
  }

  private logEnd(address: string, end: StreamEnd): void {
    const code =
      end.code === GrpcStatus.OK ? "closed by the coordinator" : (GrpcStatus[end.code] ?? `status ${end.code}`);
    this.log("warn", `stream to ${address} ended (${end.abortReason || `${code}: ${end.details}`})`);
  }
}

type ConnectRequestResults = Parameters<typeof resultMessages>[0];

function isLoopback(address: string): boolean {
  const host = address
    .trim()
    .replace(/:\d+$/, "")
    .replace(/^\[|\]$/g, "");
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}
