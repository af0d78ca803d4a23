// Calls every endpoint the npm `consul` client (2.x) has that proxy-supervisor serves,
// against the agent at 127.0.0.1:<port>, and prints one JSON line per call:
// {"call": name, "ok": result} or {"call": name, "error": message, "status": code}.
// tests/test_consul_clients.py runs it and checks the answers.
"use strict";
const Consul = require("consul");

const port = Number(process.argv[2]);
const node = process.argv[3];
const consul = new Consul({ host: "127.0.0.1", port });

async function run(name, call) {
  try {
    const result = await call();
    console.log(JSON.stringify({ call: name, ok: result === undefined ? null : result }));
  } catch (err) {
    const status = err.response ? err.response.statusCode : null;
    console.log(JSON.stringify({ call: name, error: String(err.message), status }));
  }
}

async function main() {
  await run("agent.self", async () => (await consul.agent.self()).Config.NodeName);
  await run("agent.members", async () => (await consul.agent.members()).map((m) => m.Name));
  await run("agent.service.register", () =>
    consul.agent.service.register({
      name: "cache",
      id: "cache-1",
      port: 6379,
      tags: ["lru"],
      meta: { team: "core" },
      check: { ttl: "30s", notes: "pushed by the app" },
    }),
  );
  await run("agent.service.register.checks", () =>
    consul.agent.service.register({
      name: "api",
      port: 9000,
      checks: [{ tcp: "127.0.0.1:9", interval: "10s" }, { http: "http://127.0.0.1:9/h", interval: "10s", timeout: "1s" }],
    }),
  );
  await run("agent.service.list", async () => Object.keys(await consul.agent.service.list()).sort());
  await run("agent.check.list", async () => Object.keys(await consul.agent.check.list()).sort());
  await run("agent.check.register", () =>
    consul.agent.check.register({ name: "disk", id: "disk", ttl: "60s", notes: "df" }),
  );
  await run("agent.check.pass", () => consul.agent.check.pass({ id: "disk", note: "90% free" }));
  await run("agent.check.warn", () => consul.agent.check.warn("disk"));
  await run("agent.check.fail", () => consul.agent.check.fail("disk"));
  await run("agent.check.pass.service", () => consul.agent.check.pass("service:cache-1"));
  await run("agent.check.deregister", () => consul.agent.check.deregister("disk"));
  await run("agent.check.register.script", () =>
    consul.agent.check.register({ name: "script", args: ["/bin/true"], interval: "10s" }),
  );
  await run("agent.maintenance.on", () => consul.agent.maintenance({ enable: true, reason: "patching" }));
  await run("agent.maintenance.off", () => consul.agent.maintenance(false));
  await run("agent.service.maintenance.on", () =>
    consul.agent.service.maintenance({ id: "cache-1", enable: true }),
  );
  await run("agent.service.maintenance.off", () =>
    consul.agent.service.maintenance({ id: "cache-1", enable: false }),
  );
  await run("catalog.datacenters", () => consul.catalog.datacenters());
  await run("catalog.node.list", async () => (await consul.catalog.node.list()).map((n) => n.Node));
  await run("catalog.node.services", async () =>
    Object.keys((await consul.catalog.node.services(node)).Services).sort(),
  );
  await run("catalog.service.list", () => consul.catalog.service.list());
  await run("catalog.service.nodes", async () =>
    (await consul.catalog.service.nodes("cache")).map((s) => [s.ServiceID, s.ServicePort, s.ServiceTags]),
  );
  await run("catalog.connect.nodes", async () =>
    (await consul.catalog.connect.nodes("web")).map((s) => s.ServiceID),
  );
  await run("health.node", async () => (await consul.health.node(node)).map((c) => c.CheckID).sort());
  await run("health.checks", async () => (await consul.health.checks("cache")).map((c) => c.CheckID));
  await run("health.service", async () =>
    (await consul.health.service({ service: "cache", passing: true })).map((e) => e.Service.ID),
  );
  await run("health.service.filter", async () =>
    (await consul.health.service({ service: "cache", filter: 'Service.Meta.team == "core"' })).map(
      (e) => e.Service.ID,
    ),
  );
  await run("health.state", async () => (await consul.health.state("critical")).map((c) => c.CheckID).sort());
  await run("query.create", async () =>
    (await consul.query.create({ name: "caches", service: { service: "cache", onlypassing: true } })).ID
      .length,
  );
  await run("query.list", async () => (await consul.query.list()).map((q) => q.Name));
  await run("query.execute", async () =>
    (await consul.query.execute("caches")).Nodes.map((e) => e.Service.ID),
  );
  // The client reads the first element of an array here; Consul (and this agent) answer an
  // object, so the client returns nothing: the call must succeed all the same.
  await run("query.explain", async () => (await consul.query.explain("caches")) === undefined);
  await run("query.get+update+destroy", async () => {
    const [query] = await consul.query.list();
    await consul.query.update({ query: query.ID, name: "caches", service: { service: "cache" } });
    const again = await consul.query.get(query.ID);
    await consul.query.destroy(query.ID);
    return [again.Service.OnlyPassing, (await consul.query.list()).length];
  });
  await run("status.leader", () => consul.status.leader());
  await run("status.peers", () => consul.status.peers());
  await run("kv.get", () => consul.kv.get("config/db"));
  await run("session.list", () => consul.session.list());
  await run("agent.service.deregister", () => consul.agent.service.deregister("cache-1"));
  await run("agent.service.list.after", async () => Object.keys(await consul.agent.service.list()).sort());
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
