/**
 * The nftables ruleset of the tap network, as the text `nft -f` loads. Pure.
 * One table, replaced atomically (create, delete, recreate in one
 * transaction), touching only packets that come from or go to the taps: the
 * host's other traffic passes its chains untouched.
 */
import { tapSlots, type TapNetworkConfig } from './plan.js';

export const NFT_TABLE = 'paygress';
export const NFT_FAMILY = 'inet';

/**
 * Where guests must never connect to: "this network", private ranges, CGNAT,
 * loopback, link-local (cloud metadata at 169.254.169.254), multicast and
 * reserved (224/3 covers 224/4, 240/4 and the broadcast address).
 */
export const GUEST_BLOCKED_RANGES = [
  '0.0.0.0/8',
  '10.0.0.0/8',
  '100.64.0.0/10',
  '127.0.0.0/8',
  '169.254.0.0/16',
  '172.16.0.0/12',
  '192.168.0.0/16',
  '224.0.0.0/3',
] as const;

export function buildNftRuleset(cfg: TapNetworkConfig): string {
  const slots = tapSlots(cfg);
  const taps = `"${cfg.devicePrefix}*"`;
  // Which destination addresses the slot ports are forwarded on.
  const dnatMatch = cfg.publicAddresses.length > 0 ? `ip daddr { ${cfg.publicAddresses.join(', ')} }` : 'fib daddr type local';
  const dnatRules = (loopback: boolean) =>
    slots.map((s) => `    ${loopback ? 'ip daddr 127.0.0.1' : dnatMatch} tcp dport ${s.port} dnat ip to ${s.guestAddress}:22`);
  const lines = [
    `table ${NFT_FAMILY} ${NFT_TABLE} {}`,
    `delete table ${NFT_FAMILY} ${NFT_TABLE}`,
    `table ${NFT_FAMILY} ${NFT_TABLE} {`,
    '  chain input {',
    '    type filter hook input priority filter; policy accept;',
    // A guest may answer the host (readiness probes) but never open anything on it.
    `    iifname ${taps} ct state established,related accept`,
    `    iifname ${taps} drop`,
    '  }',
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    // No IPv6 for guests yet: nothing below would fence it.
    `    iifname ${taps} meta nfproto ipv6 drop`,
    `    oifname ${taps} meta nfproto ipv6 drop`,
    // Each tap may only send from its own guest address.
    ...slots.map((s) => `    iifname "${s.tap}" ip saddr != ${s.guestAddress} drop`),
    '    ct state established,related accept',
    `    iifname ${taps} oifname ${taps} drop`,
    // The resolver first: it may be on a private address the next rule blocks.
    `    iifname ${taps} ip daddr ${cfg.dnsResolver} udp dport 53 accept`,
    `    iifname ${taps} ip daddr ${cfg.dnsResolver} tcp dport 53 accept`,
    `    iifname ${taps} ip daddr { ${GUEST_BLOCKED_RANGES.join(', ')} } drop`,
    `    iifname ${taps} accept`,
    // Into a tap only the forwarded SSH port (and replies, above).
    `    oifname ${taps} ct status dnat tcp dport 22 accept`,
    `    oifname ${taps} drop`,
    '  }',
    '  chain prerouting {',
    '    type nat hook prerouting priority dstnat; policy accept;',
    ...dnatRules(false),
    '  }',
    // Connections the host itself opens to a slot port (its own public
    // address, or loopback when loopbackForward is on).
    '  chain output {',
    '    type nat hook output priority -100; policy accept;',
    ...dnatRules(false),
    ...(cfg.loopbackForward ? dnatRules(true) : []),
    '  }',
    '  chain postrouting {',
    '    type nat hook postrouting priority srcnat; policy accept;',
    `    ip saddr ${cfg.subnet} oifname != ${taps} masquerade`,
    // A loopback source cannot leave on a tap; the guest sees the host's tap address instead.
    ...(cfg.loopbackForward ? [`    ip saddr 127.0.0.0/8 oifname ${taps} masquerade`] : []),
    '  }',
    '}',
  ];
  return `${lines.join('\n')}\n`;
}
