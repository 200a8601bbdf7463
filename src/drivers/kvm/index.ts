export { KvmDriver } from './driver.js';
export type { VmMeta } from './vm-meta.js';
export type { KvmDriverConfig } from './config.js';
export { buildQemuArgv, QEMU_SANDBOX, type QemuArgs } from './argv.js';
export { VM_FILES, vmFile, workloadDir, isWorkloadId, SUN_PATH_MAX, type VmFileKey } from './workload-files.js';
export {
  buildCloudConfig,
  cloudConfigObject,
  metaDataObject,
  finalMessageFor,
  FINAL_MESSAGE_PREFIX,
  SEED_YAML_OPTIONS,
  SSHD_DROPIN_PATH,
  type CloudConfigInput,
  type SeedFiles,
} from './cloud-config.js';
export { qemuOptionValue, qemuPlainValue, QemuOptionError } from './qemu-option.js';
export { resolveAccel, kvmUsable } from './accel.js';
export { PortAllocator, canBind } from './ports.js';
export { argvHasVmName, isVmProcess, isAlive, findVmPids, readPidfile, stopVmProcess, waitForPidfile } from './process.js';
export { writeSeedIso } from './seed.js';
export { ensureBaseImage, BaseImageError, type BaseImageInfo } from './base-image.js';
export { probeSshBanner, consoleTail } from './readiness.js';
