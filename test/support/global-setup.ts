// Placeholder replaced as the harness grows (guest build check etc.).
export default function setup(): void {}
