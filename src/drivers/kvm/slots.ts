/**
 * Hands out tap network slots (src/hostnet/plan.ts) the way PortAllocator
 * hands out ports. A slot is taken when this process reserved it or when a
 * workload folder's vm.json names it: the folders are the truth after an
 * agent restart, so a surviving guest keeps its slot and nobody else gets it.
 */
import { tapSlot, tapConfigProblem, type TapNetworkConfig, type TapSlot } from '../../hostnet/plan.js';

export class SlotAllocator {
  private readonly reserved = new Set<number>();
  private cursor = 0;

  constructor(private readonly plan: TapNetworkConfig) {
    const problem = tapConfigProblem(plan);
    if (problem) throw new RangeError(`drivers.kvm.tap: ${problem}`);
  }

  slot(index: number): TapSlot {
    return tapSlot(this.plan, index);
  }

  /**
   * A reserved slot no workload folder holds, or undefined when all are in
   * use. `recorded` = the slots the folders' vm.json name, read just before:
   * the pick and the reservation happen with no await in between.
   */
  allocate(recorded: ReadonlySet<number>): TapSlot | undefined {
    for (let n = 0; n < this.plan.slots; n++) {
      const index = this.cursor;
      this.cursor = (index + 1) % this.plan.slots;
      if (this.reserved.has(index) || recorded.has(index)) continue;
      this.reserved.add(index);
      return this.slot(index);
    }
    return undefined;
  }

  release(index: number): void {
    this.reserved.delete(index);
  }
}
