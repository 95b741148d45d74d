/**
 * What a handler sees and returns: its {@link ActionContext}, the lease's {@link Inputs}, and
 * the rules its outputs must keep (a JSON object within 1 MiB and 64 levels: the coordinator's
 * `outputs_problem`, checked here first so the failure names the handler).
 */
import { Code } from "./errors";
import { ActionOutcome } from "./gen/plait/v1/worker_service";
import type { AttemptOutcome } from "./attempts";

/** Largest outputs object a handler may return (the coordinator's default max_output_bytes). */
export const MAX_OUTPUT_BYTES = 1024 * 1024;
/** Deepest nesting of arrays and objects in outputs (max_json_depth). */
export const MAX_JSON_DEPTH = 64;
/** Largest progress details (LeaseProgress.details_json, UTF-8). */
export const MAX_PROGRESS_BYTES = 64 * 1024;

/** One needed action's outcome. */
export interface NeedResult {
  /** Its ActionState name, e.g. `ACTION_STATE_SUCCEEDED`. */
  state: string;
  outputs: Record<string, unknown>;
}

/** The lease's `inputs_json`, parsed. */
export interface Inputs {
  /** The action's static input (`ActionSpec.input_json`), or null. */
  input: unknown;
  /** Every needed action's outcome, by action id. */
  needs: Record<string, NeedResult>;
  /** A map child's item; absent for other actions. */
  item?: unknown;
}

/** What a running handler knows about its attempt, and how it reports. */
export interface ActionContext {
  readonly workflowId: string;
  readonly actionId: string;
  readonly attempt: number;
  readonly leaseId: string;
  /** The lease's fencing token: pass it to outside systems so they can refuse stale writers. */
  readonly fencingToken: bigint;
  /** Stable for every attempt of the action. */
  readonly idempotencyKey: string;
  /** W3C trace context of the attempt's span. */
  readonly traceparent: string;
  /**
   * Aborted when the attempt must stop: the coordinator cancelled the lease, the worker
   * self-fences, or it is stopping. Stop promptly: after the kill grace the attempt is
   * abandoned and its slot reused.
   */
  readonly signal: AbortSignal;
  /**
   * Reports progress (a JSON value up to 64 KiB); resets the action's heartbeat_timeout.
   * Batched: at most one report per lease leaves per progress interval, the latest.
   */
  progress(details?: unknown): void;
  /** Adds a line to the attempt's log (sent as its stdout tail, bounded). */
  log(line: string): void;
}

/** A handler: gets its context and inputs, returns its outputs (a JSON object, or nothing). */
export type Handler = (ctx: ActionContext, inputs: Inputs) => unknown;

/**
 * Parses `Lease.inputs_json` (`{"input": ..., "needs": {...}, "item": ...}`); when it is empty,
 * `ActionSpec.input_json` alone is the input.
 *
 * @throws SyntaxError or TypeError when the JSON is malformed or not shaped as the protocol says.
 */
export function parseInputs(inputsJson: string, inputJson = ""): Inputs {
  if (!inputsJson) return { input: inputJson ? JSON.parse(inputJson) : null, needs: {} };
  const doc: unknown = JSON.parse(inputsJson);
  if (!isObject(doc)) throw new TypeError("inputs_json must be a JSON object");
  const raw = doc.needs ?? {};
  if (!isObject(raw)) throw new TypeError("inputs_json.needs must be a JSON object");
  const needs: Record<string, NeedResult> = {};
  for (const [id, need] of Object.entries(raw)) {
    if (!isObject(need)) throw new TypeError(`inputs_json.needs.${id} must be a JSON object`);
    const outputs = need.outputs ?? {};
    needs[id] = { state: String(need.state ?? ""), outputs: isObject(outputs) ? outputs : { value: outputs } };
  }
  const inputs: Inputs = { input: doc.input ?? null, needs };
  if ("item" in doc) inputs.item = doc.item;
  return inputs;
}

/** The outcome for a handler's return value (undefined or null mean `{}`). */
export function outputsResult(out: unknown, stdoutTail = ""): AttemptOutcome {
  const failed = (error: string, code: number): AttemptOutcome => ({
    outcome: ActionOutcome.ACTION_OUTCOME_FAILED,
    error,
    code,
    stdoutTail,
  });
  const value = out ?? {};
  if (!isObject(value)) {
    const kind = Array.isArray(value) ? "an array" : typeof value;
    return failed(`handler returned ${kind}, not an object (JSON object) of outputs`, Code.INVALID_ARGUMENT);
  }
  let text: string;
  try {
    text = JSON.stringify(value);
  } catch (err) {
    return failed(`handler outputs are not JSON-serialisable: ${(err as Error).message}`, Code.INVALID_ARGUMENT);
  }
  const size = Buffer.byteLength(text, "utf8");
  if (size > MAX_OUTPUT_BYTES) {
    return failed(
      `handler outputs_json is ${size} bytes; the limit max_output_bytes is ${MAX_OUTPUT_BYTES}`,
      Code.RESOURCE_EXHAUSTED,
    );
  }
  if (depthOf(JSON.parse(text)) > MAX_JSON_DEPTH) {
    return failed(
      `handler outputs_json nests more than ${MAX_JSON_DEPTH} levels deep; the limit max_json_depth is ${MAX_JSON_DEPTH}`,
      Code.INVALID_ARGUMENT,
    );
  }
  return { outcome: ActionOutcome.ACTION_OUTCOME_SUCCEEDED, outputsJson: text, stdoutTail };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Levels of arrays and objects: `[]` is one, a scalar none. */
function depthOf(v: unknown): number {
  if (typeof v !== "object" || v === null) return 0;
  let deepest = 0;
  for (const child of Object.values(v)) deepest = Math.max(deepest, depthOf(child));
  return deepest + 1;
}
