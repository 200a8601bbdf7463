/** A door the test opens by hand: a fake create, destroy or send waits at it while it is set. */
export class Gate {
  private open!: () => void;
  readonly passed = new Promise<void>((resolve) => (this.open = resolve));
  release(): void {
    this.open();
  }
}
