/** Signed identity tokens (EdDSA JWTs over a message's exact bytes) and the trust bundle that
 * verifies them: a port of `mesh_identity.tokens` / `mesh_identity.bundle` with node:crypto. */
import { createHash, createPrivateKey, createPublicKey, sign, verify, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { IdentityError, UnknownKey } from "./errors.js";

export const ALGORITHM = "EdDSA";
export const DEFAULT_TTL_S = 300;
/** The longest validity a token may claim (`exp - iat`): under the streams' 10-minute
 * deduplication window, so a captured token cannot be replayed into a second effect. */
export const MAX_TOKEN_LIFETIME_S = 540;
export const CLOCK_LEEWAY_S = 5;

export interface Claims {
  iss: string;
  ten: string;
  typ: string;
  dig: string;
  mid?: string;
  fct?: string;
  iat: number;
  exp: number;
  [claim: string]: unknown;
}

export const sha256hex = (data: Uint8Array | string): string => createHash("sha256").update(data).digest("hex");

/** JSON as Python's `json.dumps(v, sort_keys=True, separators=(",", ":"))` writes it (ASCII
 * only): the form of the `Mesh-Facts` header, which must be one line of printable ASCII. */
export function canonicalJson(value: unknown): string {
  const sorted = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(sorted);
    if (v !== null && typeof v === "object") {
      const o = v as Record<string, unknown>;
      return Object.fromEntries(Object.keys(o).sort().map((k) => [k, sorted(o[k])]));
    }
    return v;
  };
  return JSON.stringify(sorted(value)).replace(
    /[\u0080-\uffff]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

const b64url = (data: Uint8Array | string): string => Buffer.from(data).toString("base64url");

/** A base64url segment in its one canonical form (no padding, no stray bits), or an error. */
function unb64(segment: string): Buffer {
  if (!/^[A-Za-z0-9_-]*$/.test(segment) || segment.length % 4 === 1) throw new IdentityError("token not canonical base64url");
  const data = Buffer.from(segment, "base64url");
  if (data.toString("base64url") !== segment) throw new IdentityError("token not canonical base64url");
  return data;
}

/** Signs outgoing messages as one principal (`client.<tenant>`). */
export class Signer {
  readonly key: KeyObject;
  private readonly header: string;

  constructor(
    readonly principal: string,
    privateKeyPem: string | KeyObject,
    readonly ttlS: number = DEFAULT_TTL_S,
  ) {
    if (ttlS <= 0 || ttlS > MAX_TOKEN_LIFETIME_S) throw new RangeError(`ttlS must be in (0, ${MAX_TOKEN_LIFETIME_S}]`);
    this.key = typeof privateKeyPem === "string" ? createPrivateKey(privateKeyPem) : privateKeyPem;
    if (this.key.asymmetricKeyType !== "ed25519") throw new TypeError(`${principal}: not an Ed25519 private key`);
    this.header = b64url(JSON.stringify({ alg: ALGORITHM, kid: principal, typ: "JWT" }));
  }

  /** A token over `body` (its sha256, `dig`) for a message of `type` of `tenant` under message id
   * `msgId`; `facts`, the `Mesh-Facts` header, is covered too (`fct`). */
  token(o: { tenant: string; type: string; body: Uint8Array; msgId: string; facts?: string; now?: number }): string {
    const now = Math.floor(o.now ?? Date.now() / 1000);
    const claims: Claims = {
      iss: this.principal,
      ten: o.tenant,
      typ: o.type,
      dig: sha256hex(o.body),
      mid: o.msgId,
      iat: now,
      exp: now + Math.floor(this.ttlS),
    };
    if (o.facts !== undefined) claims.fct = sha256hex(o.facts);
    const input = `${this.header}.${b64url(JSON.stringify(claims))}`;
    return `${input}.${b64url(sign(null, Buffer.from(input), this.key))}`;
  }
}

export interface BundleKey {
  key: KeyObject;
  retiredAt: number | null;
}

export interface Principal {
  name: string;
  role: string;
  tenant: string | null;
  keys: BundleKey[];
}

interface BundleJson {
  revision?: number;
  principals: Record<string, { role: string; tenant?: string | null; public_key: string; keys?: { public_key: string; retired_at?: number | null }[] }>;
}

/** Every principal's public keys (with their history), as `meshctl init` / `meshctl rotate` write
 * them to the home's `trust-bundle.json`. `revision` grows with every published change. */
export class TrustBundle {
  constructor(
    readonly principals: ReadonlyMap<string, Principal>,
    readonly revision: number,
  ) {}

  static fromJson(doc: string | BundleJson): TrustBundle {
    const raw: BundleJson = typeof doc === "string" ? JSON.parse(doc) : doc;
    const principals = new Map<string, Principal>();
    for (const [name, entry] of Object.entries(raw.principals ?? {})) {
      const history = entry.keys?.length ? entry.keys : [{ public_key: entry.public_key, retired_at: null }];
      const keys = history.map((k) => ({ key: publicKey(name, k.public_key), retiredAt: k.retired_at ?? null }));
      principals.set(name, { name, role: entry.role, tenant: entry.tenant ?? null, keys });
    }
    return new TrustBundle(principals, Number(raw.revision ?? 0));
  }

  static fromFile(path: string): TrustBundle {
    return TrustBundle.fromJson(readFileSync(path, "utf8"));
  }
}

function publicKey(name: string, pem: string): KeyObject {
  const key = createPublicKey(pem);
  if (key.asymmetricKeyType !== "ed25519") throw new TypeError(`trust bundle: ${name}'s key is not Ed25519`);
  return key;
}

/** What a verified message must be: its type, tenant, the roles that may produce it, and
 * optionally the message id it arrived under and its `Mesh-Facts` header. */
export interface Expected {
  type: string;
  tenant: string;
  producers: readonly string[];
  msgId?: string;
  facts?: string | undefined;
  /** When the broker stored the message (unix seconds); now for a live message. */
  at?: number;
}

/** Checks a message's token against the trust bundle and the contract's producers. */
export class Verifier {
  constructor(
    public bundle: TrustBundle,
    readonly leewayS: number = CLOCK_LEEWAY_S,
    readonly maxLifetimeS: number = MAX_TOKEN_LIFETIME_S,
  ) {}

  /** The token's principal and claims, its signature checked against the keys valid at `at`. */
  decode(token: string, at: number): { principal: Principal; claims: Claims } {
    const parts = token.split(".");
    if (parts.length !== 3) throw new IdentityError("identity token unreadable: not a compact JWS");
    const [h, p, s] = parts as [string, string, string];
    let header: Record<string, unknown>;
    let claims: Claims;
    try {
      header = JSON.parse(unb64(h).toString("utf8"));
      claims = JSON.parse(unb64(p).toString("utf8"));
    } catch (err) {
      throw err instanceof IdentityError ? err : new IdentityError(`identity token unreadable: ${(err as Error).message}`);
    }
    if (header === null || typeof header !== "object" || claims === null || typeof claims !== "object") {
      throw new IdentityError("identity token unreadable");
    }
    if (header.alg !== ALGORITHM || "crit" in header || "b64" in header) {
      throw new IdentityError(`identity token invalid: algorithm ${String(header.alg)}, not ${ALGORITHM}`);
    }
    for (const c of ["iss", "ten", "typ", "dig", "iat", "exp"]) {
      if (claims[c] === undefined || claims[c] === null) throw new IdentityError(`identity token invalid: claim ${c} missing`);
    }
    const name = header.kid;
    const principal = typeof name === "string" ? this.bundle.principals.get(name) : undefined;
    if (principal === undefined) throw new UnknownKey(`identity token from unknown principal ${JSON.stringify(name)}`);
    const keys = principal.keys.filter((k) => k.retiredAt === null || at <= k.retiredAt + this.leewayS);
    const signature = unb64(s);
    const signed = Buffer.from(`${h}.${p}`);
    if (signature.length !== 64 || !keys.some((k) => verify(null, signed, k.key, signature))) {
      const why = keys.length < principal.keys.length ? "forged, or signed with a retired key" : "forged?";
      throw new UnknownKey(`identity token signature invalid for ${principal.name} (${why})`);
    }
    if (claims.iss !== principal.name) {
      throw new IdentityError(`identity token issuer ${JSON.stringify(claims.iss)} does not match key id ${principal.name}`);
    }
    return { principal, claims };
  }

  /** The sending principal of a message with `body` and `token`, or `IdentityError` saying why not. */
  verify(token: string | undefined, body: Uint8Array, want: Expected): Principal {
    if (!token) throw new IdentityError("identity token missing");
    const at = want.at ?? Date.now() / 1000;
    const { principal, claims } = this.decode(token, at);
    if (claims.dig !== sha256hex(body)) throw new IdentityError("body does not match the identity token's digest (altered in transit?)");
    if (claims.exp < at - this.leewayS) {
      throw new IdentityError(`identity token expired ${Math.round(at - claims.exp)}s before the message was stored`);
    }
    if (claims.iat > at + this.leewayS) throw new IdentityError("identity token issued in the future");
    if (claims.exp - claims.iat > this.maxLifetimeS) {
      throw new IdentityError(`identity token valid for ${claims.exp - claims.iat}s, over the ${this.maxLifetimeS}s a token may live`);
    }
    if (claims.typ !== want.type) throw new IdentityError(`token was issued for ${claims.typ}, message is ${want.type}`);
    if (claims.ten !== want.tenant) throw new IdentityError(`token was issued for tenant ${claims.ten}, message is for ${want.tenant}`);
    if (want.msgId !== undefined && (claims.mid ?? "") !== want.msgId) {
      throw new IdentityError(`token was issued for message id ${JSON.stringify(claims.mid ?? "")}, not ${JSON.stringify(want.msgId)}`);
    }
    if (!want.producers.includes(principal.role)) {
      throw new IdentityError(`${principal.name} may not produce ${want.type} (producers: ${want.producers.join(", ")})`);
    }
    if (principal.tenant !== null && principal.tenant !== want.tenant) {
      throw new IdentityError(`${principal.name} may speak only for tenant ${principal.tenant}, not ${want.tenant}`);
    }
    if (claims.fct === undefined) {
      if (want.facts !== undefined) throw new IdentityError("Mesh-Facts header not covered by the identity token (added in transit?)");
    } else if (want.facts === undefined || sha256hex(want.facts) !== claims.fct) {
      throw new IdentityError("Mesh-Facts header does not match the identity token (altered in transit?)");
    }
    return principal;
  }
}
