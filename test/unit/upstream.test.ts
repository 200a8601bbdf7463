import { describe, expect, it } from 'vitest';
import { errorReply, type AccessDetails, type StatusReply } from '../../src/protocol/replies.js';
import { parseAnyRequest, podIdOf, toUpstreamReply, upstreamKind, workloadIdOfPod } from '../../src/protocol/upstream.js';

const MAX = 65_536;
const PASSWORD = 'correcthorsebattery1';
const spawn = { cashu_token: 'cashuAeyJ0b2tlbiI6W119', pod_spec_id: 'tiny', pod_image: 'ubuntu:22.04', ssh_username: 'alice', ssh_password: PASSWORD };
const plans = [{ id: 'tiny', description: 'a tiny VM' }];

describe('upstream request shapes', () => {
  it('recognises spawn, top-up and status by shape; anything with a type is v1', () => {
    expect(upstreamKind(spawn)).toBe('spawn');
    expect(upstreamKind({ pod_npub: 'container-w-0123456789ab', cashu_token: 'x' })).toBe('topup');
    expect(upstreamKind({ pod_id: 'container-w-0123456789ab' })).toBe('status');
    expect(upstreamKind({ type: 'status', pod_id: 'x' })).toBeNull();
    expect(upstreamKind({ hello: 1 })).toBeNull();
    expect(upstreamKind([spawn])).toBeNull();
    expect(upstreamKind(null)).toBeNull();
  });

  it('maps a spawn to v1: ssh_password → root_password, pod_spec_id → plan, cashu_token kept; image and user are dropped', () => {
    const r = parseAnyRequest(JSON.stringify(spawn), MAX);
    expect(r).toMatchObject({ dialect: 'upstream', kind: 'spawn', ok: true });
    if (!r.ok) throw r.error;
    expect(r.request).toEqual({ type: 'spawn', version: 1, root_password: PASSWORD, plan: 'tiny', cashu_token: spawn.cashu_token });
    const free = parseAnyRequest(JSON.stringify({ ...spawn, cashu_token: '' }), MAX);
    if (!free.ok) throw free.error;
    expect(free.request).not.toHaveProperty('cashu_token');
  });

  it('leaves the plan to the provider default when pod_spec_id is absent or null', () => {
    for (const pod_spec_id of [undefined, null]) {
      const r = parseAnyRequest(JSON.stringify({ ...spawn, pod_spec_id }), MAX);
      if (!r.ok) throw r.error;
      expect(r.request).not.toHaveProperty('plan');
    }
  });

  it('names upstream fields in validation errors and never echoes the password', () => {
    const r = parseAnyRequest(JSON.stringify({ ...spawn, ssh_password: 'short' }), MAX);
    expect(r).toMatchObject({ dialect: 'upstream', ok: false });
    if (r.ok) throw new Error('accepted');
    expect(r.error.code).toBe('invalid_request');
    expect(r.error.message).toContain('"ssh_password"');
    expect(r.error.message).not.toContain('short');
    const bad = parseAnyRequest(JSON.stringify({ ...spawn, pod_spec_id: 'Not A Plan' }), MAX);
    if (bad.ok) throw new Error('accepted');
    expect(bad.error.message).toContain('"pod_spec_id"');
  });

  it('refuses templates; maps a top-up to v1 topup by pod id, and refuses a bad one without echoing the token', () => {
    const t = parseAnyRequest(JSON.stringify({ ...spawn, template_slug: 'nostr-relay' }), MAX);
    expect(t).toMatchObject({ ok: false, dialect: 'upstream', kind: 'spawn' });
    const topup = parseAnyRequest(JSON.stringify({ pod_npub: 'container-w-0123456789ab', cashu_token: 'cashuAxyz' }), MAX);
    expect(topup).toMatchObject({ ok: true, dialect: 'upstream', kind: 'topup' });
    if (!topup.ok) throw topup.error;
    expect(topup.request).toEqual({ type: 'topup', version: 1, workload_id: 'w-0123456789ab', cashu_token: 'cashuAxyz' });
    const unknownPod = parseAnyRequest(JSON.stringify({ pod_npub: 'container-nope', cashu_token: 'cashuAxyz' }), MAX);
    expect(unknownPod).toMatchObject({ ok: false, kind: 'topup' });
    const noToken = parseAnyRequest(JSON.stringify({ pod_npub: 'container-w-0123456789ab', cashu_token: 7 }), MAX);
    if (noToken.ok) throw new Error('accepted');
    expect(noToken.error.message).toContain('cashu_token');
    for (const r of [topup, unknownPod, noToken]) if (!r.ok) expect(r.error.message).not.toContain('cashuA');
  });

  it('maps status pod ids back to workload ids; unknown shapes are not_found', () => {
    expect(workloadIdOfPod(podIdOf('w-0123456789ab'))).toBe('w-0123456789ab');
    expect(workloadIdOfPod('w-0123456789ab')).toBe('w-0123456789ab');
    expect(workloadIdOfPod('container-../../etc')).toBeNull();
    const ok = parseAnyRequest(JSON.stringify({ pod_id: 'container-w-0123456789ab' }), MAX);
    if (!ok.ok) throw ok.error;
    expect(ok.request).toEqual({ type: 'status', workload_id: 'w-0123456789ab' });
    const nf = parseAnyRequest(JSON.stringify({ pod_id: 'npub1whatever' }), MAX);
    expect(nf).toMatchObject({ ok: false, dialect: 'upstream' });
    if (nf.ok) throw new Error('accepted');
    expect(nf.error.code).toBe('not_found');
  });

  it('keeps v1 requests v1, oversize content included', () => {
    expect(parseAnyRequest(JSON.stringify({ type: 'status', workload_id: 'w-0123456789ab' }), MAX)).toMatchObject({ dialect: 'v1', ok: true });
    expect(parseAnyRequest(JSON.stringify({ ...spawn, pad: 'x'.repeat(MAX) }), MAX)).toMatchObject({ dialect: 'v1', ok: false });
    expect(parseAnyRequest('not json', MAX)).toMatchObject({ dialect: 'v1', ok: false });
  });
});

