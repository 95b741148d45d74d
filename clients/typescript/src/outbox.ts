/**
 * What the session sends next, batched per event-loop turn (the Python SDK's `Outbox`): start
 * reports, results, freed slots and the latest progress report per lease.
 *
 * **Credits are deltas.** After a Hello the coordinator takes the free capacity to be
 * `Hello.slots - sum(slots of Hello.running)`; from then on every freed slot goes back exactly
 * once, riding on `ActionFinished.credit` when results leave in the same turn, else in a
 * `Credit`. A new Hello resets the ledger ({@link Outbox.reset}); a draining worker credits
 * nothing; a result re-sent after a reconnect carries no credit (Hello accounted for it).
 */
import type { ActionResult, ConnectRequest, LeaseProgress, LeaseReport } from "./gen/plait/v1/worker_service";

/** ActionFinished / ActionProgress chunks stay well under the 4 MiB message limit. */
const BATCH_BYTES = 3 << 20;

/** What one flush sends. */
export interface OutboxBatch {
  started: LeaseReport[];
  finished: ActionResult[];
  /** Slots freed since the last credit (0 while draining). */
  credit: number;
}

/** Start reports, results, freed slots and progress of one loop turn. */
export class Outbox {
  private started: LeaseReport[] = [];
  private finished: ActionResult[] = [];
  private credit = 0;
  private readonly progressByLease = new Map<string, LeaseProgress>();

  /** Slots freed but not yet credited. */
  get pendingCredit(): number {
    return this.credit;
  }

  get hasProgress(): boolean {
    return this.progressByLease.size > 0;
  }

  addStarted(report: LeaseReport): void {
    this.started.push(report);
  }

  /** A result (if one is to be sent) and the slots its attempt freed. */
  addFinished(result: ActionResult | undefined, freedSlots: number): void {
    this.credit += freedSlots;
    if (result !== undefined) {
      this.finished.push(result);
      this.progressByLease.delete(result.leaseId); // moot once the result is out
    }
  }

  /** Queues a progress report; a newer one for the same lease replaces it. */
  addProgress(report: LeaseProgress): void {
    this.progressByLease.delete(report.leaseId);
    this.progressByLease.set(report.leaseId, report);
  }

  takeProgress(): LeaseProgress[] {
    const reports = [...this.progressByLease.values()];
    this.progressByLease.clear();
    return reports;
  }

  /** A draining worker takes no new work: it credits nothing. */
  forgetCredit(): void {
    this.credit = 0;
  }

  /** The queued results were just re-sent with every other unacked one. */
  forgetResults(): void {
    this.finished = [];
  }

  /** No stream to send on: the next Hello (running) and the re-send after Welcome cover them. */
  forgetReports(): void {
    this.started = [];
    this.finished = [];
    this.progressByLease.clear();
  }

  /** A new Hello: the coordinator's ledger restarts from it. */
  reset(): void {
    this.forgetReports();
    this.credit = 0;
  }

  /** Empties the outbox into what to send now. */
  take(draining: boolean): OutboxBatch {
    const done = new Set(this.finished.map((r) => r.leaseId));
    // A result implies its start: an attempt that already finished needs no start report.
    const started = this.started.filter((s) => !done.has(s.leaseId));
    const batch = { started, finished: this.finished, credit: draining ? 0 : this.credit };
    this.started = [];
    this.finished = [];
    this.credit = 0;
    return batch;
  }
}

/** Results in ActionFinished messages under the size limit; `credit` rides with the first. */
export function resultMessages(results: readonly ActionResult[], credit = 0): ConnectRequest[] {
  const size = (r: ActionResult) =>
    r.outputsJson.length + r.stdoutTail.length + r.stderrTail.length + (r.error?.message.length ?? 0) + 128;
  return chunks(results, size).map((batch, i) => ({
    hlc: undefined,
    message: {
      $case: "actionFinished",
      value: { results: batch, credit: i === 0 ? credit : 0, started: [] },
    },
  }));
}

/** Progress reports in ActionProgress messages under the size limit. */
export function progressMessages(reports: readonly LeaseProgress[]): ConnectRequest[] {
  const size = (p: LeaseProgress) => p.detailsJson.length + p.leaseId.length + 32;
  return chunks(reports, size).map((leases) => ({
    hlc: undefined,
    message: { $case: "actionProgress", value: { leases } },
  }));
}

function chunks<T>(items: readonly T[], size: (item: T) => number): T[][] {
  const out: T[][] = [];
  let batch: T[] = [];
  let bytes = 0;
  for (const item of items) {
    const n = size(item);
    if (batch.length > 0 && bytes + n > BATCH_BYTES) {
      out.push(batch);
      batch = [];
      bytes = 0;
    }
    batch.push(item);
    bytes += n;
  }
  if (batch.length > 0) out.push(batch);
  return out;
}
