export * from "./client.js";
export * from "./door.js";
export * from "./errors.js";
export * from "./sealing.js";
export * from "./subjects.js";
export * from "./tokens.js";
export type * from "./contracts.js";
export { CONTRACTS } from "./contracts.js";
