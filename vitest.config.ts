import { defineConfig } from 'vitest/config';

/**
 * Two projects, one run: `npm test` runs both; `npm run test:unit` runs only
 * `unit`, which needs no guest image, no qemu and no relay, so it has no
 * global setup and runs its files in parallel.
 */
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'unit',
          include: ['test/unit/**/*.test.ts'],
          // The property tests do hundreds of crypto round trips: seconds each on a quiet machine, more on a shared one.
          testTimeout: 60_000,
          // Files share a worker's module cache instead of importing zod, nostr-tools
          // and the WASM verifier again each: about 40 % of the loop's CPU time.
          // So a unit test must leave no global state behind (restore timers, stop what it starts).
          isolate: false,
          // The default (cores − 1) is one worker on this 2-core machine: the files would run one after another.
          maxWorkers: 2,
          sequence: { groupOrder: 0 },
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/integration/**/*.test.ts'],
          // Guests boot under TCG on 2 cores: integration tests are slow by nature, not by accident.
          testTimeout: 120_000,
          hookTimeout: 300_000,
          // VM tests compete for 2 cores and a port range; run files one after another.
          fileParallelism: false,
          // Build the guest images once, before any integration file starts.
          globalSetup: ['test/support/global-setup.ts'],
          // After the unit project, never beside it: its files must not share the cores with booting guests.
          sequence: { groupOrder: 1 },
        },
      },
    ],
  },
});
