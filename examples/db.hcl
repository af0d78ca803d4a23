# "db": an app on 127.0.0.1:9090, reachable from other services only through its managed
# proxy (the built-in mutual-TLS proxy: `connect { proxy {} }` is all it takes).
service {
  name = "db"
  port = 9090

  connect {
    proxy {}
  }
}
