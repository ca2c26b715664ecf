/** The client against a real mesh (started by tests/integration/test_typescript_client.py, which
 * passes MESH_HOME, MESH_NATS_URL and MESH_TENANT): submit, deduplicate, stream, follow late,
 * refuse forgeries, survive a reconnect. */
import { connect, credsAuthenticator, headers as natsHeaders } from "@nats-io/transport-node";
import assert from "node:assert/strict";
import { generateKeyPairSync, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  fromHome, MeshClient, Refused, Signer, UnknownKey, canonicalJson, seal,
  type Outcome, type Received, type TokenDelta,
} from "../src/index.js";

const home = need("MESH_HOME");
const url = need("MESH_NATS_URL");
const tenant = process.env.MESH_TENANT ?? "acme";
const GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23.";

function need(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run these tests through tests/integration/test_typescript_client.py`);
  return v;
}

const newTask = (): string => `ts-${randomBytes(5).toString("hex")}`;
let client: MeshClient;
let gapMs = 0; // > 0: the next reconnect waits this long before dialing (a live-delivery gap)

before(async () => {
  client = await MeshClient.connect({
    ...fromHome(home, tenant, url),
    natsOptions: { reconnectToServer: (pool, info) => (info !== null && gapMs > 0 && pool[0] ? { server: pool[0], delay: gapMs } : null) },
  });
});

after(async () => {
  await client?.close();
});

function answerOf(outcome: Outcome): string {
  assert.equal(outcome.type, "task.completed", JSON.stringify(outcome.body));
  return String((outcome.body as { answer: unknown }).answer);
}

test("the sample task submits and completes with a verified outcome, its answer opened", async () => {
  const progress: string[] = [];
  const { submitted, outcome } = await client.run(GOAL, { onProgress: (e) => progress.push(e.body.stage), timeoutMs: 60_000 });
  assert.equal(submitted.stream, "TASK");
  assert.ok(submitted.seq > 0 && !submitted.duplicate);
  assert.equal(outcome.principal, "planner");
  assert.equal(outcome.schema, "task.completed/v1");
  const answer = answerOf(outcome);
  assert.match(answer, /391/, "the answer is sealed in the stream and opened here");
  assert.ok(progress.length > 0, "progress events arrive, verified");
});

test("the same task id submitted twice is one task: the second answer is a duplicate", async () => {
  const taskId = newTask();
  const following = client.follow(taskId, { timeoutMs: 60_000 });
  const first = await client.submit(GOAL, { taskId });
  const second = await client.submit(GOAL, { taskId });
  assert.equal(first.duplicate, false);
  assert.equal(second.duplicate, true);
  assert.equal(second.seq, first.seq, "the stream kept the first one only");
  answerOf(await following);
  const third = await client.submit(GOAL, { taskId }); // after it ended, too
  assert.ok(third.duplicate);
});

test("live tokens stream before the outcome", async () => {
  const order: string[] = [];
  const tokens: Received<TokenDelta>[] = [];
  const { outcome } = await client.run(GOAL, {
    onToken: (t) => {
      tokens.push(t);
      order.push("token");
    },
    timeoutMs: 60_000,
  });
  order.push("outcome");
  answerOf(outcome);
  const deltas = tokens.filter((t) => (t.body.kind ?? "delta") === "delta");
  assert.ok(deltas.length > 0, "no live token arrived");
  assert.ok(tokens.every((t) => t.principal === "worker" && t.via === "live"));
  assert.ok(order.indexOf("token") < order.indexOf("outcome"));
  const calls = new Set(deltas.map((t) => t.body.call_id));
  assert.ok([...calls].every((c) => typeof c === "string" && c.length > 0));
});

test("following a task that already ended returns its stored outcome", async () => {
  const { submitted } = await client.run(GOAL, { timeoutMs: 60_000 });
  const late = await client.follow(submitted.taskId, { timeoutMs: 10_000 });
  assert.equal(late.via, "stored");
  assert.equal(late.principal, "planner");
  assert.ok(late.seq !== undefined && late.seq > 0);
  assert.match(answerOf(late), /391/);
  const stored = await client.storedOutcome(submitted.taskId);
  assert.equal(stored?.msgId, late.msgId);
  assert.equal(await client.storedOutcome(newTask()), null, "a task never submitted has no outcome");
});

test("a message with a forged token is refused by verify", async () => {
  const taskId = newTask();
  const subject = `task.v1.${tenant}.${taskId}.completed`;
  const body = new TextEncoder().encode(JSON.stringify({ type: "task.completed", tenant, task_id: taskId, answer: "forged" }));
  const msgId = `task.completed:${tenant}:${taskId}:1`;
  const facts = canonicalJson({});
  const headersFor = (signer: Signer, data = body): Record<string, string> => ({
    "Mesh-Schema": "task.completed/v1", "Nats-Msg-Id": msgId, "Mesh-Facts": facts,
    "Mesh-Identity": signer.token({ tenant, type: "task.completed", body: data, msgId, facts }),
  });
  const stranger = generateKeyPairSync("ed25519").privateKey;
  // a key not in the bundle, claiming to be the planner
  assert.throws(() => client.verify(subject, body, headersFor(new Signer("planner", stranger))), UnknownKey);
  // a principal the bundle does not know at all
  assert.throws(() => client.verify(subject, body, headersFor(new Signer("mallory", stranger))), /unknown principal/);
  // a real key of the bundle, but the client's: a client may not produce an outcome
  assert.throws(() => client.verify(subject, body, headersFor(client.signer)), /may not produce task.completed/);
  // a genuine token over other bytes
  const real = await client.run(GOAL, { timeoutMs: 60_000 });
  const stored = await client.storedOutcome(real.submitted.taskId);
  assert.ok(stored !== null);
  const m = await rawStored(real.submitted.taskId);
  assert.doesNotThrow(() => client.verify(m.subject, m.data, m.headers, { at: m.at }));
  const altered = Buffer.from(m.data.toString().replace(`"task_id"`, `"task_id" `));
  assert.throws(() => client.verify(m.subject, altered, m.headers, { at: m.at }), /digest/);
  assert.throws(() => client.verify(m.subject, m.data, { ...m.headers, "Mesh-Facts": '{"step":"s9"}' }, { at: m.at }), /Mesh-Facts/);
  assert.throws(() => client.verify(m.subject, m.data, m.headers, { at: m.at + 3600 }), /expired/);
});

/** A stored outcome's raw bytes and headers (read with the client's own direct-get right). */
async function rawStored(taskId: string): Promise<{ subject: string; data: Buffer; headers: Record<string, string>; at: number }> {
  const subject = `task.v1.${tenant}.${taskId}.completed`;
  const reply = await client.nc.request(`$JS.API.DIRECT.GET.TASK.${subject}`, new Uint8Array(), { timeout: 5000 });
  const headers: Record<string, string> = {};
  for (const [k, v] of reply.headers ?? []) headers[k] = v.at(-1) ?? "";
  return { subject, data: Buffer.from(reply.data), headers, at: Date.parse(headers["Nats-Time-Stamp"] ?? "") / 1000 };
}

test("a forged live token on the wire is refused while following", async () => {
  const admin = await connect({
    servers: url.split(","),
    authenticator: credsAuthenticator(readFileSync(join(home, "secrets", "creds", "admin.creds"))),
    tls: { ca: readFileSync(join(home, "tls", "ca.pem"), "utf8") },
    inboxPrefix: "_INBOX_admin",
  });
  try {
    const taskId = newTask();
    const invalid: string[] = [];
    const tokens: string[] = [];
    const following = client.follow(taskId, {
      onToken: (t) => tokens.push(String(t.body.text)),
      onInvalid: (_s, e) => invalid.push(e.message),
      timeoutMs: 60_000,
    });
    await client.nc.flush();
    const subject = `live.v1.${tenant}.${taskId}.token`;
    const data = new TextEncoder().encode(JSON.stringify({ type: "live.token", tenant, task_id: taskId, call_id: "x", text: "pwned" }));
    const h = natsHeaders();
    h.set("Mesh-Schema", "live.token/v1");
    h.set("Mesh-Identity", new Signer("worker", generateKeyPairSync("ed25519").privateKey).token({ tenant, type: "live.token", body: data, msgId: "" }));
    admin.publish(subject, data, { headers: h });
    await admin.flush();
    await client.submit(GOAL, { taskId });
    answerOf(await following);
    assert.ok(!tokens.includes("pwned"), "the forged token was believed");
    assert.ok(invalid.some((e) => /signature invalid for worker/.test(e)), invalid.join("; "));
  } finally {
    await admin.close();
  }
});

test("a reconnect mid-follow still delivers the outcome (read back from the stream)", async () => {
  const taskId = newTask();
  const following = client.follow(taskId, { timeoutMs: 60_000 });
  const before = client.reconnects;
  await client.submit(GOAL, { taskId });
  gapMs = 4000; // the task (~0.7 s) ends while the client is away: only the catch-up can deliver it
  try {
    await client.nc.reconnect();
    const outcome = await following;
    assert.match(answerOf(outcome), /391/);
    assert.equal(client.reconnects, before + 1);
    const stored = await client.storedOutcome(taskId);
    assert.ok(stored?.storedAt !== undefined);
    assert.ok(stored.storedAt * 1000 < client.lastReconnectAt, "the task outlasted the 4 s gap (a machine this slow?)");
    assert.equal(outcome.via, "stored", "published while the client was away, it came from the stream after the reconnect");
  } finally {
    gapMs = 0;
  }
  // and the connection works as before
  const again = await client.run(GOAL, { timeoutMs: 60_000 });
  assert.equal(again.outcome.via, "live");
});

test("a refusal is a typed error with its code", async () => {
  await assert.rejects(
    client.submit("", { taskId: newTask() }), // an empty goal: the contract refuses it
    (err: unknown) => err instanceof Refused && err.code === "invalid" && err.retryAfterS === 0,
  );
  // a goal sealed for another place does not open at the door: refused, not stored
  const taskId = newTask();
  const sealed = seal(randomBytes(32), `task.submitted/v1|${tenant}|${taskId}|goal`, GOAL);
  await assert.rejects(client.submit(sealed as unknown as string, { taskId }), (err: unknown) => err instanceof Refused);
});

test("cancel is handed in at its door", async () => {
  const ack = await client.cancel(newTask(), "changed my mind");
  assert.equal(ack.stream, "CONTROL");
  assert.ok(ack.seq > 0 && !ack.duplicate);
});
