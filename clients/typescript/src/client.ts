/** A tenant's client of the mesh: hands messages in at their doors (signed, content sealed),
 * follows a task live, and believes nothing it has not verified against the trust bundle.
 * A port of `examples/submit_with_nats_py.py` and `meshctl.client.TenantClient`. */
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import {
  connect,
  credsAuthenticator,
  headers as natsHeaders,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  type NodeConnectionOptions,
  type Subscription,
} from "@nats-io/transport-node";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { CONTRACTS, type ControlCancel, type ProgressEvent, type TaskCompleted, type TaskFailed, type TaskLimits, type TaskPolicy, type TaskRejected, type TaskSubmitted, type TokenDelta } from "./contracts.js";
import { ContractError, FollowTimeout, IdentityError, MeshError } from "./errors.js";
import { DoorAck, handIn, type HandInOptions } from "./door.js";
import { dataKey, openFields, sealFields } from "./sealing.js";
import { contractFor, doorOf, subjectOf } from "./subjects.js";
import { canonicalJson, Signer, TrustBundle, Verifier } from "./tokens.js";

export interface ClientOptions {
  /** `nats://host:port`, a comma-separated list, or a list (a cluster's seeds). */
  servers: string | string[];
  tenant: string;
  /** The tenant client's NATS credentials (`secrets/creds/client.<tenant>.creds`), or their text. */
  credsFile?: string;
  creds?: string;
  /** Its Ed25519 signing key, PKCS#8 PEM (`secrets/keys/client.<tenant>.pem`), or the PEM. */
  signingKeyFile?: string;
  signingKeyPem?: string;
  /** Its data key, 64 hex digits (`secrets/keys/data.<tenant>.key`), or the file. Without one
   * nothing can be sealed or opened: a submission's goal must be sealed, so submit needs it. */
  dataKeyFile?: string;
  dataKeyHex?: string;
  /** The trust bundle: a path (re-read once when a token does not verify: a rotation publishes
   * newer keys there) or the parsed bundle document. */
  trustBundle: string | object;
  /** The mesh's CA certificate (`tls/ca.pem`), a path or the PEM: the broker's certificate is
   * verified against it (it is not among the system's CAs). */
  caFile?: string;
  ca?: string;
  connectTimeoutMs?: number;
  /** Anything else for nats.js's `connect` (e.g. `reconnectTimeWait`, `reconnectToServer`). */
  natsOptions?: Partial<NodeConnectionOptions>;
}

/** The options for `tenant`'s client from a mesh home (`meshctl init`'s layout). */
export function fromHome(home: string, tenant: string, servers: string | string[]): ClientOptions {
  const principal = `client.${tenant}`;
  return {
    servers,
    tenant,
    credsFile: join(home, "secrets", "creds", `${principal}.creds`),
    signingKeyFile: join(home, "secrets", "keys", `${principal}.pem`),
    dataKeyFile: join(home, "secrets", "keys", `data.${tenant}.key`),
    trustBundle: join(home, "trust-bundle.json"),
    caFile: join(home, "tls", "ca.pem"),
  };
}

/** The only inbox a principal may read (`mesh_kit.settings.inbox_prefix`). */
export const inboxPrefix = (principal: string): string => `_INBOX_${principal.replaceAll(".", "_").replaceAll("-", "_")}`;

/** A verified message, its sealed fields opened. */
export interface Received<T = Record<string, unknown>> {
  subject: string;
  /** Its schema id, e.g. `task.completed/v1`. */
  schema: string;
  type: string;
  body: T;
  /** Who signed it (a principal of the trust bundle). */
  principal: string;
  msgId: string;
  /** `live`: a core subscription delivered it; `stored`: read back from its stream. */
  via: "live" | "stored";
  /** Stream sequence, for a stored message. */
  seq?: number;
  /** When the broker stored it (unix seconds), for a stored message. */
  storedAt?: number;
}

