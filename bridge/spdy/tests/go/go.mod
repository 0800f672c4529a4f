module fleetlet.dev/spdy-interop

go 1.23

require github.com/moby/spdystream v0.5.1
