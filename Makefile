# Two commands do all the set-up on a fresh machine:
#   make demo    install, then sync + query + eval on the embedded store with the weight-free encoder
#   make test    install (with the ray and raycast extras and Debian's chromium: every test runs), then run
#                the test suite
# DATA defaults to the dev meshes beside the repo; without them the demo makes its own shapes.

VENV    ?= .venv
PY      := $(VENV)/bin/python
M3D     := $(VENV)/bin/m3d
DATA    ?= $(wildcard ../shared/datasets/lpsb)
STORE   ?= .m3d
ENCODERS ?= gradhist
# torch is pinned first: an open torch requirement in a fresh environment pulls a 3 GB CUDA build.
# On a CUDA machine install the CUDA torch build of your choice into $(VENV) before `make`.
TORCH   ?= torch==2.13.0

.PHONY: install system-deps browser-deps demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: system-deps $(VENV)/.installed

# the Ray engine and the raycast renderer (open3d) are extras: `make demo` and the default path never need them
$(VENV)/.installed-extras: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[ray,raycast]'
	touch $@

# EGL/GL runtime for the moderngl renderer (Mesa on CPU). Installs only what is missing.
system-deps:
	@if ! ldconfig -p | grep -q libEGL.so.1 || ! ldconfig -p | grep -q libusb-1.0.so.0 || ! ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libusb-1.0-0 >/dev/null; \
	fi

# Debian's chromium for the page and report tests (Playwright drives it; its own browser download is
# not used). Installs only what is missing.
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

demo: install
	@if [ -z "$(DATA)" ]; then $(M3D) samples out/shapes; fi
	$(M3D) sync $(or $(DATA),out/shapes) --encoders $(ENCODERS) --store $(STORE); test $$? -le 4
	$(M3D) query $$(find $(or $(DATA),out/shapes) -name '*.off' | sort | head -1) --k 5 --store $(STORE)
	$(M3D) eval --store $(STORE) --report out/report
	$(M3D) info --store $(STORE)

# -rs: the run ends by listing every skipped test with its reason
test: install browser-deps $(VENV)/.installed-extras
	HF_HUB_OFFLINE=1 $(PY) -m pytest -rs

bench: install
	$(PY) benchmarks/bench.py --data $(or $(DATA),out/shapes)

clean:
	rm -rf $(STORE) out
