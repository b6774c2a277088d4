# The README's commands. `make demo`, `make test` and `make bench` install what is missing first.
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := qemu-system-x86 qemu-utils ovmf grub-common grub2-common grub-pc-bin \
	grub-efi-amd64-bin ipxe-qemu mtools dosfstools e2fsprogs xfsprogs fdisk gdisk util-linux mount \
	xorriso age busybox-static zstd pigz cpio kmod udev python3-venv strace gcc libc6-dev zlib1g-dev dnsmasq-base \
	libvirt-daemon-system libvirt-dev pkg-config

.PHONY: setup demo test lint bench clean install

# `make install` puts the CLI on PATH: a link $(PREFIX)/bin/mbrescue to this checkout's
# virtualenv (which `setup` makes), so the README's bare `mbrescue` works.
PREFIX ?= /usr/local

# Idempotent and quiet when nothing is missing: Debian packages, apt lists (the rescue
# kit is fetched with apt-get download), then the virtualenv with the project editable.
setup:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null || exit 1; \
	fi; \
	if ! apt-cache show --no-all-versions busybox-static 2>/dev/null | grep -q '^SHA256:'; then \
	  apt-get update -q >/dev/null || exit 1; \
	fi
	@if [ ! -x $(BIN)/mbrescue ] || [ ! -f $(VENV)/.installed ] || [ pyproject.toml -nt $(VENV)/.installed ]; then \
	  echo "setup: creating the virtualenv $(VENV)"; \
	  python3 -m venv $(VENV) && \
	  $(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' ; \
	  $(BIN)/mbrescue --help >/dev/null && touch $(VENV)/.installed; \
	fi

install: setup
	@mkdir -p $(PREFIX)/bin && ln -sfn $(CURDIR)/$(BIN)/mbrescue $(PREFIX)/bin/mbrescue && \
	  echo "install: $(PREFIX)/bin/mbrescue -> $(CURDIR)/$(BIN)/mbrescue"

demo: setup
	@$(BIN)/python -m builder.demo

lint: setup
	$(BIN)/ruff check builder tests
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest -v -n 2 --dist loadfile --durations=20 tests

bench: setup
	@$(BIN)/python -m builder.bench $(SECTIONS)

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
