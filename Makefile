# Build and install kata-ksm-throttler as a system service.
#
#   make                              # cargo build --release
#   sudo make install PREFIX=/usr     # what a distribution package does (DESTDIR=... to stage)
#   sudo make uninstall PREFIX=/usr
#
# The system bus and polkit only read /usr/share (and /etc), and systemd /usr/lib/systemd/system
# (and /etc): with the default PREFIX=/usr/local the files land where none of them look, as is
# usual for a local build. The D-Bus activation file and the unit name the binary's installed
# path, which install writes into them.

PREFIX ?= /usr/local
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR ?= $(PREFIX)/share
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DBUS_POLICYDIR ?= $(DATADIR)/dbus-1/system.d
DBUS_SERVICEDIR ?= $(DATADIR)/dbus-1/system-services
POLKIT_ACTIONDIR ?= $(DATADIR)/polkit-1/actions
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(DATADIR)/man
SYSCONFDIR ?= /etc
DESTDIR ?=

CARGO ?= cargo
CARGO_TARGET_DIR ?= target
BINARY ?= $(CARGO_TARGET_DIR)/release/kata-ksm-throttler
# The Kata-side binaries (grpc-shim/, vc-trigger/), built beside the throttler.
GRPC_BINARY ?= $(dir $(BINARY))kata-ksm-throttler-grpc
TRIGGER_BINARY ?= $(dir $(BINARY))kata-vc-throttler
CTL_BINARY ?= $(dir $(BINARY))ksmtctl
# The Prometheus exporter (metrics-exporter/).
EXPORTER_BINARY ?= $(dir $(BINARY))kata-ksm-throttler-exporter
# Man pages and shell completions, generated from the clap definitions by `cargo run -p xtask`.
DOCS ?= $(CARGO_TARGET_DIR)/docs
COMPLETED = $(NAME) ksmtctl $(KATA_BINARIES)
INSTALL ?= install

NAME := kata-ksm-throttler
BUS_NAME := org.kata.KsmThrottler
SHIPPED_EXEC := /usr/libexec/$(NAME)
KATA_BINARIES := kata-ksm-throttler-grpc kata-vc-throttler kata-ksm-throttler-exporter
KATA_UNITS := kata-ksm-throttler-grpc.socket kata-vc-throttler.service \
	kata-ksm-throttler-exporter.socket kata-ksm-throttler-exporter.service
# ksmtctl metrics for node_exporter's textfile collector, every 30 s (they name ksmtctl's path).
METRICS_UNITS := kata-ksm-throttler-metrics.service kata-ksm-throttler-metrics.timer

.PHONY: all build install uninstall test

all: build

build:
	$(CARGO) build --release --locked -p kata-ksm-throttler -p kata-ksm-throttler-grpc -p kata-vc-throttler -p kata-ksm-throttler-exporter
	$(CARGO) run --release --locked -q -p xtask -- docs "$(DOCS)" >/dev/null

# The README's test command: the Debian packages the tests need (as root, when missing), then
# cargo test --workspace (or ARGS, e.g. make test ARGS='--test bus_contract').
test:
	tools/test.sh $(ARGS)

