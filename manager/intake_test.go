package manager_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/localfleet"
)

// countingFleet counts what the manager takes from a local fleet.
type countingFleet struct {
	local     *localfleet.Fleet
	acquired  atomic.Int64
	cancelled atomic.Int64
}

func (f *countingFleet) Reserve() (manager.Reservation, time.Duration, bool) {
	r, wait, ok := f.local.Reserve()
	if !ok {
		return nil, 0, false
	}
	return &countingReservation{f: f, r: r}, wait, true
}

type countingReservation struct {
	f *countingFleet
	r manager.Reservation
}

func (r *countingReservation) Cancel() { r.f.cancelled.Add(1); r.r.Cancel() }

func (r *countingReservation) Acquire(ctx context.Context) (manager.Lease, error) {
	r.f.acquired.Add(1)
	return r.r.Acquire(ctx)
}

// A payload that cannot be run is failed before a VM is taken (issue 20:
// each bad payload used to burn a VM).
func TestBadPayloadTakesNoInstance(t *testing.T) {
	var (
		mu      sync.Mutex
		served  bool
		updates []map[string]any
	)
	gl := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case r.URL.Path == "/api/v4/jobs/request" && !served:
			served = true
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			// Decodes, but has nothing to run.
			_, _ = io.WriteString(w, `{"id": 7, "token": "job-token-7", "allow_git_fetch": false,
				"job_info": {"name": "bad", "stage": "test", "project_id": 1, "project_name": "p"},
				"git_info": {"repo_url": "http://127.0.0.1/p.git", "ref": "main", "sha": "0123456789abcdef0123456789abcdef01234567", "ref_type": "branch"},
				"runner_info": {"timeout": 3600}, "variables": [], "steps": []}`)
		case r.URL.Path == "/api/v4/jobs/request":
			w.WriteHeader(http.StatusNoContent)
		case r.Method == http.MethodPatch:
			w.Header().Set("Range", "0-0")
			w.WriteHeader(http.StatusAccepted)
		case r.Method == http.MethodPut:
			var u map[string]any
			_ = json.Unmarshal(body, &u)
			updates = append(updates, u)
			w.WriteHeader(http.StatusOK)
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	defer gl.Close()

	dir := t.TempDir()
	local := localfleet.New(filepath.Join(dir, "vms"), 1)
	defer local.Close()
	fl := &countingFleet{local: local}
	rc := config.Runner{
		Name: "local", URL: gl.URL, Token: runnerToken, RequestConcurrency: 1, OutputLimitKB: 4096,
		Executor: "instance", Shell: "bash", BuildsDir: filepath.Join(dir, "builds"), MaxJobTimeout: time.Hour,
		Fleet: config.Fleet{Connector: config.Connector{OS: "linux", Arch: "amd64"}},
	}
	m, err := manager.New(manager.Options{
		Config:     &config.Config{Concurrent: 1, CheckInterval: 20 * time.Millisecond, Runners: []config.Runner{rc}},
		Fleets:     map[string]manager.Fleet{"local": fl},
		Registerer: prometheus.NewRegistry(),
		Logger:     slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	defer func() { cancel(); <-done }()

	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		n := len(updates)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the bad job was never reported")
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	u := updates[0]
	mu.Unlock()
	if u["state"] != "failed" || u["failure_reason"] != "runner_system_failure" {
		t.Errorf("bad job reported %v %v, want failed runner_system_failure", u["state"], u["failure_reason"])
	}
	if n := fl.acquired.Load(); n != 0 {
		t.Errorf("%d instances taken for a payload that cannot run, want 0", n)
	}
	if n := fl.cancelled.Load(); n < 1 {
		t.Errorf("the bad job's reservation was not given back")
	}
}

// A drain while a job request is in flight does not drop the answer: GitLab
// may have handed the job out already, and a dropped job would stay running
// in GitLab until its timeout.
func TestDrainKeepsJobRequestInFlight(t *testing.T) {
	var (
		mu      sync.Mutex
		served  bool
		updates []map[string]any
	)
	handedOut := make(chan struct{})
	gl := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		switch {
		case r.URL.Path == "/api/v4/jobs/request":
			mu.Lock()
			first := !served
			served = true
			mu.Unlock()
			if !first {
				w.WriteHeader(http.StatusNoContent)
				return
			}
			close(handedOut)
			time.Sleep(300 * time.Millisecond) // the drain comes meanwhile
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, `{"id": 8, "token": "job-token-8",
				"job_info": {"name": "late", "stage": "test", "project_id": 1, "project_name": "p"},
				"git_info": {"repo_url": "http://127.0.0.1/p.git", "ref": "main", "sha": "0123456789abcdef0123456789abcdef01234567", "ref_type": "branch"},
				"runner_info": {"timeout": 3600}, "variables": [{"key": "GIT_STRATEGY", "value": "none"}],
				"steps": [{"name": "script", "script": ["echo late"], "timeout": 3600, "when": "on_success"}]}`)
		case r.Method == http.MethodPatch:
			w.Header().Set("Range", "0-"+strconv.Itoa(int(max(r.ContentLength-1, 0))))
			w.WriteHeader(http.StatusAccepted)
		case r.Method == http.MethodPut:
			var u map[string]any
			_ = json.Unmarshal(body, &u)
			mu.Lock()
			updates = append(updates, u)
			mu.Unlock()
			w.WriteHeader(http.StatusOK)
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	defer gl.Close()

	dir := t.TempDir()
	local := localfleet.New(filepath.Join(dir, "vms"), 1)
	defer local.Close()
	rc := config.Runner{
		Name: "local", URL: gl.URL, Token: runnerToken, RequestConcurrency: 1, OutputLimitKB: 4096,
		Executor: "instance", Shell: "bash", BuildsDir: filepath.Join(dir, "builds"), MaxJobTimeout: time.Hour,
		Fleet: config.Fleet{Connector: config.Connector{OS: "linux", Arch: "amd64"}},
	}
	m, err := manager.New(manager.Options{
		Config:     &config.Config{Concurrent: 1, CheckInterval: 20 * time.Millisecond, Runners: []config.Runner{rc}},
		Fleets:     map[string]manager.Fleet{"local": local},
		Registerer: prometheus.NewRegistry(),
		Logger:     slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(context.Background()) }()
	<-handedOut
	m.Drain()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("manager did not finish draining")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(updates) != 1 || updates[0]["state"] != "success" {
		t.Errorf("updates %v, want the job handed out during the drain run and reported success", updates)
	}
}

// A job whose token holds CR/LF is refused before anything runs and
// reported failed through the final update, whose JSON body can carry it
// (issue 19: it used to run, and its trace was retried for 5 minutes).
func TestTokenWithLineBreakRefusedAtIntake(t *testing.T) {
	var (
		mu      sync.Mutex
		served  bool
		patches int
		updates []map[string]any
	)
	gl := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case r.URL.Path == "/api/v4/jobs/request" && !served:
			served = true
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, `{"id": 9, "token": "job-token\r\nX-Injected: 1",
				"job_info": {"name": "evil", "stage": "test", "project_id": 1, "project_name": "p"},
				"git_info": {"repo_url": "http://127.0.0.1/p.git", "ref": "main", "sha": "0123456789abcdef0123456789abcdef01234567", "ref_type": "branch"},
				"runner_info": {"timeout": 3600}, "variables": [],
				"steps": [{"name": "script", "script": ["echo should not run"], "timeout": 3600, "when": "on_success"}]}`)
		case r.URL.Path == "/api/v4/jobs/request":
			w.WriteHeader(http.StatusNoContent)
		case r.Method == http.MethodPatch:
			patches++
			w.WriteHeader(http.StatusAccepted)
		case r.Method == http.MethodPut:
			var u map[string]any
			_ = json.Unmarshal(body, &u)
			updates = append(updates, u)
			w.WriteHeader(http.StatusOK)
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	defer gl.Close()

	dir := t.TempDir()
	local := localfleet.New(filepath.Join(dir, "vms"), 1)
	defer local.Close()
	fl := &countingFleet{local: local}
	rc := config.Runner{
		Name: "local", URL: gl.URL, Token: runnerToken, RequestConcurrency: 1, OutputLimitKB: 4096,
		Executor: "instance", Shell: "bash", BuildsDir: filepath.Join(dir, "builds"), MaxJobTimeout: time.Hour,
		Fleet: config.Fleet{Connector: config.Connector{OS: "linux", Arch: "amd64"}},
	}
	m, err := manager.New(manager.Options{
		Config:     &config.Config{Concurrent: 1, CheckInterval: 20 * time.Millisecond, Runners: []config.Runner{rc}},
		Fleets:     map[string]manager.Fleet{"local": fl},
		Registerer: prometheus.NewRegistry(),
		Logger:     slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	defer func() { cancel(); <-done }()

	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		n := len(updates)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the refused job was never reported")
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if u := updates[0]; u["state"] != "failed" || u["failure_reason"] != "runner_system_failure" || u["token"] != "job-token\r\nX-Injected: 1" {
		t.Errorf("update %v, want failed runner_system_failure with the job's token in the body", u)
	}
	if patches != 0 {
		t.Errorf("%d trace patches sent with a token that cannot be a header", patches)
	}
	if n := fl.acquired.Load(); n != 0 {
		t.Errorf("%d instances taken for a refused payload", n)
	}
}