export type Outcome =
  | (Received<TaskCompleted> & { type: "task.completed" })
  | (Received<TaskFailed> & { type: "task.failed" })
  | (Received<TaskRejected> & { type: "task.rejected" });
export const TERMINAL = ["task.completed/v1", "task.failed/v1", "task.rejected/v1"] as const;
/** The stream outcomes are stored in (`mesh_contracts.topology.STREAMS["task"]`): a tenant may
 * direct-get its own tasks' messages from it by subject, nothing else. */
export const OUTCOME_STREAM = "TASK";

export interface SubmitOptions extends HandInOptions {
  taskId?: string;
  priority?: number;
  labels?: Record<string, string>;
  limits?: TaskLimits;
  policy?: TaskPolicy;
  workflow?: string;
  inputs?: Record<string, unknown>;
  /** W3C trace context the task's trace starts from (default: a new trace). */
  traceparent?: string;
}

export interface Submitted extends DoorAck {
  taskId: string;
  msgId: string;
}

export interface FollowOptions {
  onProgress?: (event: Received<ProgressEvent>) => void;
  /** Live model output (`live.token`, core NATS: never replayed). `reset` discards the call's
   * text so far, `end` closes it. */
  onToken?: (token: Received<TokenDelta>) => void;
  /** Every other verified message of the task (its plan, waits...). */
  onEvent?: (message: Received) => void;
  /** A message that was not believed (bad token, unknown contract, sealed field not opening). */
  onInvalid?: (subject: string, error: Error) => void;
  timeoutMs?: number;
  /** Stop following (the promise rejects with the signal's reason). */
  signal?: AbortSignal;
}

type Headers = MsgHdrs | Record<string, string> | undefined;

function header(h: Headers, name: string): string | undefined {
  if (h === undefined) return undefined;
  if (typeof (h as MsgHdrs).has === "function") {
    const m = h as MsgHdrs;
    return m.has(name) ? m.get(name) : undefined;
  }
  return (h as Record<string, string>)[name];
}

const read = (file: string): string => readFileSync(file, "utf8");

export class MeshClient {
  readonly principal: string;
  readonly signer: Signer;
  readonly verifier: Verifier;
  /** Reconnects seen since connecting, and when the last one was (ms since the epoch). */
  reconnects = 0;
  lastReconnectAt = 0;
  private readonly listeners = new Set<() => void>();
  private jsm?: JetStreamManager;

  private constructor(
    readonly nc: NatsConnection,
    readonly tenant: string,
    signer: Signer,
    bundle: TrustBundle,
    private readonly bundlePath: string | undefined,
    private readonly key: Uint8Array | undefined,
  ) {
    this.principal = `client.${tenant}`;
    this.signer = signer;
    this.verifier = new Verifier(bundle);
    void this.watch();
  }

  static async connect(o: ClientOptions): Promise<MeshClient> {
    const principal = `client.${o.tenant}`;
    const creds = o.creds ?? (o.credsFile ? read(o.credsFile) : undefined);
    const pem = o.signingKeyPem ?? (o.signingKeyFile ? read(o.signingKeyFile) : undefined);
    if (creds === undefined || pem === undefined) throw new MeshError("creds/credsFile and signingKeyPem/signingKeyFile are required");
    const hex = o.dataKeyHex ?? (o.dataKeyFile ? read(o.dataKeyFile) : undefined);
    const bundle = typeof o.trustBundle === "string" ? TrustBundle.fromFile(o.trustBundle) : TrustBundle.fromJson(o.trustBundle as never);
    const signer = new Signer(principal, pem);
    const servers = typeof o.servers === "string" ? o.servers.split(",").map((s) => s.trim()).filter(Boolean) : o.servers;
    const ca = o.ca ?? (o.caFile ? read(o.caFile) : undefined);
    const nc = await connect({
      servers,
      name: principal,
      authenticator: credsAuthenticator(new TextEncoder().encode(creds)),
      // Its only readable inbox: without it a request's answer (a JetStream publish's ack too)
      // goes to _INBOX.<id>, which the client may not subscribe to.
      inboxPrefix: inboxPrefix(principal),
      ...(ca !== undefined ? { tls: { ca } } : {}),
      maxReconnectAttempts: -1,
      timeout: o.connectTimeoutMs ?? 10_000,
      ...o.natsOptions,
    });
    const client = new MeshClient(nc, o.tenant, signer, bundle, typeof o.trustBundle === "string" ? o.trustBundle : undefined,
      hex !== undefined ? dataKey(hex) : undefined);
    // Direct gets only: `jetstreamManager()` would ask $JS.API.INFO first, which a tenant may not.
    client.jsm = await jetstreamManager(nc, { checkAPI: false, timeout: 5000 });
    return client;
  }

