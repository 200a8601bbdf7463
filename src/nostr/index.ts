export * from './keys.js';
export * from './dm.js';
export * from './relays.js';
export type * from './types.js';
