# /etc/proxy-supervisor/00-proxy-user.hcl: run every managed proxy as a user of its own,
# not as the agent's user, so a compromised proxy cannot read data_dir (the CA private
# key, the other proxies' tokens). The unit grants the agent exactly the capabilities this
# needs (CAP_SETUID, CAP_SETGID, CAP_KILL). A service may name a user of its own with
# connect { proxy { user = "..." } } to keep its proxy apart from the others.
connect {
  proxy {
    user = "proxy-supervisor-proxy"
  }
}