  private async watch(): Promise<void> {
    for await (const s of this.nc.status()) {
      if (s.type === "reconnect") {
        this.reconnects += 1;
        this.lastReconnectAt = Date.now();
        for (const f of [...this.listeners]) f();
      }
    }
  }

  async close(): Promise<void> {
    if (!this.nc.isClosed()) await this.nc.close();
  }

  /** Parse and believe one message: its contract (by subject and `Mesh-Schema`), its body for
   * this subject's tenant and task, its token (signature by a principal of the trust bundle that
   * may produce it, digest of these bytes, type, tenant, validity at `at`, `Mesh-Facts` covered),
   * then its sealed fields opened. Throws `ContractError`, `IdentityError` or `SealError`. */
  verify<T = Record<string, unknown>>(subject: string, data: Uint8Array, headers: Headers,
    opts: { via?: "live" | "stored"; at?: number; seq?: number } = {}): Received<T> {
    const c = contractFor(subject);
    const { tenant, task } = c.parts;
    if (tenant !== this.tenant) throw new ContractError(`${subject} is not about tenant ${this.tenant}`);
    const schema = header(headers, "Mesh-Schema");
    if (schema !== c.id) throw new ContractError(`header Mesh-Schema is ${JSON.stringify(schema ?? "missing")}: a message on ${subject} is a ${c.id}`);
    let body: Record<string, unknown>;
    try {
      body = JSON.parse(Buffer.from(data).toString("utf8"));
    } catch {
      throw new ContractError(`${subject}: body is not JSON`);
    }
    if (body === null || typeof body !== "object" || Array.isArray(body)) throw new ContractError(`${subject}: body is not an object`);
    if (body.tenant !== tenant || body.task_id !== task) {
      throw new ContractError(`body names tenant/task ${String(body.tenant)}/${String(body.task_id)} but subject names ${tenant}/${task}`);
    }
    if ((body.type ?? c.type) !== c.type) throw new ContractError(`body is a ${String(body.type)}, subject carries ${c.type}`);
    const token = header(headers, "Mesh-Identity");
    const want = { type: c.type, tenant, producers: c.producers, facts: header(headers, "Mesh-Facts"), at: opts.at };
    let principal;
    try {
      principal = this.verifier.verify(token, data, want);
    } catch (err) {
      // A rotation (`meshctl rotate`) publishes newer keys to the bundle file: read it once more.
      if (!(err instanceof IdentityError) || this.bundlePath === undefined) throw err;
      const newer = TrustBundle.fromFile(this.bundlePath);
      if (newer.revision <= this.verifier.bundle.revision) throw err;
      this.verifier.bundle = newer;
      principal = this.verifier.verify(token, data, want);
    }
    const opened = openFields(this.key, body, `${c.id}|${tenant}|${task}`);
    return {
      subject, schema: c.id, type: c.type, body: opened as T, principal: principal.name,
      msgId: header(headers, "Nats-Msg-Id") ?? "", via: opts.via ?? "live",
      ...(opts.seq !== undefined ? { seq: opts.seq } : {}),
      ...(opts.via === "stored" && opts.at !== undefined ? { storedAt: opts.at } : {}),
    };
  }

