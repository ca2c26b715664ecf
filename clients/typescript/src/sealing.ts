/** A tenant's content sealed with its data key (`mesh_contracts.sealing`): a field's JSON,
 * encrypted with XChaCha20-Poly1305, as `{"$sealed": "dk1.<kid>.<base64url(nonce24 + ct)>"}`,
 * bound by its associated data `<schema id>|<tenant>|<task>|<field>` to its place. */
import { xchacha20poly1305 } from "@noble/ciphers/chacha.js";
import { randomBytes } from "node:crypto";
import { SealError } from "./errors.js";
import { sha256hex } from "./tokens.js";

export const MARK = "$sealed";
export const PREFIX = "dk1.";
const NONCE_BYTES = 24;

export interface SealedValue {
  $sealed: string;
}

/** The key id a sealed value names: the first 16 hex digits of the key's sha256. */
export const keyId = (key: Uint8Array): string => sha256hex(key).slice(0, 16);

export function dataKey(hex: string): Uint8Array {
  const key = Buffer.from(hex.trim(), "hex");
  if (key.length !== 32) throw new SealError("a data key is 32 bytes (64 hex digits)");
  return new Uint8Array(key);
}

export function isSealed(value: unknown): value is SealedValue {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return false;
  const keys = Object.keys(value);
  const v = (value as Record<string, unknown>)[MARK];
  return keys.length === 1 && typeof v === "string" && v.startsWith(PREFIX);
}

/** `value` sealed for `place` (`<schema id>|<tenant>|<task>|<field>`). Any nonce used once will do
 * (the mesh derives its own from the content): this one is random. */
export function seal(key: Uint8Array, place: string, value: unknown): SealedValue {
  const nonce = new Uint8Array(randomBytes(NONCE_BYTES));
  const plain = Buffer.from(JSON.stringify(value));
  const ct = xchacha20poly1305(key, nonce, Buffer.from(place)).encrypt(plain);
  return { [MARK]: `${PREFIX}${keyId(key)}.${Buffer.concat([nonce, ct]).toString("base64url")}` };
}

/** The value sealed in `sealed` for `place`; `SealError` if it does not open with `key`. */
export function open(key: Uint8Array, place: string, sealed: SealedValue): unknown {
  const [, kid, payload] = /^dk1\.([0-9a-f]+)\.([A-Za-z0-9_-]+)$/.exec(sealed[MARK]) ?? [];
  if (kid === undefined || payload === undefined) throw new SealError(`unreadable sealed value at ${place}`);
  if (kid !== keyId(key)) throw new SealError(`sealed with data key ${kid}, this client holds ${keyId(key)} (rotated or erased?)`);
  const raw = Buffer.from(payload, "base64url");
  if (raw.length <= NONCE_BYTES) throw new SealError(`sealed value at ${place} too short`);
  let plain: Uint8Array;
  try {
    plain = xchacha20poly1305(key, raw.subarray(0, NONCE_BYTES), Buffer.from(place)).decrypt(raw.subarray(NONCE_BYTES));
  } catch {
    throw new SealError(`sealed field does not open at ${place} (altered, or moved from another message)`);
  }
  return JSON.parse(Buffer.from(plain).toString("utf8"));
}

/** `body` with each of `fields` sealed (empty values stay as they are, as the mesh does).
 * `context` is `<schema id>|<tenant>|<task>`. */
export function sealFields<T extends Record<string, unknown>>(key: Uint8Array, body: T, fields: readonly string[], context: string): T {
  const out: Record<string, unknown> = { ...body };
  for (const f of fields) {
    const v = out[f];
    const empty = v === undefined || v === null || v === "" || (Array.isArray(v) && v.length === 0) ||
      (typeof v === "object" && v !== null && Object.keys(v).length === 0);
    if (!empty && !isSealed(v)) out[f] = seal(key, `${context}|${f}`, v);
  }
  return out as T;
}

/** `body` with every sealed top-level field opened. */
export function openFields(key: Uint8Array | undefined, body: Record<string, unknown>, context: string): Record<string, unknown> {
  const sealed = Object.keys(body).filter((k) => isSealed(body[k]));
  if (sealed.length === 0) return body;
  if (key === undefined) throw new SealError(`field(s) ${sealed.join(", ")} are sealed and this client holds no data key`);
  const out = { ...body };
  for (const f of sealed) out[f] = open(key, `${context}|${f}`, body[f] as SealedValue);
  return out;
}
