# Agent settings for the quick start. Run from the repository root:
#   proxy-supervisor agent -dev -config-dir examples/
datacenter = "dc1"
log_level  = "INFO"

# The proxies' public listeners default to bind_addr; the demo keeps everything on loopback.
bind_addr = "127.0.0.1"

ports {
  http           = 8500
  proxy_min_port = 21000
  proxy_max_port = 21255
}

connect {
  proxy {
    # DEMO ONLY: lets the quick start work in a root shell or container. Never copy this
    # to production: run the agent as an unprivileged user instead (see the README).
    allow_managed_root = true
  }
}