  private requireKey(): Uint8Array {
    if (this.key === undefined) throw new MeshError("this client holds no data key: it cannot seal the tenant's content");
    return this.key;
  }

  /** Hand a task in at its door; resolves once it is durably stored (`duplicate`: it already
   * was, under the same task id: a retry or a resubmission is never a second task). Retries
   * timeouts, no-responders and `busy`/`unavailable` answers (same message id: stored once);
   * throws `Refused` for any other refusal. Call `follow` first to miss nothing. */
  async submit(goal: string, o: SubmitOptions = {}): Promise<Submitted> {
    const taskId = o.taskId ?? `t-${randomBytes(6).toString("hex")}`;
    const id = "task.submitted/v1";
    const plain: TaskSubmitted = {
      type: "task.submitted", tenant: this.tenant, task_id: taskId, goal,
      ...(o.priority !== undefined ? { priority: o.priority } : {}),
      ...(o.labels !== undefined ? { labels: o.labels } : {}),
      ...(o.limits !== undefined ? { limits: o.limits } : {}),
      ...(o.policy !== undefined ? { policy: o.policy } : {}),
      ...(o.workflow !== undefined ? { workflow: o.workflow } : {}),
      ...(o.inputs !== undefined ? { inputs: o.inputs } : {}),
    };
    const sealed = CONTRACTS[id]?.sealed ?? []; // from the schema's x-sealed: what travels sealed
    const body = sealFields(this.requireKey(), plain as unknown as Record<string, unknown>, sealed, `${id}|${this.tenant}|${taskId}`);
    // What the budget may know of the task (it reads no body): its limits and labels as given.
    const facts = canonicalJson({ labels: o.labels ?? {}, limits: o.limits ?? {} });
    const extra = {
      "Mesh-Priority": String(o.priority ?? 5),
      traceparent: o.traceparent ?? `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`,
    };
    const msgId = `task.submitted:${this.tenant}:${taskId}:1`;
    const ack = await this.handIn(id, taskId, body, msgId, facts, extra, o);
    return { taskId, msgId, ...ack };
  }

  /** Cancel one of the tenant's tasks for good (it fails with `reason`): resolves once the
   * command is stored. `follow` the task to see it end. */
  async cancel(taskId: string, reason: string, o: HandInOptions = {}): Promise<DoorAck> {
    const body: ControlCancel = { type: "control.cancel", tenant: this.tenant, task_id: taskId, reason };
    // Each command is its own message: a second cancel must not be taken for a retry of the first.
    const msgId = `control.cancel:${this.tenant}:${taskId}:${randomBytes(8).toString("hex")}`;
    return this.handIn("control.cancel/v1", taskId, body as unknown as Record<string, unknown>, msgId, "{}", {}, o);
  }

  private async handIn(id: string, taskId: string, body: Record<string, unknown>, msgId: string, facts: string,
    extra: Record<string, string>, o: HandInOptions): Promise<DoorAck> {
    const subject = subjectOf(id, this.tenant, taskId);
    const data = new TextEncoder().encode(JSON.stringify(body));
    const type = id.split("/")[0] as string;
    const h = natsHeaders();
    h.set("Nats-Msg-Id", msgId);
    h.set("Mesh-Schema", id);
    h.set("Mesh-Tenant", this.tenant);
    h.set("Mesh-Task", taskId);
    h.set("Mesh-Identity", this.signer.token({ tenant: this.tenant, type, body: data, msgId, facts }));
    h.set("Mesh-Facts", facts);
    for (const [k, v] of Object.entries(extra)) h.set(k, v);
    return handIn(this.nc, doorOf(subject), data, h, o);
  }

