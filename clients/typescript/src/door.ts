/** Handing a message in at its door (`mesh_tenancy.door`): a core request to `door.<subject>`,
 * answered as JetStream answers a publish. A tenant writes to no stream itself. */
import { errors, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { Refused } from "./errors.js";

export interface DoorAck {
  stream: string;
  seq: number;
  /** Already stored under this message id (a retry, or the same task submitted again). */
  duplicate: boolean;
}

export interface HandInOptions {
  /** How long to keep trying while the door or the broker is away (default 60 s). */
  withinMs?: number;
  /** At most this many tries after the first (default: as many as `withinMs` allows). */
  retries?: number;
}

/** How long each try waits for the door's answer (the last repeats). A door answers in
 * milliseconds; one killed while it held the request never answers. */
export const DOOR_TIMEOUTS_MS = [1000, 2000, 5000];
/** JetStream's "maximum messages exceeded" error: the stream itself is full. */
export const STREAM_FULL_CODE = 10077;

interface Answer {
  stream?: string;
  seq?: number;
  duplicate?: boolean;
  error?: { code?: number; err_code?: number; description?: string };
  mesh?: { code?: string; retry_after_s?: number };
}

/** A door's answer: the acknowledgement, or `Refused`. */
export function readAnswer(data: Uint8Array): DoorAck {
  let answer: Answer;
  try {
    answer = JSON.parse(Buffer.from(data).toString("utf8"));
  } catch {
    throw new Refused("unavailable", `unreadable answer from the door: ${Buffer.from(data).subarray(0, 80).toString()}`);
  }
  const error = answer.error;
  if (error === undefined || error === null) {
    return { stream: String(answer.stream ?? ""), seq: Number(answer.seq ?? 0), duplicate: Boolean(answer.duplicate) };
  }
  if (error.err_code === STREAM_FULL_CODE) {
    // As the planner's own `overloaded` refusal says: come back in 30 s.
    throw new Refused("stream_full", error.description ?? "full", 30, error.code ?? 503);
  }
  const code = String(answer.mesh?.code ?? "unavailable");
  const reason = String(error.description ?? "").replace(`${code}: `, "").replace(/ \(retry after [0-9.]+s\)$/, "");
  throw new Refused(code, reason, Number(answer.mesh?.retry_after_s ?? 0), error.code ?? 0);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const jitter = (ms: number): number => ms * (0.5 + Math.random() / 2);

/** Errors a try may end with that another try can cure: no answer in time, nobody listening
 * (the door's keeper restarting), the connection reconnecting. */
function transient(err: unknown): boolean {
  return err instanceof errors.TimeoutError || err instanceof errors.NoRespondersError ||
    (err instanceof errors.RequestError && !(err.cause instanceof errors.PermissionViolationError));
}

/** Request `door` until it answers with an acknowledgement; the message id in `headers` is
 * deterministic, so a retry of a request that did land is stored once (`duplicate`). */
export async function handIn(nc: NatsConnection, door: string, data: Uint8Array, headers: MsgHdrs, o: HandInOptions = {}): Promise<DoorAck> {
  const deadline = Date.now() + (o.withinMs ?? 60_000);
  let backoff = 100;
  for (let tries = 0; ; tries++) {
    const wait = DOOR_TIMEOUTS_MS[Math.min(tries, DOOR_TIMEOUTS_MS.length - 1)] as number;
    let pause: number;
    try {
      const reply = await nc.request(door, data, { timeout: wait, headers });
      return readAnswer(reply.data);
    } catch (err) {
      if (err instanceof Refused) {
        if (err.code !== "busy" && err.code !== "unavailable") throw err;
        // busy: the door gave this client its own place on its queue's drain; come then
        pause = err.code === "busy" && err.retryAfterS > 0 ? err.retryAfterS * 1000 * (1 + Math.random() / 5) : jitter(backoff);
      } else if (transient(err)) {
        pause = jitter(backoff);
      } else {
        throw err;
      }
      if (Date.now() + pause > deadline || (o.retries !== undefined && tries >= o.retries)) throw err;
    }
    await sleep(pause);
    backoff = Math.min(backoff * 2, 2000);
  }
}
