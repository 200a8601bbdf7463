/**
 * Undo what a multi-step operation took, after Incus's `revert.New()`: each
 * step registers its undo the moment it has taken something, so cleanup after
 * a failure never depends on remembering by hand how far the operation got.
 *
 *   const revert = new Reverter((err) => log.error({ err }, 'cleanup step failed'));
 *   try { …take; revert.add(() => give back)…; revert.success(); }
 *   catch (err) { await revert.fail(); throw err; }
 *
 * A step that may be retried gets its own Reverter, registered in the outer
 * one as `() => inner.fail()`: a retry undoes only that attempt.
 */
export type Undo = () => unknown;

export class Reverter {
  private undos: Undo[] = [];

  /** `onError` hears each undo that throws; cleanup goes on regardless. */
  constructor(private readonly onError: (err: unknown) => void) {}

  add(undo: Undo): void {
    this.undos.push(undo);
  }

  /** Run every registered undo, newest first, each once; one that throws does not stop the others. */
  async fail(): Promise<void> {
    const undos = this.undos.reverse();
    this.undos = [];
    for (const undo of undos) {
      try {
        await undo();
      } catch (err) {
        this.onError(err);
      }
    }
  }

  /** The operation succeeded: what it took stays taken. */
  success(): void {
    this.undos = [];
  }
}
