# attune — the two commands a new user needs:
#   make run    set up (build, fetch the default model) and start the server on it
#   make test   set up and run the whole test suite
# Everything is idempotent; the model lands in $(ATTUNE_CACHE_DIR) (default ~/.cache/attune).

CARGO ?= cargo
PROMPT ?= What is the capital of France?

.PHONY: run generate test test-deps build model bench bench-feedback bench-metrics side-by-side fmt lint

build:
	$(CARGO) build --release

model:
	./scripts/fetch-model.sh

run: build model
	./target/release/attune serve

generate: build model
	./target/release/attune generate --prompt "$(PROMPT)"

test: model test-deps
	$(CARGO) test --workspace --all-targets

# Python packages the tests drive attune with (the official OpenAI client).
test-deps:
	python3 -m pip install --disable-pip-version-check -q openai

bench: build model
	./target/release/attune bench

bench-feedback:
	$(CARGO) run --release -p attune-server --example feedback_bench -- 5 8

# decode tok/s with server.metrics on and off, alternately
bench-metrics:
	./scripts/metrics-overhead.sh

# attune next to llama.cpp's llama-server (builds llama-server once)
side-by-side:
	./scripts/side-by-side.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
