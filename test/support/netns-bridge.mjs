// `node netns-bridge.mjs HOST:PORT UNIX_PATH`: accept TCP on HOST:PORT and
// pipe each connection to the unix socket UNIX_PATH. Run inside a network
// namespace, it lets processes there reach a server in the test process (which
// listens on the unix socket): unix socket paths are not bound to a namespace.
import { connect, createServer } from 'node:net';

const [hostPort, unixPath] = process.argv.slice(2);
const i = hostPort.lastIndexOf(':');
const srv = createServer((inbound) => {
  const outbound = connect(unixPath);
  inbound.pipe(outbound).pipe(inbound);
  const end = () => {
    inbound.destroy();
    outbound.destroy();
  };
  inbound.on('error', end).on('close', end);
  outbound.on('error', end).on('close', end);
});
srv.listen({ host: hostPort.slice(0, i), port: Number(hostPort.slice(i + 1)) }, () => console.log('ready'));
