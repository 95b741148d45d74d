/**
 * End to end: a real coordinator (`plait coordinator` from the repo's venv, the system tests'
 * profile: heartbeat 250 ms, lease TTL 2 s, kill grace 250 ms) and this SDK's Worker in this
 * process run a workflow of TypeScript handlers to success: a chain that passes outputs through
 * `needs`, and a typed failure retried by `retryable_errors`.
 *
 * Skipped when the venv is missing (PLAIT_BIN overrides the path); under CI (env CI set) that
 * fails instead.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { test } from "node:test";
import * as grpc from "@grpc/grpc-js";
import { ActionState, WorkflowState, type WorkflowStatus } from "../src/gen/plait/v1/workflow";
import {
  GetWorkflowResponse,
  SubmitWorkflowRequest,
  WorkflowServiceClient,
} from "../src/gen/plait/v1/workflow_service";
import { ActionError, Worker } from "../src/index";
import { eventually } from "./fake";

const ROOT = path.resolve(__dirname, "../../../..");
const PLAIT = process.env.PLAIT_BIN ?? path.join(ROOT, ".venv", "bin", "plait");

function startCoordinator(dir: string): { proc: ChildProcess; ready: string; log: () => string } {
  const ready = path.join(dir, "ready.json");
  const logPath = path.join(dir, "coordinator.log");
  const argv = [
    "coordinator",
    "--listen",
    "127.0.0.1:0",
    "--store",
    `sqlite:///${dir}/plait.db`,
    "--metrics-listen",
    "off",
  ];
  argv.push("--heartbeat-interval", "250ms", "--lease-ttl", "2s", "--kill-grace", "250ms", "--ready-file", ready);
  const out = openSync(logPath, "a");
  const proc = spawn(PLAIT, argv, { stdio: ["ignore", out, out] });
  return { proc, ready, log: () => (existsSync(logPath) ? readFileSync(logPath, "utf8").slice(-4000) : "") };
}

test("a workflow of TypeScript handlers runs to success on a real coordinator", async (t) => {
  if (!existsSync(PLAIT)) {
    const why = `${PLAIT} is missing (make venv)`;
    if (process.env.CI) assert.fail(`${why}; CI must have it`);
    t.skip(why);
    return;
  }
  const dir = mkdtempSync(path.join(tmpdir(), "plait-ts-e2e-"));
  const coordinator = startCoordinator(dir);
  let exited = false;
  coordinator.proc.on("exit", () => (exited = true));
  let worker: Worker | undefined;
  let running: Promise<void> | undefined;
  let client: WorkflowServiceClient | undefined;
  try {
    const address = await eventually(
      "the coordinator's ready file",
      () => {
        if (exited) throw new Error(`the coordinator exited before it was ready:\n${coordinator.log()}`);
        try {
          const ready = JSON.parse(readFileSync(coordinator.ready, "utf8")) as { grpc: string; role?: string };
          // A coordinator may come up as a standby first: ready for work only as the leader.
          return (ready.role ?? "leader") === "leader" ? ready.grpc : undefined;
        } catch {
          return undefined;
        }
      },
      60_000,
    );
    worker = new Worker({ coordinator: address, id: "ts-e2e", slots: 2, logger: () => {} });
    worker
      .handle("greet", (_ctx, { input }) => ({ greeting: `hello, ${(input as { name: string }).name}` }))
      .handle("shout", (ctx, { needs }) => {
        ctx.progress({ step: "shouting" });
        return { loud: String(needs.greet.outputs.greeting).toUpperCase() };
      })
      .handle("flaky", (ctx) => {
        if (ctx.attempt === 1) throw new ActionError("try again", { type: "Transient" });
        return { attempt: ctx.attempt };
      });
    running = worker.run();

    client = new WorkflowServiceClient(address, grpc.credentials.createInsecure());
    const c = client;
    const handler = (name: string) => ({ $case: "handler" as const, value: name });
    const request = SubmitWorkflowRequest.fromPartial({
      spec: {
        name: "ts-e2e",
        actions: [
          { id: "greet", kind: handler("greet"), inputJson: JSON.stringify({ name: "plait" }) },
          { id: "shout", kind: handler("shout"), needs: ["greet"] },
          {
            id: "flaky",
            kind: handler("flaky"),
            retry: {
              maxAttempts: 3,
              initialBackoff: { seconds: 0n, nanos: 50_000_000 },
              retryableErrors: ["Transient"],
            },
          },
        ],
      },
    });
    const submitted = await new Promise<string>((resolve, reject) =>
      c.submitWorkflow(request, (err, res) => (err ? reject(err) : resolve(res.workflowId))),
    );
    const terminal = new Set([
      WorkflowState.WORKFLOW_STATE_SUCCEEDED,
      WorkflowState.WORKFLOW_STATE_FAILED,
      WorkflowState.WORKFLOW_STATE_CANCELLED,
    ]);
    let status: WorkflowStatus | undefined;
    const deadline = Date.now() + 60_000;
    while (status === undefined || !terminal.has(status.state)) {
      assert.ok(
        Date.now() < deadline,
        `workflow not finished in time: ${JSON.stringify(status?.actions.map((a) => [a.actionId, a.state]))}`,
      );
      status = await new Promise<WorkflowStatus>((resolve, reject) =>
        c.getWorkflow(
          { hlc: undefined, workflowId: submitted, pageSize: 0, pageToken: "", states: [] },
          (err, res: GetWorkflowResponse) => (err ? reject(err) : resolve(res.workflow!)),
        ),
      );
      if (!terminal.has(status.state)) await new Promise((r) => setTimeout(r, 50));
    }
    const actions = Object.fromEntries(status.actions.map((a) => [a.actionId, a]));
    assert.equal(status.state, WorkflowState.WORKFLOW_STATE_SUCCEEDED, `${status.reason}\n${coordinator.log()}`);
    assert.deepEqual(JSON.parse(actions.shout.outputsJson), { loud: "HELLO, PLAIT" });
    assert.equal(actions.flaky.state, ActionState.ACTION_STATE_SUCCEEDED);
    assert.equal(actions.flaky.attempt, 2, "the typed failure was retried");
    assert.equal(actions.greet.workerId, "ts-e2e");

    worker.drain("test over");
    await running;
    running = undefined;
  } finally {
    worker?.stop("test over");
    await running;
    client?.close();
    coordinator.proc.kill("SIGTERM");
    if (!exited) await new Promise((r) => coordinator.proc.once("exit", r));
    rmSync(dir, { recursive: true, force: true });
  }
});
