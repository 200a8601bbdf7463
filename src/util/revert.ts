/**
 * Undo what a multi-step operation took, after Incus's `revert.New()`: each
 * step registers its undo the moment it has taken something, so cleanup after
 * a failure never depends on remembering by hand how far the operation got.
 *
 *   const revert = new Reverter();
 *   try { …take; revert.add(() => give back)…; revert.success(); }
 *   catch (err) { await revert.fail(); throw err; }
 */
export type Undo = () => unknown;

export class Reverter {
  private undos: Undo[] = [];

  add(undo: Undo): void {
    this.undos.push(undo);
  }

  /**
   * Run every registered undo, newest first, each once. One that throws does
   * not stop the others: the errors are returned, in the order they happened.
   */
  async fail(): Promise<unknown[]> {
    const undos = this.undos.reverse();
    this.undos = [];
    const errors: unknown[] = [];
    for (const undo of undos) {
      try {
        await undo();
      } catch (err) {
        errors.push(err);
      }
    }
    return errors;
  }

  /** The operation succeeded: what it took stays taken. */
  success(): void {
    this.undos = [];
  }
}
