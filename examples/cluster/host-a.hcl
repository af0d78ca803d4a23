# Host A of the two-host example: runs "web", whose proxy has an upstream to "db" (on host B).
# run.py fills in the ports and the etcd endpoints; on real hosts, give each its own address.
node_name = "host-a"
bind_addr = "127.0.0.1"
ports {
  http           = HTTP_PORT
  dns            = -1
  proxy_min_port = PROXY_MIN
  proxy_max_port = PROXY_MAX
}
connect {
  proxy { allow_managed_root = true }  # (only for trying it as root: production runs as a user)
}
cluster {
  etcd_endpoints = ETCD_ENDPOINTS
  lease_ttl      = "5s"
  ca_signer      = true          # this host may hold the cluster's CA key...
  ca_key_file    = "CA_KEY_FILE" # ...sealed in etcd with this key-encryption key
}
service {
  name = "web"
  port = WEB_PORT
  connect {
    proxy {
      upstreams = [{ destination_name = "db", local_bind_port = UPSTREAM_PORT }]
    }
  }
}
