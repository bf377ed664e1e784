# artifactfs: two commands on a fresh Debian machine, as root:
#   make run    install everything, log a demo artifact, mount the drive at $(MOUNT) and list it
#   make test   install everything, type-check (mypy, configured in pyproject.toml), run the whole test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MOUNT ?= /tmp/artifactfs
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv rsync attr postgresql procps psmisc

.PHONY: run test deps system-deps venv demo mount umount bench clean help install install-systemd uninstall

help:
	@echo "make run    - set up, log a demo artifact into the embedded store, mount it at $(MOUNT)"
	@echo "make test   - set up, run all tests"
	@echo "make umount - unmount $(MOUNT)"
	@echo "make bench  - run the benchmarks in bench/ (ratio tables)"
	@echo "make install [PREFIX=/opt/artifactfs] - system-wide install usable by any user"
	@echo "make install-systemd - units, the server's user, the fstab helper (after make install)"

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root (or install:$$missing)"; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	fi
	@[ -e /dev/fuse ] || echo "warning: /dev/fuse is missing; mount tests will be skipped"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m compileall -q client mountfs server >/dev/null
	touch $@

venv: $(VENV)/.installed

deps: system-deps venv

demo: deps
	$(BIN)/python -m client.demo
	$(BIN)/artifactfs ls
	$(BIN)/artifactfs ls "$$($(BIN)/python -c 'import client.settings as s; print(s.default_entity())')/demo/mnist-mini"

mount: deps
	@if mountpoint -q $(MOUNT); then echo "$(MOUNT) is already mounted"; else \
	  mkdir -p $(MOUNT) && $(BIN)/artifactfs mount $(MOUNT); fi

run: demo mount
	@echo; echo "== the demo artifact through the drive at $(MOUNT) =="
	ls -l $(MOUNT)/*/demo/
	ls -lR "$$(ls -d $(MOUNT)/*/demo/mnist-mini:latest)" | head -20
	@echo; echo "The drive stays mounted. Unmount with: make umount   (or: $(BIN)/artifactfs umount $(MOUNT))"

umount:
	$(BIN)/artifactfs umount $(MOUNT)

test: deps
	$(BIN)/python -m compileall -q client mountfs server tests >/dev/null
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

# bench/peers' bench-only tools (never installed by run/test): rclone and s3fs from Debian, s3rver
# from npm into .bench/node (git-ignored).  PEERS_ARGS sizes its run (see bench/peers --help).
PEERS_ARGS ?= --quick
bench: deps
	@missing=""; for p in rclone s3fs; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing bench tools:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } || \
	  echo "warning: could not install$$missing; bench/peers skips those columns"; fi
	@[ -e .bench/node/node_modules/s3rver/bin/s3rver.js ] || { mkdir -p .bench/node && \
	  npm install --prefix .bench/node --no-audit --no-fund --silent s3rver@3.7.1 || \
	  echo "warning: npm install s3rver failed; bench/peers skips the s3rver endpoint"; }
	for b in bench/hash_dir bench/mount_read bench/draft_commit bench/remote bench/load; do [ -x $$b ] && $(BIN)/python $$b || true; done
	$(BIN)/python bench/peers $(PEERS_ARGS)

# System-wide install, usable by any user: a venv of its own under $(PREFIX) (not an editable
# install pointing into this checkout or a home directory), world-readable, and the command on PATH.
PREFIX ?= /opt/artifactfs
BINDIR ?= /usr/local/bin
SYSTEMD_DIR ?= /etc/systemd/system

install:
	$(PY) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --upgrade pip
	$(PREFIX)/bin/pip install -q --no-cache-dir '.'
	install -d -m 0755 $(PREFIX)/share/doc/artifactfs
	install -m 0644 README.md docs/*.md $(PREFIX)/share/doc/artifactfs/
	chmod -R a+rX $(PREFIX)
	ln -sf $(PREFIX)/bin/artifactfs $(BINDIR)/artifactfs
	@echo "installed $(PREFIX); $(BINDIR)/artifactfs -> $(PREFIX)/bin/artifactfs"

# The units call $(PREFIX)/bin/artifactfs; the server runs as the system user artifactfs.
install-systemd:
	@[ -x $(PREFIX)/bin/artifactfs ] || { echo "run 'make install' first"; exit 1; }
	getent group artifactfs >/dev/null || groupadd --system artifactfs
	getent passwd artifactfs >/dev/null || useradd --system --gid artifactfs --home-dir /var/lib/artifactfs \
	  --no-create-home --shell /usr/sbin/nologin artifactfs
	install -d -m 0755 /etc/artifactfs $(SYSTEMD_DIR)/artifactfs-server.service.d
	for u in artifactfs-mount@.service artifactfs-server.service artifactfs-mount.automount; do \
	  sed 's|/opt/artifactfs|$(PREFIX)|g' systemd/$$u > $(SYSTEMD_DIR)/$$u && chmod 0644 $(SYSTEMD_DIR)/$$u; done
	[ -e $(SYSTEMD_DIR)/artifactfs-server.service.d/listen.conf ] || \
	  install -m 0644 systemd/artifactfs-server.service.d/listen.conf $(SYSTEMD_DIR)/artifactfs-server.service.d/
	sed 's|/opt/artifactfs|$(PREFIX)|g' systemd/mount.fuse.artifactfs > /sbin/mount.fuse.artifactfs
	chmod 0755 /sbin/mount.fuse.artifactfs
	-systemctl daemon-reload
	@echo 'now e.g.: systemctl enable --now "artifactfs-mount@$$(systemd-escape --path /mnt/artifacts).service"'

uninstall:
	rm -f $(BINDIR)/artifactfs /sbin/mount.fuse.artifactfs $(SYSTEMD_DIR)/artifactfs-mount@.service \
	  $(SYSTEMD_DIR)/artifactfs-server.service $(SYSTEMD_DIR)/artifactfs-mount.automount
	rm -rf $(PREFIX)
	-systemctl daemon-reload

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
