# Host B of the two-host example: runs "db" behind its built-in proxy.
node_name = "host-b"
bind_addr = "127.0.0.1"
ports {
  http           = HTTP_PORT
  dns            = -1
  proxy_min_port = PROXY_MIN
  proxy_max_port = PROXY_MAX
}
connect {
  proxy { allow_managed_root = true }
}
cluster {
  etcd_endpoints = ETCD_ENDPOINTS
  lease_ttl      = "5s"
}
service {
  name = "db"
  port = DB_PORT
  connect { proxy {} }
}
