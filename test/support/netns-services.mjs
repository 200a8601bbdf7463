// Test services inside a network namespace: `node netns-services.mjs SPEC`
// with SPEC = JSON {tcp: [{host, port, token}], dns?: {host, answer}}.
// TCP listeners send their token and close; the DNS responder answers every
// A query with `answer` and prints `dns-query NAME FROM-ADDRESS` for each
// query it sees (also ones it cannot answer), so a test sees what arrived.
import { createServer } from 'node:net';
import { createSocket } from 'node:dgram';

const spec = JSON.parse(process.argv[2]);
let pending = spec.tcp.length + (spec.dns ? 1 : 0);
const up = () => {
  if (--pending === 0) console.log('ready');
};
for (const { host, port, token } of spec.tcp) {
  const srv = createServer((s) => {
    s.on('error', () => undefined);
    s.end(`${token}\n`);
  });
  srv.listen({ host, port, exclusive: true }, up);
}

function readName(msg, offset) {
  const labels = [];
  while (offset < msg.length && msg[offset] !== 0 && labels.length < 64) {
    const len = msg[offset];
    labels.push(msg.subarray(offset + 1, offset + 1 + len).toString('latin1'));
    offset += 1 + len;
  }
  return { name: labels.join('.'), end: offset + 1 };
}

if (spec.dns) {
  const sock = createSocket('udp4');
  sock.on('message', (msg, rinfo) => {
    if (msg.length < 12) return;
    const { name, end } = readName(msg, 12);
    console.log(`dns-query ${name.replace(/[^A-Za-z0-9.-]/g, '?')} ${rinfo.address}`);
    const qtype = msg.readUInt16BE(end);
    const question = msg.subarray(12, end + 4);
    const header = Buffer.alloc(12);
    msg.copy(header, 0, 0, 2);
    header.writeUInt16BE(0x8180, 2);
    header.writeUInt16BE(1, 4);
    const answers = qtype === 1 ? 1 : 0;
    header.writeUInt16BE(answers, 6);
    const parts = [header, question];
    if (answers) {
      const rr = Buffer.alloc(16);
      rr.writeUInt16BE(0xc00c, 0);
      rr.writeUInt16BE(1, 2);
      rr.writeUInt16BE(1, 4);
      rr.writeUInt32BE(60, 6);
      rr.writeUInt16BE(4, 10);
      spec.dns.answer.split('.').forEach((b, i) => rr.writeUInt8(Number(b), 12 + i));
      parts.push(rr);
    }
    sock.send(Buffer.concat(parts), rinfo.port, rinfo.address);
  });
  sock.bind({ address: spec.dns.host, port: 53 }, up);
}
