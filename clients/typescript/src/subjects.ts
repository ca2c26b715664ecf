/** Subjects: `<domain>.v<major>.<tenant>.<task>.<event>`, and the contract each carries. */
import { CONTRACTS, type MessageContract } from "./contracts.js";
import { ContractError } from "./errors.js";

export const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
export const DOOR_PREFIX = "door";

export interface Subject {
  domain: string;
  major: number;
  tenant: string;
  task: string;
  event: string;
}

export function splitSubject(subject: string): Subject {
  const parts = subject.split(".");
  const [domain, version, tenant, task, event] = parts;
  if (parts.length !== 5 || !domain || !version || !/^v[0-9]+$/.test(version) || !tenant || !task || !event) {
    throw new ContractError(`not a mesh subject: ${subject}`);
  }
  return { domain, major: Number(version.slice(1)), tenant, task, event };
}

export interface Carried extends MessageContract {
  /** The schema id, e.g. `task.completed/v1` (what `Mesh-Schema` says). */
  id: string;
}

const BY_SUBJECT = new Map<string, Carried>();
for (const [id, c] of Object.entries(CONTRACTS)) {
  const s = splitSubject(c.subject);
  BY_SUBJECT.set(`${s.domain}.${s.major}.${s.event}`, { ...c, id });
}

/** The contract a message on `subject` carries, or `ContractError`. */
export function contractFor(subject: string): Carried & { parts: Subject } {
  const parts = splitSubject(subject);
  const c = BY_SUBJECT.get(`${parts.domain}.${parts.major}.${parts.event}`);
  if (c === undefined) throw new ContractError(`no contract is sent on ${subject}`);
  return { ...c, parts };
}

/** The subject a contract travels on for one tenant's task. */
export function subjectOf(id: string, tenant: string, task: string): string {
  const c = CONTRACTS[id];
  if (c === undefined) throw new ContractError(`unknown contract ${id}`);
  if (!ID_PATTERN.test(tenant) || !ID_PATTERN.test(task)) throw new ContractError(`tenant and task ids must match ${ID_PATTERN}`);
  return c.subject.replace("{tenant}", tenant).replace("{task}", task);
}

export const doorOf = (subject: string): string => `${DOOR_PREFIX}.${subject}`;
