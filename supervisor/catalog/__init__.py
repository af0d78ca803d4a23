"""The agent's catalog: services (config, API, managed proxies), health checks,
intentions and prepared queries, with Consul's index-blocking semantics."""
