# mayfly — see README.md. `make test` and `make run` do all set-up themselves.
GO      ?= go
BIN     := bin

.PHONY: all setup build test run bench lint fuzz generate clean

all: build

setup:
	@scripts/setup.sh

build:
	$(GO) build -o $(BIN)/ ./cmd/... 

test: setup
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

bench: setup
	$(GO) test -run '^$$' -bench . -benchmem ./...

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

clean:
	rm -rf $(BIN)