# Installs what is built; it does not build, so that `sudo make install` never runs cargo as root.
install:
	@test -x "$(BINARY)" || { echo "$(BINARY) is missing: run make first (or pass BINARY=...)" >&2; exit 1; }
	@test -x "$(GRPC_BINARY)" || { echo "$(GRPC_BINARY) is missing: run make first (or pass GRPC_BINARY=...)" >&2; exit 1; }
	@test -x "$(TRIGGER_BINARY)" || { echo "$(TRIGGER_BINARY) is missing: run make first (or pass TRIGGER_BINARY=...)" >&2; exit 1; }
	@test -x "$(EXPORTER_BINARY)" || { echo "$(EXPORTER_BINARY) is missing: run make first (or pass EXPORTER_BINARY=...)" >&2; exit 1; }
	$(INSTALL) -D -m 0755 "$(BINARY)" "$(DESTDIR)$(LIBEXECDIR)/$(NAME)"
	$(INSTALL) -D -m 0644 dbus/$(BUS_NAME).conf "$(DESTDIR)$(DBUS_POLICYDIR)/$(BUS_NAME).conf"
	$(INSTALL) -D -m 0644 polkit/$(BUS_NAME).policy "$(DESTDIR)$(POLKIT_ACTIONDIR)/$(BUS_NAME).policy"
	$(INSTALL) -d "$(DESTDIR)$(DBUS_SERVICEDIR)" "$(DESTDIR)$(UNITDIR)"
	sed 's|$(SHIPPED_EXEC)|$(LIBEXECDIR)/$(NAME)|' dbus/$(BUS_NAME).service \
		> "$(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service"
	sed 's|$(SHIPPED_EXEC)|$(LIBEXECDIR)/$(NAME)|' systemd/$(NAME).service \
		> "$(DESTDIR)$(UNITDIR)/$(NAME).service"
	chmod 0644 "$(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service" "$(DESTDIR)$(UNITDIR)/$(NAME).service"
	$(INSTALL) -D -m 0755 "$(GRPC_BINARY)" "$(DESTDIR)$(LIBEXECDIR)/kata-ksm-throttler-grpc"
	$(INSTALL) -D -m 0755 "$(TRIGGER_BINARY)" "$(DESTDIR)$(LIBEXECDIR)/kata-vc-throttler"
	$(INSTALL) -D -m 0755 "$(EXPORTER_BINARY)" "$(DESTDIR)$(LIBEXECDIR)/kata-ksm-throttler-exporter"
	$(INSTALL) -D -m 0644 systemd/$(NAME).sysusers "$(DESTDIR)$(SYSUSERSDIR)/$(NAME).conf"
	for unit in $(KATA_UNITS); do \
		sed 's|/usr/libexec/|$(LIBEXECDIR)/|' systemd/$$unit > "$(DESTDIR)$(UNITDIR)/$$unit" && \
		chmod 0644 "$(DESTDIR)$(UNITDIR)/$$unit" || exit 1; \
	done
	@test -x "$(CTL_BINARY)" || { echo "$(CTL_BINARY) is missing: run make first (or pass CTL_BINARY=...)" >&2; exit 1; }
	@test -d "$(DOCS)/man" || { echo "$(DOCS) is missing: run make first (or cargo run -p xtask -- docs $(DOCS))" >&2; exit 1; }
	$(INSTALL) -D -m 0755 "$(CTL_BINARY)" "$(DESTDIR)$(BINDIR)/ksmtctl"
	for unit in $(METRICS_UNITS); do \
		sed 's|/usr/bin/ksmtctl|$(BINDIR)/ksmtctl|' systemd/$$unit > "$(DESTDIR)$(UNITDIR)/$$unit" && \
		chmod 0644 "$(DESTDIR)$(UNITDIR)/$$unit" || exit 1; \
	done
	# The administrator's file is never overwritten.
	test -e "$(DESTDIR)$(SYSCONFDIR)/$(NAME)/config.toml" || \
		$(INSTALL) -D -m 0644 config/config.toml "$(DESTDIR)$(SYSCONFDIR)/$(NAME)/config.toml"
	$(INSTALL) -D -m 0644 -t "$(DESTDIR)$(MANDIR)/man8" "$(DOCS)"/man/*.8
	$(INSTALL) -D -m 0644 -t "$(DESTDIR)$(MANDIR)/man1" "$(DOCS)"/man/*.1
	# Completions for every binary: bash-completion looks them up by the command's base name, so
	# the libexec daemons complete too when run by path.
	for b in $(COMPLETED); do \
		$(INSTALL) -D -m 0644 "$(DOCS)/completions/$$b.bash" "$(DESTDIR)$(DATADIR)/bash-completion/completions/$$b" && \
		$(INSTALL) -D -m 0644 "$(DOCS)/completions/_$$b" "$(DESTDIR)$(DATADIR)/zsh/vendor-completions/_$$b" && \
		$(INSTALL) -D -m 0644 "$(DOCS)/completions/$$b.fish" "$(DESTDIR)$(DATADIR)/fish/vendor_completions.d/$$b.fish" || exit 1; \
	done

uninstall:
	rm -f "$(DESTDIR)$(LIBEXECDIR)/$(NAME)" \
		"$(DESTDIR)$(DBUS_POLICYDIR)/$(BUS_NAME).conf" \
		"$(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service" \
		"$(DESTDIR)$(POLKIT_ACTIONDIR)/$(BUS_NAME).policy" \
		"$(DESTDIR)$(UNITDIR)/$(NAME).service" \
		"$(DESTDIR)$(SYSUSERSDIR)/$(NAME).conf" \
		$(foreach b,$(KATA_BINARIES),"$(DESTDIR)$(LIBEXECDIR)/$(b)") \
		$(foreach u,$(KATA_UNITS) $(METRICS_UNITS),"$(DESTDIR)$(UNITDIR)/$(u)") \
		"$(DESTDIR)$(BINDIR)/ksmtctl" \
		$(foreach b,$(COMPLETED),"$(DESTDIR)$(DATADIR)/bash-completion/completions/$(b)") \
		$(foreach b,$(COMPLETED),"$(DESTDIR)$(DATADIR)/zsh/vendor-completions/_$(b)") \
		$(foreach b,$(COMPLETED),"$(DESTDIR)$(DATADIR)/fish/vendor_completions.d/$(b).fish")
	rm -f $(foreach b,$(NAME) $(KATA_BINARIES),"$(DESTDIR)$(MANDIR)/man8/$(b).8") "$(DESTDIR)$(MANDIR)"/man1/ksmtctl*.1
	# $(SYSCONFDIR)/$(NAME)/config.toml is the administrator's: left in place.
