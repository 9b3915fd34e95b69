# Two commands: `make serve` to use the explorer, `make test` to check everything (what CI runs).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
# wasm-opt comes from npm binaryen (Debian's breaks hydration); cargo-leptos and wasm-bindgen from cargo.
export PATH := $(CURDIR)/end2end/node_modules/.bin:$(HOME)/.cargo/bin:$(PATH)

CARGO_LEPTOS_VERSION := 0.3.10
# wasm-bindgen-cli must equal the wasm-bindgen crate in Cargo.lock.
WASM_BINDGEN_VERSION := $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/^version = "\(.*\)"$$/\1/p;q}' Cargo.lock)
# The two tools install in a quick release profile: cargo-leptos asks for fat LTO in one codegen unit, which
# took most of CI's install time on two cores, and neither tool's own speed matters next to the builds it runs.
QUICK_INSTALL := CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
	CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_INCREMENTAL=false
# cargo-leptos builds debug with this flag; sharing it lets clippy and tests reuse its build cache.
TEST_RUSTFLAGS := --cfg erase_components
URL := http://127.0.0.1:3000

.PHONY: setup setup-test serve test release bench demo-model

setup: end2end/node_modules/.installed
	rustup target add wasm32-unknown-unknown
	@if ! cargo leptos --version 2>/dev/null | grep -qwF '$(CARGO_LEPTOS_VERSION)'; then \
		echo "installing cargo-leptos $(CARGO_LEPTOS_VERSION) (about 14 minutes on two cores)"; \
		$(QUICK_INSTALL) cargo install cargo-leptos --version $(CARGO_LEPTOS_VERSION) --locked; \
	fi
	@if ! wasm-bindgen --version 2>/dev/null | grep -qwF '$(WASM_BINDGEN_VERSION)'; then \
		echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) (about 3 minutes)"; \
		$(QUICK_INSTALL) cargo install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --force; \
	fi

# npm ci when node_modules is missing or older than the lockfile.
end2end/node_modules/.installed: end2end/package-lock.json
	cd end2end && npm ci --no-audit --no-fund
	touch $@

setup-test: setup
	@if [ ! -x /usr/bin/chromium ]; then \
		apt-get update && apt-get install -y chromium; \
	fi
	@# The CUDA kernels are tested on the CPU as C++ (server/tests/cuda_kernels_emulated.rs).
	@if ! command -v c++ >/dev/null; then \
		apt-get update && apt-get install -y g++; \
	fi

# `make serve` and the end-to-end tests show the built-in demo (server/demo); SPD_MODEL, SPD_DB and
# SPD_PROMPTS in the environment choose another run (see README).
serve: setup
	@echo "Serving $(or $(SPD_MODEL),the built-in demo) on $(URL) once built"
	cargo leptos serve

# Regenerates the built-in demo in server/demo (corpus, tokenizer, target GPT2Simple, SPD run) from its
# seeds, bit for bit: 21 minutes on the 2-core dev machine (server/demo/README.md has the figures). Two matmul
# threads, always: the bits depend on it.
demo-model:
	RAYON_NUM_THREADS=2 RUSTFLAGS='$(TEST_RUSTFLAGS)' cargo run --release -p server --bin demo_model -- --out server/demo

# Timings of the attribution engines and the CI pass (run on an idle machine).
bench:
	cargo run --release --bin bench

release: setup
	cargo leptos build --release

# `cargo test` leaves out frontend: with it, feature unification builds the server with leptos'
# `hydrate` as well as `ssr`, and server-side rendering then panics outside a tokio LocalSet.
# The `bins` stage builds the binaries as the README's `cargo run --release --bin …` does, without
# `--cfg erase_components` (the page's full view types once overflowed the compiler's query depth
# there, which `cargo check` does not reach: it never lays out the monomorphized views). It costs
# about 13 minutes cold on two cores (the release dependencies) and 2 minutes warm.
test: setup-test
	@stage() { local name=$$1; shift; local t0=$$SECONDS; echo "== $$name: $$*"; "$$@"; \
		echo "== $$name passed in $$((SECONDS - t0)) s"; }; \
	stage fmt cargo fmt --all -- --check; \
	RUSTFLAGS='$(TEST_RUSTFLAGS)' stage clippy cargo clippy --workspace --all-targets -- -D warnings; \
	RUSTFLAGS='$(TEST_RUSTFLAGS)' stage test cargo test --workspace --exclude frontend; \
	stage bins env -u RUSTFLAGS cargo build --release -p server --bins; \
	stage end-to-end scripts/end-to-end.sh
