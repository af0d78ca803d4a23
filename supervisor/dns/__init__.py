"""The DNS interface (Consul's ``<svc>.service.consul`` …): name parsing, answers from the
catalog, truncation, and the UDP/TCP listeners on the control plane's event loop."""
