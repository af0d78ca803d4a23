# Host B of the two-host example: runs "db" behind its built-in proxy.
node_name = "host-b"
bind_addr = "127.0.0.1"
ports {
  http           = 23702
  dns            = -1
  proxy_min_port = 23850
  proxy_max_port = 23899
}
connect {
  proxy { allow_managed_root = true }
}
cluster {
  etcd_endpoints = ["http://127.0.0.1:23791", "http://127.0.0.1:23792", "http://127.0.0.1:23793"]
  lease_ttl      = "5s"
}
service {
  name = "db"
  port = 23711
  connect { proxy {} }
}
