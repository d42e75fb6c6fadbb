# The two commands of the README: `make dev` runs the whole stack, `make test` runs every check.
# Both create .venv on first use (Python 3.11 or newer) and reinstall when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: dev test lint go-test format bench fuzz soak clean

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

dev: $(INSTALLED)
	$(BIN)/driftlock-gateway dev $(ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint go-test
	$(BIN)/pytest $(PYTEST_ARGS)

# The Go middleware's own tests (go/). Skipped, saying so, where no `go` is installed (Debian: golang-go);
# DRIFTLOCK_REQUIRE_GO=1 makes that an error instead (CI), DRIFTLOCK_SKIP_GO_TESTS=1 skips them (CI's second
# database run: they do not depend on the database).
go-test:
	@if [ -n "$$DRIFTLOCK_SKIP_GO_TESTS" ]; then \
		echo "go-test: skipped (DRIFTLOCK_SKIP_GO_TESTS is set)"; \
	elif command -v go >/dev/null 2>&1; then \
		echo "cd go && go vet ./... && go test ./..."; \
		cd go && GOFLAGS=-mod=mod GOPROXY=off go vet ./... && GOFLAGS=-mod=mod GOPROXY=off go test ./...; \
	elif [ -n "$$DRIFTLOCK_REQUIRE_GO" ]; then \
		echo "go-test: no 'go' on PATH, and DRIFTLOCK_REQUIRE_GO is set" >&2; exit 1; \
	else \
		echo "go-test: SKIPPED: no 'go' on PATH (install Debian's golang-go to run the Go middleware's tests)"; \
	fi

# Bounded fuzzing of the Stripe payload reader and the credential reader (FUZZ_EXAMPLES inputs per target).
fuzz: $(INSTALLED)
	$(BIN)/pytest -q tests/fuzz $(PYTEST_ARGS)

# A steady run through Envoy with faults along the way (SOAK_SECONDS, default 180); see tests/soak/.
soak: $(INSTALLED)
	$(BIN)/pytest -q -s tests/soak $(PYTEST_ARGS)

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(INSTALLED)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
