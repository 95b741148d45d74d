/**
 * Typed handler failures and the google.rpc codes results use.
 *
 * A handler throws {@link ActionError} to fail its attempt with a type of its choosing: it
 * travels as `ActionResult.error_type`, which `RetryPolicy.retryable_errors` matches exactly.
 * Any other Error is typed by its `name` (`TypeError`, or the class name of a subclass). The
 * message is for people and is never parsed. Mirrors the Python SDK's `plait.ActionError`.
 */

/** The google.rpc.Code values results and acks use (fixed by google/rpc/code.proto). */
export const Code = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
} as const;

/** Longest `ActionResult.error_type`, in UTF-8 bytes (a fixed protocol limit). */
export const MAX_ERROR_TYPE_BYTES = 256;

/**
 * Why `type` may not travel as `ActionResult.error_type`, or undefined if it may: at most 256
 * UTF-8 bytes and no control characters (the coordinator ends the stream on anything else).
 */
export function errorTypeProblem(type: string): string | undefined {
  const size = Buffer.byteLength(type, "utf8");
  if (size > MAX_ERROR_TYPE_BYTES) return `is ${size} bytes; the limit is ${MAX_ERROR_TYPE_BYTES} bytes`;
  if (/[\p{Cc}\p{Cs}]/u.test(type)) {
    return `has a control character (or a lone surrogate); it must be at most ${MAX_ERROR_TYPE_BYTES} bytes without control characters`;
  }
  return undefined;
}

/**
 * Thrown by a handler to fail its attempt with a type a retry policy can match:
 * `throw new ActionError("the mirror said 429", { type: "RateLimited" })`. Without `type` the
 * type is the class name, so `class RateLimited extends ActionError {}` is typed `RateLimited`.
 *
 * @throws RangeError when the type is over 256 UTF-8 bytes or has a control character.
 */
export class ActionError extends Error {
  readonly type: string;

  constructor(message: string, options: { type?: string; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    const chosen = options.type || new.target.name;
    const problem = errorTypeProblem(chosen);
    if (problem !== undefined)
      throw new RangeError(`ActionError type ${JSON.stringify(chosen.slice(0, 64))} ${problem}`);
    this.type = chosen;
  }
}

/** The error type of anything a handler threw: an ActionError's type, else the Error's name. */
export function errorTypeOf(err: unknown): string {
  if (err instanceof ActionError) return err.type;
  if (err instanceof Error) return err.name || err.constructor.name;
  return "";
}