describe('upstream reply shapes', () => {
  const plan = { id: 'tiny', name: 'Tiny', vcpus: 2, memory_mb: 256, disk_gb: 2 };
  const access: AccessDetails = {
    type: 'access_details', version: 1, request_id: 'r1', workload_id: 'w-0123456789ab', host: '203.0.113.7', ssh_port: 42001,
    ssh_user: 'root', isolation_level: 'dedicated-host', expires_at: '2030-01-01T00:00:00.000Z', plan,
  };

  it('access details carry the upstream fields beside the v1 ones', () => {
    const r = toUpstreamReply(access, { kind: 'spawn', plans });
    expect(r).toMatchObject({
      ...access,
      pod_npub: 'container-w-0123456789ab',
      node_port: 42001,
      expires_at: '2030-01-01T00:00:00.000Z',
      cpu_millicores: 2000,
      memory_mb: 256,
      pod_spec_name: 'Tiny',
      pod_spec_description: 'a tiny VM',
      host_address: '203.0.113.7',
    });
    expect(r.instructions).toContain('ssh -p 42001 root@203.0.113.7');
  });

  it('status carries upstream StatusResponse fields', () => {
    const status: StatusReply = {
      type: 'status', version: 1, request_id: 'r2', workload_id: 'w-0123456789ab', state: 'running', host: 'h', ssh_port: 42001,
      isolation_level: 'dedicated-host', expires_at: '2030-01-01T00:00:00.000Z', seconds_left: 99, plan,
    };
    expect(toUpstreamReply(status, { kind: 'status', plans })).toMatchObject({
      pod_id: 'container-w-0123456789ab', status: 'running', expires_at: status.expires_at, time_remaining_seconds: 99,
      cpu_millicores: 2000, memory_mb: 256, ssh_host: 'h', ssh_port: 42001, ssh_username: 'root',
    });
  });

  it('errors carry error_type/message/details and keep the v1 code', () => {
    expect(toUpstreamReply(errorReply('r3', 'unknown_plan', 'm'), { kind: 'spawn', plans })).toEqual({
      type: 'error', version: 1, request_id: 'r3', code: 'unknown_plan', message: 'm', error_type: 'invalid_spec', details: null,
    });
    expect(toUpstreamReply(errorReply('r4', 'payment_required', 'm'), { kind: 'topup', plans })).toMatchObject({ error_type: 'topup_not_supported' });
    expect(toUpstreamReply(errorReply('r5', 'not_found', 'm'), { kind: 'status', plans })).toMatchObject({ error_type: 'not_found' });
    expect(toUpstreamReply(errorReply('r6', 'token_already_spent', 'm'), { kind: 'topup', plans })).toMatchObject({ error_type: 'token_already_spent' });
  });

  it('every error reply carries error_type, even one sent before the request shape is known', () => {
    expect(errorReply('r7', 'rate_limited', 'm')).toMatchObject({ code: 'rate_limited', error_type: 'rate_limited' });
    expect(errorReply('r8', 'invalid_request', 'm').error_type).toBe('invalid_request');
  });

  it('a top-up reply carries upstream TopUpResponse fields beside the v1 ones', () => {
    const r = toUpstreamReply(
      { type: 'topped_up', version: 1, request_id: 'r9', workload_id: 'w-0123456789ab', extended_seconds: 600, expires_at: '2030-01-01T00:10:00.000Z', paid_msats: 6000 },
      { kind: 'topup', plans },
    );
    expect(r).toMatchObject({
      success: true, pod_npub: 'container-w-0123456789ab', extended_duration_seconds: 600, new_expires_at: '2030-01-01T00:10:00.000Z',
      message: expect.any(String), type: 'topped_up', extended_seconds: 600,
    });
  });
});
