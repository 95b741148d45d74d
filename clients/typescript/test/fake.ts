/**
 * A scripted coordinator for the session tests: a real gRPC server on loopback serving
 * WorkerService.Connect, whose test reads what the worker sends and writes what the coordinator
 * would answer. Real sockets and the real wire encoding; the test decides every reply.
 */
import * as grpc from "@grpc/grpc-js";
import {
  type ConnectRequest,
  type ConnectResponse,
  type Lease,
  Lease as LeaseMsg,
  type Welcome,
  WorkerServiceService,
} from "../src/gen/plait/v1/worker_service";
import type { HlcTimestamp } from "../src/hlc";

type Case = NonNullable<ConnectRequest["message"]>["$case"];
type Of<K extends Case> = Extract<NonNullable<ConnectRequest["message"]>, { $case: K }>["value"];
/** A message's body with the envelope's HLC stamp. */
type Taken<K extends Case> = K extends Case ? Of<K> & { hlc?: HlcTimestamp } : never;

/** Waits for `probe` to return something other than undefined, or fails naming `what`. */
export async function eventually<T>(what: string, probe: () => T | undefined, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** One Connect call, as the coordinator sees it. */
export class FakeStream {
  readonly inbox: ConnectRequest[] = [];
  ended = false;
  private wake: () => void = () => {};

  constructor(private readonly call: grpc.ServerDuplexStream<ConnectRequest, ConnectResponse>) {
    call.sendMetadata(new grpc.Metadata());
    call.on("data", (msg: ConnectRequest) => {
      this.inbox.push(msg);
      this.wake();
    });
    call.on("end", () => {
      // The worker half-closed (after Goodbye): end the call, as the coordinator does.
      this.ended = true;
      call.end();
      this.wake();
    });
    call.on("error", () => {
      this.ended = true;
      this.wake();
    });
    call.on("cancelled", () => {
      this.ended = true;
      this.wake();
    });
  }

  /** Removes and returns the first message of kind `kind` (waiting for it); others stay. */
  async take<K extends Case>(kind: K, timeoutMs = 10_000): Promise<Taken<K>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.inbox.findIndex((m) => m.message?.$case === kind);
      if (i >= 0) {
        const [msg] = this.inbox.splice(i, 1);
        return { ...(msg.message!.value as object), hlc: msg.hlc } as unknown as Taken<K>;
      }
      if (Date.now() > deadline)
        throw new Error(
          `no ${kind} within ${timeoutMs} ms (inbox: ${this.inbox.map((m) => m.message?.$case).join(", ")})`,
        );
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(50, Math.max(1, deadline - Date.now())));
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  /** Messages of kind `kind` received so far (not removed). */
  seen<K extends Case>(kind: K): Of<K>[] {
    return this.inbox.filter((m) => m.message?.$case === kind).map((m) => m.message!.value as Of<K>);
  }

  send(message: ConnectResponse["message"], hlc?: HlcTimestamp): void {
    this.call.write({ hlc: hlc ?? { physicalMs: BigInt(Date.now()), logical: 0 }, message });
  }

  welcome(w: Partial<Welcome> = {}, hlc?: HlcTimestamp): void {
    const welcome: Welcome = {
      heartbeatInterval: { seconds: 60n, nanos: 0 },
      leaseTtl: { seconds: 120n, nanos: 0 },
      killGrace: { seconds: 0n, nanos: 200_000_000 },
      sessionId: "s-test",
      adopted: [],
      kill: [],
      resumeToken: "token-1",
      maxClockOffset: undefined,
      prefetch: 0,
      ...w,
    };
    this.send({ $case: "welcome", value: welcome }, hlc);
  }

  grant(sequence: bigint, leases: Lease[]): void {
    this.send({ $case: "leaseGrant", value: { sequence, leases } });
  }

  /** Ends the call: OK, or the given status. */
  end(code: grpc.status = grpc.status.OK, details = ""): void {
    if (code === grpc.status.OK) this.call.end();
    else this.call.emit("error", { code, details });
  }
}

/** The scripted coordinator. */
export class FakeCoordinator {
  readonly streams: FakeStream[] = [];
  private constructor(
    private readonly server: grpc.Server,
    readonly address: string,
  ) {}

  static async start(): Promise<FakeCoordinator> {
    const server = new grpc.Server();
    let fake: FakeCoordinator | undefined;
    const pending: FakeStream[] = [];
    server.addService(WorkerServiceService, {
      connect: (call: grpc.ServerDuplexStream<ConnectRequest, ConnectResponse>) => {
        const stream = new FakeStream(call);
        (fake ? fake.streams : pending).push(stream);
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) =>
        err ? reject(err) : resolve(p),
      ),
    );
    fake = new FakeCoordinator(server, `127.0.0.1:${port}`);
    fake.streams.push(...pending);
    return fake;
  }

  /** The `n`-th stream (from 0), once the worker has opened it. */
  stream(n: number): Promise<FakeStream> {
    return eventually(`stream #${n}`, () => this.streams[n]);
  }

  close(): void {
    this.server.forceShutdown();
  }
}

/** A lease of handler `handler`. */
export function lease(
  id: string,
  handler: string,
  opts: { token?: bigint; slots?: number; input?: unknown } = {},
): Lease {
  return LeaseMsg.fromPartial({
    leaseId: id,
    workflowId: "wf-1",
    actionId: id,
    attempt: 1,
    fencingToken: opts.token ?? 1n,
    action: { id, kind: { $case: "handler", value: handler }, slots: opts.slots ?? 0 },
    inputsJson: JSON.stringify({ input: opts.input ?? null, needs: {} }),
  });
}

/** A promise and the functions that settle it. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void; reject: (e: unknown) => void } {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}
