# "web": its managed proxy opens a local upstream listener on 127.0.0.1:9191 that leads to
# a healthy "db" instance over mutual TLS (authorized by intentions).
service {
  name = "web"
  port = 8080

  connect {
    proxy {
      upstreams = [
        {
          destination_name = "db"
          local_bind_port  = 9191
        },
      ]
    }
  }
}
