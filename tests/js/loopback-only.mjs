// Test-only guard for the node process (loaded with `node --import`): the JS twin of
// tests/netguard/kv_netguard.py. A connection or name lookup beyond loopback is
// refused before any packet leaves, and recorded in KV_AGENT_NETGUARD_LOG so the
// Python test fails even if the SDK's retry logic swallowed the error.
//
// KV_TEST_RESOLVE="name=127.0.0.1[,name2=...]" answers lookups of those names with a
// loopback address, as a hosts entry would: it lets the SDK reach the emulator under
// a *.vault.azure.net name without touching /etc/hosts.

import dns from "node:dns";
import fs from "node:fs";
import net from "node:net";

const LOOPBACK_NAMES = new Set(["localhost", "localhost.localdomain", "ip6-localhost"]);
const overrides = new Map(
  (process.env.KV_TEST_RESOLVE ?? "")
    .split(",")
    .filter(Boolean)
    .map((pair) => pair.split("=").map((part) => part.trim().toLowerCase())),
);

function isLoopback(host) {
  const name = String(host ?? "").replace(/^\[|\]$/g, "").toLowerCase();
  if (LOOPBACK_NAMES.has(name) || name.endsWith(".localhost")) return true;
  if (net.isIPv4(name)) return name.startsWith("127.");
  return name === "::1" || name.startsWith("::ffff:127.");
}

function record(what) {
  const log = process.env.KV_AGENT_NETGUARD_LOG;
  if (log) fs.appendFileSync(log, `node:${process.pid} ${what}\n`);
}

const realLookup = dns.lookup;
dns.lookup = function lookup(hostname, options, callback) {
  const mapped = overrides.get(String(hostname).toLowerCase());
  const target = mapped ?? hostname;
  if (!isLoopback(target)) {
    record(`lookup ${hostname}`);
    const error = Object.assign(new Error(`kv-agent test guard: lookup of ${hostname} blocked`), {
      code: "ENOTFOUND",
    });
    const done = typeof options === "function" ? options : callback;
    process.nextTick(() => done(error));
    return {};
  }
  return realLookup.call(this, target, options, callback);
};

const realConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function connect(...args) {
  const first = Array.isArray(args[0]) ? args[0][0] : args[0];
  const options = typeof first === "object" && first !== null ? first : { port: first, host: args[1] };
  // An IPC connect has a path and no port; http's options carry the URL path too.
  if (options.port !== undefined || options.path === undefined) {
    const host = options.host ?? "localhost";
    const resolvable = overrides.has(String(host).toLowerCase());
    if (!resolvable && !isLoopback(host) && net.isIP(String(host))) {
      record(`connect ${host}:${options.port}`);
      const error = Object.assign(new Error(`kv-agent test guard: connect to ${host} blocked`), {
        code: "ECONNREFUSED",
      });
      process.nextTick(() => this.destroy(error));  // as a refused connection would fail
      return this;
    }
  }
  return realConnect.apply(this, args);
};
