# A service with a managed proxy. Its proxy is a custom command (a small TCP forwarder
# that configures itself through the agent's API, as any Consul custom proxy does).
service {
  name = "web"
  port = 8080

  connect {
    proxy {
      command = ["python3", "examples/proxies/tcp_forward.py"]
      config {
        bind_address = "127.0.0.1"
        bind_port    = 21000
      }
    }
  }
}
