/**
 * An example worker, and the TypeScript implementation the conformance suite (tests/conformance)
 * drives. It serves the four handlers every implementation under test serves
 * (tests/conformance/handlers.py has the Python ones):
 *
 * - `echo`: outputs `{"value": input}`, the action's static input as given;
 * - `sleep`: sleeps `input.seconds`, then outputs `{"slept": seconds}`; stops at once when its
 *   attempt is cancelled; an `input.seconds` that is not a number fails the attempt;
 * - `fail`: fails with the typed error `input.type` and message `input.message`;
 * - `progress`: reports progress every 100 ms for `input.seconds`, then outputs `{"reports": n}`.
 *
 * and one more for examples/polyglot.yaml, where Python handlers, exec actions and this worker
 * share a workflow:
 *
 * - `shout`: takes its need `merge`'s `top` (`[[word, count], ...]`) and outputs
 *   `{"shouted": ["WORD x3", ...], "by": "typescript"}`.
 *
 *     node dist/examples/worker.js --coordinator HOST:PORT --id ID --slots N \
 *         [--label KEY=VALUE ...] [--reconnect-backoff 50ms:1s]
 *
 * TLS and token from the environment, as the Python SDK reads them: PLAIT_TLS_CA, PLAIT_TLS_CERT,
 * PLAIT_TLS_KEY (paths), PLAIT_TLS_SERVER_NAME, PLAIT_TOKEN. PLAIT_CLOCK_OFFSET (`1h`, `-90s`)
 * skews the worker's wall clock for clock-skew tests. SIGTERM or SIGINT drains (finish, Goodbye,
 * exit 0); a second one stops at once.
 */
import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";
import { ActionError, type ActionContext, type TlsOptions, Worker, parseDurationMs } from "../src/index";

const PROGRESS_EVERY_MS = 100;

function seconds(input: unknown): number {
  const raw = typeof input === "object" && input !== null ? (input as Record<string, unknown>).seconds : undefined;
  if (typeof raw !== "number" || !Number.isFinite(raw) || raw < 0) {
    throw new TypeError(`input.seconds must be a non-negative number, got ${JSON.stringify(raw) ?? "nothing"}`);
  }
  return raw;
}

/** Registers the conformance handlers on `worker`. */
export function serveExamples(worker: Worker): Worker {
  return worker
    .handle("echo", (_ctx, { input }) => ({ value: input }))
    .handle("sleep", async (ctx: ActionContext, { input }) => {
      const s = seconds(input);
      await sleep(s * 1000, undefined, { signal: ctx.signal });
      return { slept: s };
    })
    .handle("fail", (_ctx, { input }) => {
      const spec = (typeof input === "object" && input !== null ? input : {}) as Record<string, unknown>;
      throw new ActionError(String(spec.message ?? ""), { type: String(spec.type ?? "") });
    })
    .handle("shout", (_ctx, { needs }) => {
      const merged = needs.merge?.outputs as { top?: [string, number][] } | undefined;
      const top = merged?.top ?? [];
      return { shouted: top.map(([word, n]) => `${word.toUpperCase()} x${n}`), by: "typescript" };
    })
    .handle("progress", async (ctx: ActionContext, { input }) => {
      const s = seconds(input);
      const began = performance.now();
      let reports = 0;
      for (let elapsed = 0; elapsed < s * 1000; elapsed = performance.now() - began) {
        ctx.progress({ elapsed_s: Math.round(elapsed) / 1000, reports });
        reports += 1;
        await sleep(PROGRESS_EVERY_MS, undefined, { signal: ctx.signal });
      }
      return { reports };
    });
}

function tlsFromEnv(env: NodeJS.ProcessEnv): TlsOptions | undefined {
  if (!env.PLAIT_TLS_CA) return undefined;
  const read = (path: string | undefined) => (path ? readFileSync(path) : undefined);
  return {
    ca: read(env.PLAIT_TLS_CA),
    cert: read(env.PLAIT_TLS_CERT),
    key: read(env.PLAIT_TLS_KEY),
    serverName: env.PLAIT_TLS_SERVER_NAME,
  };
}

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      coordinator: { type: "string", default: "127.0.0.1:7450" },
      id: { type: "string" },
      slots: { type: "string", default: "1" },
      label: { type: "string", multiple: true, default: [] },
      "reconnect-backoff": { type: "string", default: "50ms:1s" },
    },
  });
  if (!values.id) throw new RangeError("--id is required");
  const labels = Object.fromEntries(
    (values.label ?? []).map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]),
  );
  const [initial, max] = (values["reconnect-backoff"] ?? "").split(":");
  const worker = serveExamples(
    new Worker({
      coordinator: values.coordinator ?? "",
      id: values.id,
      slots: Number(values.slots),
      labels,
      tls: tlsFromEnv(process.env),
      token: process.env.PLAIT_TOKEN || undefined,
      reconnectBackoff: {
        initialMs: parseDurationMs(initial, "--reconnect-backoff"),
        maxMs: parseDurationMs(max, "--reconnect-backoff"),
      },
    }),
  );
  let signals = 0;
  const onSignal = (name: string) => {
    signals += 1;
    if (signals === 1) worker.drain(`${name} received`);
    else worker.stop(`${name} received again`);
  };
  process.on("SIGTERM", () => onSignal("SIGTERM"));
  process.on("SIGINT", () => onSignal("SIGINT"));
  await worker.run();
  return 0;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`worker: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exit(2);
    },
  );
}
