# A managed proxy that is a custom command instead of the built-in proxy: a small TCP
# forwarder that configures itself from the agent's API, as any Consul custom proxy does.
# Run from the repository root:
#   proxy-supervisor agent -dev -config-file examples/agent.hcl -config-file examples/custom-proxy/custom.hcl
service {
  name = "legacy"
  port = 9095

  connect {
    proxy {
      command = ["python3", "examples/custom-proxy/tcp_forward.py"]
      config {
        bind_address = "127.0.0.1"
        bind_port    = 21095
      }
    }
  }
}