  /** The task's stored outcome, verified (judged as of when it was stored), or null. */
  async storedOutcome(taskId: string): Promise<Outcome | null> {
    for (const id of TERMINAL) {
      const subject = subjectOf(id, this.tenant, taskId);
      const m = await this.jsm!.direct.getMessage(OUTCOME_STREAM, { last_by_subj: subject });
      if (m === null || m.data.length === 0) continue;
      const at = Date.parse(m.timestamp) / 1000;
      return this.verify(subject, m.data, m.header, { via: "stored", at: Number.isFinite(at) ? at : undefined, seq: m.seq }) as Outcome;
    }
    return null;
  }

  /** Follow one task to its outcome: progress events, live tokens and the outcome, each verified.
   * Subscribes at once (before the first await: call it before `submit` and nothing is missed),
   * reads the stored outcome (a task that already ended), and again after every reconnect (live
   * delivery has a gap then) and once more before giving up (`FollowTimeout`). */
  follow(taskId: string, o: FollowOptions = {}): Promise<Outcome> {
    const seen = new Set<string>();
    let settle: { resolve: (v: Outcome) => void; reject: (e: Error) => void } | undefined;
    const result = new Promise<Outcome>((resolve, reject) => (settle = { resolve, reject }));
    let done = false;
    const accept = (got: Received<unknown>): void => {
      if (done || (got.msgId && seen.has(got.msgId))) return;
      if (got.msgId) seen.add(got.msgId);
      if ((TERMINAL as readonly string[]).includes(got.schema)) {
        finish();
        settle!.resolve(got as unknown as Outcome);
      } else if (got.type === "event.progress") o.onProgress?.(got as unknown as Received<ProgressEvent>);
      else if (got.type === "live.token") o.onToken?.(got as unknown as Received<TokenDelta>);
      else o.onEvent?.(got as Received);
    };
    const onMsg = (err: Error | null, m: Msg): void => {
      if (err !== null) return;
      try {
        accept(this.verify(m.subject, m.data, m.headers));
      } catch (e) {
        o.onInvalid?.(m.subject, e as Error);
      }
    };
    const subs: Subscription[] = ["task", "event", "live"].map((d) =>
      this.nc.subscribe(`${d}.*.${this.tenant}.${taskId}.>`, { callback: onMsg }));
    const catchUp = async (): Promise<void> => {
      try {
        const stored = await this.storedOutcome(taskId);
        if (stored !== null) accept(stored as Received<unknown>);
      } catch (e) {
        if (e instanceof MeshError) o.onInvalid?.(`${OUTCOME_STREAM} ${taskId}`, e);
        // otherwise not reachable right now: live delivery, or the next reconnect, may still bring it
      }
    };
    const onReconnect = (): void => void catchUp();
    const timer = setTimeout(async () => {
      await catchUp();
      if (!done) {
        finish();
        settle!.reject(new FollowTimeout(`no outcome of ${taskId} within ${o.timeoutMs ?? 120_000} ms`));
      }
    }, o.timeoutMs ?? 120_000);
    const finish = (): void => {
      done = true;
      clearTimeout(timer);
      this.listeners.delete(onReconnect);
      for (const s of subs) s.unsubscribe();
    };
    this.listeners.add(onReconnect);
    o.signal?.addEventListener("abort", () => {
      if (!done) {
        finish();
        settle!.reject(o.signal?.reason instanceof Error ? o.signal.reason : new MeshError("follow aborted"));
      }
    }, { once: true });
    void this.nc.flush().then(catchUp, () => undefined);
    return result;
  }

  /** Submit and follow at once: the subscriptions are made before the submission. */
  async run(goal: string, o: SubmitOptions & FollowOptions = {}): Promise<{ submitted: Submitted; outcome: Outcome }> {
    const taskId = o.taskId ?? `t-${randomBytes(6).toString("hex")}`;
    const stop = new AbortController();
    const following = this.follow(taskId, { ...o, signal: stop.signal });
    following.catch(() => undefined); // (awaited below, unless the submission is refused)
    try {
      const submitted = await this.submit(goal, { ...o, taskId });
      return { submitted, outcome: await following };
    } catch (err) {
      stop.abort(err);
      throw err;
    }
  }
}
