import { isIP } from 'node:net';

/** True for the loopback interface: 127.0.0.0/8, ::1 (also IPv4-mapped) and localhost. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[(.*)\]$/, '$1').toLowerCase();
  if (h === 'localhost') return true;
  const v4 = h.startsWith('::ffff:') && isIP(h.slice(7)) === 4 ? h.slice(7) : h;
  if (isIP(v4) === 4) return v4.startsWith('127.');
  // ::1 in any spelling: only zero groups, then 1.
  if (isIP(h) === 6) return /^(0{0,4}:){2,7}0{0,3}1$/.test(h);
  return false;
}
