# mayfly. `make test` and `make run` do all set-up themselves on Debian.
export PATH := /usr/local/go/bin:$(PATH)
GO       ?= go
BIN      := bin
FUZZTIME ?= 30s

# What mayfly tells GitLab about itself (info.version, info.revision, the
# User-Agent), set as gitlab-runner's build sets them.
VERSION  ?= $(or $(shell git describe --tags --match 'v[0-9]*' 2>/dev/null | sed 's/^v//'),dev)
REVISION ?= $(or $(shell git rev-parse --short=8 HEAD 2>/dev/null),HEAD)
BRANCH   ?= $(or $(shell git rev-parse --abbrev-ref HEAD 2>/dev/null),HEAD)
LDFLAGS  := -X main.version=$(VERSION) -X main.revision=$(REVISION) -X main.branch=$(BRANCH)

.PHONY: all setup build helpers test run run-busybox bench chaos fuzz lint generate clean

all: build

## setup: install the Debian packages and VM image inputs the tests and demo use
setup:
	@scripts/setup.sh

## build: build mayfly, the job helpers and every provider plugin into bin/
build: helpers
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/mayfly $(wildcard ./plugins/*/cmd/mayfly-plugin-*)

## helpers: the static mayfly-helper a job's VM runs, for each OS/arch mayfly serves
HELPER_TARGETS := linux/amd64 linux/arm64 windows/amd64
helpers:
	@for t in $(HELPER_TARGETS); do os=$${t%/*}; arch=$${t#*/}; ext=; [ $$os = windows ] && ext=.exe; \
		CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -ldflags="-s -w -X github.com/mayfly-ci/mayfly/manager/helper.Version=$(VERSION)-$(REVISION)" \
			-o $(BIN)/mayfly-helper-$$os-$$arch$$ext ./cmd/mayfly-helper || exit 1; done

## test: set up, vet, and run every test with the race detector
test: setup
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 25m ./...

## run: set up, build, and run the sample project testdata/projects/demo on real microVMs
## with Docker Engine (scripts/demo.sh)
run: setup helpers
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/mayfly ./plugins/qemu/cmd/mayfly-plugin-qemu
	scripts/demo.sh

## run-busybox: the faster demo of testdata/pipelines/demo.yaml on busybox microVMs
run-busybox: setup helpers
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/mayfly ./plugins/qemu/cmd/mayfly-plugin-qemu
	scripts/demo.sh busybox

## bench: the hosted configs through the simulator; the policy comparison of issue 15 (every
## trace shape, 3 seeds, baselines tuned over their knobs; about an hour on 2 cores); then the
## other Go benchmarks
bench: setup build
	@for t in weekly nightly monorepo; do \
		$(BIN)/mayfly simulate --config testdata/hosted-gcp-linux.toml --trace testdata/traces/$$t.csv 2>/dev/null | sed -n '1,6p'; echo; done
	@$(BIN)/mayfly simulate --config testdata/gce-windows.toml --trace testdata/traces/weekly-windows.csv 2>/dev/null | sed -n '1,6p'; echo
	$(GO) test -run '^$$' -bench '^BenchmarkCompare$$' -benchtime 1x -timeout 4h ./fleet/sim/ -args -compare.shapes=all -compare.seeds=3
	$(GO) test -run '^$$' -bench . -skip '^BenchmarkCompare$$' -benchmem -benchtime 1x -timeout 1h ./cmd/... ./fleet/... ./schedule/... ./manager/... ./providers/... ./vmexec/... ./plugins/...

## chaos: the long chaos suite (issue 16): `mayfly run` killed with SIGKILL in every phase of its
## jobs' life and started again on the same state dir, with plugin kills, provider faults, dropped
## SSH connections or a CHAOS_OUTAGE of GitLab besides, CHAOS_FAKE trials on the fake provider and
## CHAOS_QEMU on qemu microVMs; prints one table (about 18 min on 2 cores shared with others). `make test` runs 5 + 1.
CHAOS_FAKE ?= 100
CHAOS_QEMU ?= 10
CHAOS_SEED ?= 16
CHAOS_OUTAGE ?= 1m
chaos: setup
	$(GO) test -run '^TestChaos$$' -v -count=1 -timeout 120m ./cmd/mayfly/ -args \
		-chaos.fake=$(CHAOS_FAKE) -chaos.qemu=$(CHAOS_QEMU) -chaos.seed=$(CHAOS_SEED) -chaos.outage=$(CHAOS_OUTAGE) -chaos.parallel=4 -chaos.qemu-parallel=1

## fuzz: run every fuzz target for FUZZTIME each
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParsePeriod$$' -fuzztime $(FUZZTIME) ./schedule/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) -parallel 1 ./manager/config/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 3s -parallel 1 ./manager/coordinator/gitlabci/
	$(GO) test -run '^$$' -fuzz '^FuzzGitArgv$$' -fuzztime $(FUZZTIME) ./manager/buildscript/
	$(GO) test -run '^$$' -fuzz '^FuzzExtractZip$$' -fuzztime $(FUZZTIME) ./manager/helper/archive/
	$(GO) test -run '^$$' -fuzz '^FuzzArchive$$' -fuzztime $(FUZZTIME) ./manager/helper/archive/
	$(GO) test -run '^$$' -fuzz '^FuzzJobPayload$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 3s ./manager/gitlab/

## lint: gofmt and go vet
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); test -z "$$out" || { echo "gofmt would change:"; echo "$$out"; exit 1; }
	$(GO) vet ./...

## generate: regenerate the provider protocol's protobuf code (needs Debian's protobuf-compiler)
generate:
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
	providers/proto/generate.sh

clean:
	rm -rf $(BIN)
