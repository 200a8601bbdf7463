export * from './events.js';
export * from './capacity.js';
export * from './publisher.js';
export * from './directory.js';
