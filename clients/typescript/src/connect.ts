/**
 * One `WorkerService.Connect` call on a channel of its own (the Python SDK's
 * `plait.worker.connect`). Every stream gets a fresh channel: a channel that failed keeps its
 * own subchannel backoff (gRPC's 1 s growing to 120 s) and would fail calls without dialling,
 * so the reconnect delay would be gRPC's, not the session's full-jitter backoff.
 */
import * as grpc from "@grpc/grpc-js";
import { type ConnectRequest, type ConnectResponse, WorkerServiceClient } from "./gen/plait/v1/worker_service";

/** TLS to the coordinator: PEM contents (not paths); `cert`+`key` prove the worker (mTLS). */
export interface TlsOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name the coordinator's certificate is checked against, when not the dialled host. */
  serverName?: string;
}

/** How to dial. */
export interface DialOptions {
  tls?: TlsOptions;
  /** Bearer token sent as `authorization` metadata on every Connect. */
  token?: string;
  maxMessageBytes: number;
  reconnectInitialMs: number;
  reconnectMaxMs: number;
}

/** How a stream ended. */
export interface StreamEnd {
  code: grpc.status;
  details: string;
  /** Why this side dropped it, when it did. */
  abortReason: string;
}

const pem = (v: string | Buffer | undefined) => (v === undefined ? null : Buffer.from(v));

/** One Connect call and its channel. */
export class Link {
  /** Resolves once the call has ended, whoever ended it. */
  readonly ended: Promise<StreamEnd>;
  private readonly client: WorkerServiceClient;
  private readonly call: grpc.ClientDuplexStream<ConnectRequest, ConnectResponse>;
  private abortReason = "";
  private gotMetadata = false;
  private isEnded = false;
  private writable = true;

  constructor(
    readonly address: string,
    dial: DialOptions,
    onMessage: (msg: ConnectResponse) => void,
  ) {
    const options: grpc.ClientOptions = {
      "grpc.max_send_message_length": dial.maxMessageBytes,
      "grpc.max_receive_message_length": dial.maxMessageBytes,
      "grpc.use_local_subchannel_pool": 1,
      "grpc.initial_reconnect_backoff_ms": Math.max(1, Math.round(dial.reconnectInitialMs)),
      "grpc.max_reconnect_backoff_ms": Math.max(1, Math.round(dial.reconnectMaxMs)),
    };
    let creds = grpc.credentials.createInsecure();
    if (dial.tls !== undefined) {
      creds = grpc.credentials.createSsl(pem(dial.tls.ca), pem(dial.tls.key), pem(dial.tls.cert));
      if (dial.tls.serverName) options["grpc.ssl_target_name_override"] = dial.tls.serverName;
    }
    this.client = new WorkerServiceClient(address, creds, options);
    const metadata = new grpc.Metadata();
    if (dial.token) metadata.set("authorization", `Bearer ${dial.token}`);
    this.call = this.client.connect(metadata);
    this.call.on("metadata", () => {
      this.gotMetadata = true;
    });
    this.call.on("data", onMessage);
    this.call.on("error", () => {}); // the status below says it all
    this.ended = new Promise((resolve) => {
      this.call.on("status", (s: grpc.StatusObject) => {
        this.isEnded = true;
        resolve({ code: s.code, details: s.details, abortReason: this.abortReason });
      });
    });
  }

  /**
   * Waits until the coordinator accepts the stream (its initial metadata), at most
   * `timeoutMs`, before Hello is written: a refusal (UNAUTHENTICATED, a standby's UNAVAILABLE)
   * then ends the call with its real status, where writing into a call being refused can turn
   * it into INTERNAL. False when the call ended instead.
   */
  async accepted(timeoutMs: number): Promise<boolean> {
    if (!this.gotMetadata && !this.isEnded) {
      let timer: NodeJS.Timeout | undefined;
      const metadata = new Promise<void>((resolve) => this.call.once("metadata", () => resolve()));
      const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)));
      await Promise.race([metadata, timeout, this.ended]);
      clearTimeout(timer);
    }
    return !this.isEnded;
  }

  /** Writes a message (dropped once the call has ended or was half-closed). */
  send(msg: ConnectRequest): void {
    if (this.writable && !this.isEnded) this.call.write(msg);
  }

  /** Half-closes: nothing more will be written. */
  halfClose(): void {
    if (this.writable && !this.isEnded) this.call.end();
    this.writable = false;
  }

  /** Cancels the call (once), remembering why. */
  abort(reason: string): void {
    if (this.abortReason || this.isEnded) return;
    this.abortReason = reason;
    this.call.cancel();
  }

  /** Closes the channel. */
  close(): void {
    this.client.close();
  }
}
