# socksfwd — see README.md. Every target works on a fresh Debian 12 machine
# as root: `deps` installs the Debian packages the tests and demo need.

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
BIN      := bin
# An execution count, not a duration: Go 1.26's fuzz coordinator can fail a
# target with a spurious "context deadline exceeded" when a -fuzztime
# duration expires (golang/go#75804, fixed in 1.27). ~10 s per target here.
FUZZTIME ?= 200000x

# Systems every package (tests included) must build and vet for.
CROSS    := linux/arm64 linux/arm darwin/arm64 windows/amd64 freebsd/amd64
# Systems `make release` builds socksfwd for.
RELEASE  := linux/amd64 linux/arm64 linux/arm darwin/arm64 windows/amd64 freebsd/amd64
DIST     := dist

# command → Debian package, for everything the tests start or drive.
PEERS := danted:dante-server microsocks:microsocks sshd:openssh-server ssh:openssh-client \
	ss-server:shadowsocks-libev dnsmasq:dnsmasq-base unbound:unbound dig:dnsutils kdig:knot-dnsutils dnsperf:dnsperf \
	psql:postgresql-client ip:iproute2 iperf3:iperf3 proxychains4:proxychains4 socat:socat \
	redsocks:redsocks nft:nftables iptables-restore:iptables setpriv:util-linux curl:curl \
	zsh:zsh fish:fish groff:groff systemd-socket-activate:systemd systemd-analyze:systemd privoxy:privoxy \
	/usr/lib/postgresql/15/bin/initdb:postgresql

.PHONY: all build test cross release man demo bench fuzz lint deps peer-versions clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/socksfwd ./cmd/socksfwd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/socksbench ./cmd/socksbench

# Install the Debian packages of missing peers (apt-get update first, once).
deps:
	@missing=""; for p in $(PEERS); do cmd=$${p%%:*}; pkg=$${p#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x $$cmd ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  systemctl disable --now danted ssh postgresql redsocks privoxy unbound >/dev/null 2>&1 || true; \
	fi

peer-versions:
	@echo "peers:"
	@echo "  $$(danted -v 2>&1 | head -1)"
	@echo "  microsocks $$(dpkg-query -W -f='$${Version}' microsocks 2>/dev/null)"
	@echo "  $$(ssh -V 2>&1)"
	@echo "  $$(/usr/lib/postgresql/15/bin/postgres --version)"
	@echo "  $$(iperf3 --version 2>&1 | head -1)"
	@echo "  proxychains4 $$(dpkg-query -W -f='$${Version}' proxychains4 2>/dev/null)"
	@echo "  $$(ss-server -h 2>&1 | grep -m1 shadowsocks)"
	@echo "  $$(dnsmasq --version | head -1)"
	@echo "  $$(unbound -V 2>&1 | head -1)"
	@echo "  $$(systemd-socket-activate --version | head -1)"
	@echo "  $$(privoxy --version 2>&1 | head -1)"

# Packages are tested one at a time (-p 1): peers listen on ports chosen
# free a moment before, and another package's burst of connections can take
# such a port in between (its ephemeral ports come from the same range).
test: deps peer-versions cross
	$(GO) vet ./...
	$(GO) test -race -count=1 -p 1 ./...

# Build and vet ./... for each of CROSS; stops at the first target that
# fails, naming it. Silent when all pass but for one line.
cross:
	@for t in $(CROSS); do \
	  export GOOS=$${t%/*} GOARCH=$${t#*/} CGO_ENABLED=0; \
	  $(GO) build ./... && $(GO) vet ./... || { echo "cross: $$t fails (above)" >&2; exit 1; }; \
	done; echo "cross: build and vet pass for $(CROSS)"

# Static binaries for each of RELEASE in dist/, named
# socksfwd-VERSION-OS-ARCH, and their SHA256SUMS (sha256sum -c reads it).
release:
	rm -rf $(DIST) && mkdir -p $(DIST)
	@for t in $(RELEASE); do \
	  os=$${t%/*} arch=$${t#*/} ext=; [ $$os = windows ] && ext=.exe; \
	  out=$(DIST)/socksfwd-$(VERSION)-$$os-$$arch$$ext; echo "$$out"; \
	  GOOS=$$os GOARCH=$$arch CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $$out ./cmd/socksfwd || exit 1; \
	done
	cd $(DIST) && sha256sum socksfwd-* > SHA256SUMS

# The man page, from the flag definitions; a test fails when it is stale.
man:
	$(GO) run ./cmd/socksfwd man > docs/socksfwd.1.tmp && mv docs/socksfwd.1.tmp docs/socksfwd.1

demo: deps build
	$(GO) run ./cmd/socksbench demo

bench: deps build
	$(GO) run ./cmd/socksbench bench

# A short, bounded run of every fuzz target.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

lint:
	@test -z "$$(gofmt -l .)" || { gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

clean:
	rm -rf $(BIN) $(DIST)
