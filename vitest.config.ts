import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Guests boot under TCG on 2 cores: integration tests are slow by nature, not by accident.
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // VM tests compete for 2 cores and a port range; run files one after another.
    fileParallelism: false,
    globalSetup: ['test/support/global-setup.ts'],
  },
});
