# Host A of the two-host example: runs "web", whose proxy has an upstream to "db" (on host B).
# As run.py uses it (its default --base-port 23700; it moves every port with --base-port and
# points ca_key_file at a key it makes). On real hosts: each its own bind_addr, real etcd URLs.
node_name = "host-a"
bind_addr = "127.0.0.1"
ports {
  http           = 23701
  dns            = -1
  proxy_min_port = 23800
  proxy_max_port = 23849
}
connect {
  proxy { allow_managed_root = true }  # (only for trying it as root: production runs as a user)
}
cluster {
  etcd_endpoints = ["http://127.0.0.1:23791", "http://127.0.0.1:23792", "http://127.0.0.1:23793"]
  lease_ttl      = "5s"
  ca_signer      = true          # this host may hold the cluster's CA key...
  ca_key_file    = "/etc/proxy-supervisor/ca.kek" # ...sealed in etcd with this key-encryption key
}
service {
  name = "web"
  port = 23710
  connect {
    proxy {
      upstreams = [{ destination_name = "db", local_bind_port = 23712 }]
    }
  }
}
