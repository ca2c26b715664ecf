/** Every error this client raises on purpose. */
export class MeshError extends Error {
  override name = "MeshError";
}

/** A message whose token does not check out: unknown principal, bad signature, wrong digest,
 * expired, for another tenant, type or message id, or from a principal that may not send it. */
export class IdentityError extends MeshError {
  override name = "IdentityError";
}

/** The token names a principal the trust bundle does not hold, or none of its keys signed it. */
export class UnknownKey extends IdentityError {
  override name = "UnknownKey";
}

/** A message that is not what its subject says (unknown contract, wrong schema header, body for
 * another tenant or task, not JSON). */
export class ContractError extends MeshError {
  override name = "ContractError";
}

/** A sealed field that does not open with this client's data key. */
export class SealError extends ContractError {
  override name = "SealError";
}

/** The door did not store the message: `code` says why (`quota_exceeded`, `rate_limited`,
 * `busy`, `invalid`, `forbidden`, `unavailable`, `suspended`, or `stream_full` when the stream
 * itself is at its cap), `retryAfterS` when to come back (0: not by waiting). */
export class Refused extends MeshError {
  override name = "Refused";
  constructor(
    readonly code: string,
    readonly reason: string,
    readonly retryAfterS: number = 0,
    readonly status: number = 0,
  ) {
    super(`${code}: ${reason}${retryAfterS ? ` (retry after ${retryAfterS}s)` : ""}`);
  }
}

/** No outcome within the time the caller gave `follow`. */
export class FollowTimeout extends MeshError {
  override name = "FollowTimeout";
}
