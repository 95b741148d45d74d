/** @plait/worker: serve TypeScript handlers to a Plait coordinator (docs/protocol.md). */
export { Worker, AGENT, type WorkerOptions, type WorkerStats, type Logger } from "./worker";
export { ActionError, Code, errorTypeProblem, MAX_ERROR_TYPE_BYTES } from "./errors";
export type { ActionContext, Handler, Inputs, NeedResult } from "./handler";
export type { TlsOptions } from "./connect";
export { type Clock, SystemClock, ManualClock, parseClockOffset, parseDurationMs, clockFromEnv } from "./clock";
export { HybridLogicalClock, ClockOffsetError, compareHlc, formatHlc, type HlcTimestamp } from "./hlc";
export { Backoff } from "./backoff";
export { SelfFence, type FenceCheck } from "./fence";
