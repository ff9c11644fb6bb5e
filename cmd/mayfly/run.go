package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mayfly-ci/mayfly/fleet"
	"github.com/mayfly-ci/mayfly/manager"
	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/host"
	"github.com/mayfly-ci/mayfly/provisioner"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// The provisioner leaves each ready instance's verified connection open,
// warm for the job that takes it.
var _ fleet.Attacher = (*provisioner.Ready)(nil)

// stateLockWait is how long mayfly run waits for another one to leave the
// state directory (one that hands over exits within moments).
const stateLockWait = time.Minute

// runFlags are the flags of mayfly run.
type runFlags struct {
	config, pluginDir, stateDir, managerID string
	// helperDir holds the mayfly-helper binaries (default: next to mayfly).
	helperDir string
	view      time.Duration
	// shutdownTimeout, when set, receives shutdown_timeout of the config
	// in force (nanoseconds), for the signal handler.
	shutdownTimeout *atomic.Int64
	// handover, when closed, hands the running jobs over (SIGUSR2).
	handover <-chan struct{}
}

// handleSignals turns signals into the manager's shutdown, as gitlab-runner
// does: SIGQUIT drains (no new jobs; running jobs finish, however long they
// take); SIGTERM or SIGINT stops forcefully (running jobs are aborted and
// reported), also during a drain, and if the manager has not exited
// shutdown_timeout later, the process exits anyway; a second SIGTERM or
// SIGINT exits at once. SIGUSR2, mayfly's own, hands over: the process
// exits at once, leaving its running jobs to the next one started with the
// same state directory. It returns when stop is closed.
func handleSignals(sigs <-chan os.Signal, stop <-chan struct{}, drain, handover chan<- struct{}, abort func(), timeout *atomic.Int64, stderr io.Writer, exit func(int)) {
	drained, forced, handed := false, false, false
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		var sig os.Signal
		select {
		case <-stop:
			return
		case sig = <-sigs:
		}
		switch {
		case sig == sigHandOver && !handed && !forced:
			handed = true
			fmt.Fprintln(stderr, "mayfly run: SIGUSR2: handing over, exiting now; running jobs go on for the next mayfly run with this state directory")
			close(handover)
		case sig == sigHandOver:
		case sig == syscall.SIGQUIT && !drained && !forced:
			drained = true
			fmt.Fprintln(stderr, "mayfly run: SIGQUIT: graceful shutdown, running jobs finish (SIGTERM to abort them)")
			close(drain)
		case sig == syscall.SIGQUIT:
		case !forced:
			forced = true
			d := time.Duration(timeout.Load())
			fmt.Fprintf(stderr, "mayfly run: %v: forceful shutdown, aborting running jobs; exiting within shutdown_timeout (%v)\n", sig, d)
			abort()
			timer = time.AfterFunc(d, func() {
				fmt.Fprintf(stderr, "mayfly run: shutdown did not finish within shutdown_timeout (%v); exiting\n", d)
				exit(1)
			})
		default:
			fmt.Fprintf(stderr, "mayfly run: %v again: exiting now\n", sig)
			exit(1)
			return
		}
	}
}

func runRun(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f runFlags
	fs.StringVar(&f.config, "config", "config.toml", "config file (gitlab-runner config.toml format)")
	fs.StringVar(&f.helperDir, "helper-dir", "", "directory of the mayfly-helper-<os>-<arch> binaries jobs use for cache and artifacts (default: next to the mayfly binary)")
	fs.StringVar(&f.pluginDir, "plugin-dir", "", "directory of provider plugins (default: next to the mayfly binary, then PATH)")
	fs.StringVar(&f.stateDir, "state-dir", ".cache/mayfly/state", "where the journals of acquired instances and running jobs are kept (mode 0700; they hold job tokens): a manager started with the same directory resumes the jobs of one that died or handed over")
	fs.StringVar(&f.managerID, "manager-id", "", "identity carried by every instance this manager creates (default: host name and config path)")
	fs.DurationVar(&f.view, "view", 0, "print the fleet and jobs every interval (0 = off)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: mayfly run --config FILE [flags]\n\nRuns the runner manager: asks GitLab for jobs for every [[runners]] entry and\nruns each in a fresh VM of that runner's fleet.\n\nSignals: SIGQUIT drains (no new jobs; running ones finish, however long they\ntake). SIGTERM or SIGINT abort, also during a drain: running jobs are\nstopped and reported as runner_system_failure, and the process exits at\nthe latest shutdown_timeout seconds later. A second SIGTERM or SIGINT exits\nat once. SIGUSR2 hands over: the process exits at once and its running jobs\ngo on in their VMs; the next mayfly run with the same --state-dir resumes\nthem (the upgrade procedure). A manager killed outright is resumed the same\nway.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	// SIGQUIT drains; SIGTERM and SIGINT abort, also during a drain, and
	// bound what follows by shutdown_timeout; a second one exits at once.
	ctx, abort := context.WithCancel(context.Background())
	defer abort()
	drain, handover := make(chan struct{}), make(chan struct{})
	f.handover = handover
	f.shutdownTimeout = new(atomic.Int64)
	f.shutdownTimeout.Store(int64(config.DefaultShutdownTimeout))
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGQUIT, sigHandOver)
	defer signal.Stop(sigs)
	stopSignals := make(chan struct{})
	defer close(stopSignals)
	go handleSignals(sigs, stopSignals, drain, handover, abort, f.shutdownTimeout, stderr, os.Exit)
	if err := runManager(ctx, drain, f, stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "mayfly run: %v\n", err)
		return 1
	}
	return 0
}

func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	level := slog.LevelInfo
	switch cfg.LogLevel {
	case "debug":
		level = slog.LevelDebug
	case "warn", "warning":
		level = slog.LevelWarn
	case "error", "fatal", "panic":
		level = slog.LevelError
	}
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: providers.RedactAttr}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// defaultManagerID names this manager by host and config file, so a
// restarted manager recognises (and cleans up) its own instances.
func defaultManagerID(configPath string) string {
	host, _ := os.Hostname()
	abs, err := filepath.Abs(configPath)
	if err != nil {
		abs = configPath
	}
	sum := sha256.Sum256([]byte(abs))
	return fmt.Sprintf("%s-%x", strings.ToLower(host), sum[:4])
}

// fleetRun is one runner's plugin and fleet.
type fleetRun struct {
	name   string
	plugin *host.Plugin
	fleet  *fleet.Fleet
}

// runManager runs the manager until ctx ends (running jobs are aborted) or
// drain is closed (running jobs finish), then stops the fleets.
func runManager(ctx context.Context, drain <-chan struct{}, f runFlags, stdout, stderr io.Writer) error {
	store, err := config.NewStore(f.config, nil)
	if err != nil {
		return err
	}
	cfg := store.Current()
	log := newLogger(cfg, stderr)
	store.SetLogger(log)
	if f.shutdownTimeout != nil {
		f.shutdownTimeout.Store(int64(cfg.ShutdownTimeout))
	}
	for _, w := range cfg.Warnings {
		log.Warn("config", "warning", w.String())
	}
	if f.managerID == "" {
		f.managerID = defaultManagerID(f.config)
	}
	if err := os.MkdirAll(f.stateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	unlock, err := lockStateDir(f.stateDir, stateLockWait)
	if err != nil {
		return err
	}
	defer unlock()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// Provider plugins and fleets, one per runner.
	pluginDirs := []string{}
	if f.pluginDir != "" {
		pluginDirs = append(pluginDirs, f.pluginDir)
	}
	if exe, err := os.Executable(); err == nil {
		pluginDirs = append(pluginDirs, filepath.Dir(exe))
	}
	var fleets []*fleetRun
	defer func() {
		for _, fr := range fleets {
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_ = fr.plugin.Shutdown(sctx)
			cancel()
			fr.plugin.Close()
		}
	}()
	managerFleets := map[string]manager.Fleet{}
	for _, r := range cfg.Runners {
		fr, err := startFleet(ctx, r, f, pluginDirs, reg, log)
		if err != nil {
			return fmt.Errorf("runner %q: %w", r.Name, err)
		}
		fleets = append(fleets, fr)
		timeout := r.Fleet.Connector.Timeout
		managerFleets[r.Name] = manager.FromFleet(fr.fleet, func(ctx context.Context, ci providers.ConnectInfo) (vmexec.Executor, error) {
			return provisioner.Connect(ctx, ci, timeout, log)
		})
	}
	cacheCtx, stopCaches := context.WithCancel(context.Background())
	caches, err := startCaches(cacheCtx, cfg, log)
	if err != nil {
		stopCaches()
		return err
	}
	defer func() { stopCaches(); caches.wg.Wait() }()
	helpers := &manager.Helpers{Dir: f.helperDir}
	if helpers.Dir == "" {
		if exe, err := os.Executable(); err == nil {
			helpers.Dir = filepath.Dir(exe)
		}
	}
	b := buildInfo()
	m, err := manager.New(manager.Options{Config: cfg, Fleets: managerFleets, Version: b.Version, Revision: b.Revision, Branch: b.Branch, Registerer: reg, Logger: log,
		Helpers: helpers, Caches: caches.signers, StateDir: f.stateDir})
	if err != nil {
		return err
	}
	// Jobs a previous manager left running come first: their instances
	// are claimed before the fleets' start-up clean-up runs.
	if err := m.LoadJournals(); err != nil {
		return err
	}

	// Fleets run until the manager is done with their instances.
	fleetCtx, stopFleets := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, fr := range fleets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fr.fleet.Run(fleetCtx); err != nil {
				log.Error("fleet stopped", "runner", fr.name, "err", err)
				m.Abort()
			}
		}()
	}
	defer func() { stopFleets(); wg.Wait() }()

	statusSrv := serveStatus(cfg.ListenAddress, reg, fleets, log)
	defer func() {
		if statusSrv != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = statusSrv.Shutdown(sctx)
			cancel()
		}
	}()

	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	go func() {
		select {
		case <-drain:
			m.Drain()
		case <-watchCtx.Done():
		}
	}()
	go func() {
		select {
		case <-f.handover:
			m.HandOver()
		case <-watchCtx.Done():
		}
	}()
	go store.Watch(watchCtx, 3*time.Second, func(next *config.Config) {
		if f.shutdownTimeout != nil {
			f.shutdownTimeout.Store(int64(next.ShutdownTimeout))
		}
		applyReload(next, fleets, log)
	})
	if f.view > 0 {
		go printView(watchCtx, stdout, f.view, fleets)
	}

	log.Info("runner manager started", "manager_id", f.managerID, "runners", len(cfg.Runners), "concurrent", cfg.Concurrent)
	return m.Run(ctx)
}

func startFleet(ctx context.Context, r config.Runner, f runFlags, dirs []string, reg prometheus.Registerer, log *slog.Logger) (*fleetRun, error) {
	plugin, err := host.Start(ctx, host.Config{Name: r.Fleet.Provider, Dirs: dirs, Logger: log})
	if err != nil {
		return nil, err
	}
	settings := any(r.Fleet.ProviderConfig)
	if r.Fleet.Block == "runners.machine" {
		settings = r.Fleet.ProviderOptions
	}
	raw, err := json.Marshal(settings)
	if err != nil {
		plugin.Close()
		return nil, fmt.Errorf("provider settings: %w", err)
	}
	ictx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	info, err := plugin.Init(ictx, raw)
	cancel()
	if err != nil {
		plugin.Close()
		return nil, fmt.Errorf("init provider %s: %w", r.Fleet.Provider, err)
	}
	fl, err := fleet.New(fleet.Config{
		Name:             r.Name,
		ManagerID:        f.managerID,
		Provider:         plugin,
		ProviderMaxSize:  info.MaxSize,
		Schedule:         r.Fleet.Schedule,
		Limits:           r.Fleet.Limits,
		DeleteOnShutdown: r.Fleet.DeleteOnShutdown,
		Provisioner:      &provisioner.Ready{Timeout: r.Fleet.Connector.Timeout, Command: r.Fleet.InstanceReadyCommand, Shell: r.Shell, Logger: log},
		JournalPath:      filepath.Join(f.stateDir, sanitize(r.Name)+".journal"),
		Logger:           log.With("runner", r.Name),
		Registerer:       reg,
	})
	if err != nil {
		plugin.Close()
		return nil, err
	}
	log.Info("provider ready", "runner", r.Name, "provider", r.Fleet.Provider, "id", info.ID, "version", info.Version)
	return &fleetRun{name: r.Name, plugin: plugin, fleet: fl}, nil
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '/' || r == os.PathSeparator || r < ' ' {
			return '_'
		}
		return r
	}, s)
}

// serveStatus serves /metrics and /fleet/status on addr, when set.
func serveStatus(addr string, reg *prometheus.Registry, fleets []*fleetRun, log *slog.Logger) *http.Server {
	if addr == "" {
		return nil
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/fleet/status", func(w http.ResponseWriter, r *http.Request) {
		var out []fleet.Status
		for _, fr := range fleets {
			out = append(out, fr.fleet.Status())
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Error("metrics listener", "addr", addr, "err", err)
		return nil
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	log.Info("serving metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	return srv
}

// printView prints one line per fleet every interval until ctx ends.
func printView(ctx context.Context, w io.Writer, every time.Duration, fleets []*fleetRun) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, fr := range fleets {
			fmt.Fprintln(w, statusLine(fr.fleet.Status()))
		}
	}
}

// statusLine summarises a fleet's status in one line.
func statusLine(st fleet.Status) string {
	var parts []string
	for state, n := range st.Counts {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, state))
		}
	}
	sort.Strings(parts)
	if len(parts) == 0 {
		parts = []string{"no instances"}
	}
	line := fmt.Sprintf("%s fleet %s: %s; idle target %d", st.Time.Format("15:04:05"), st.Runner, strings.Join(parts, ", "), st.IdleTarget)
	if st.Reserved > 0 {
		line += fmt.Sprintf(", %d reserved", st.Reserved)
	}
	if st.Held != "" {
		line += ", held: " + st.Held
	}
	if st.DeletedUnusedWhileWaiting > 0 {
		line += fmt.Sprintf(", %d deleted unused while jobs waited (a bug)", st.DeletedUnusedWhileWaiting)
	}
	if st.JobsDone > 0 {
		calls := make([]string, 0, len(st.APICalls))
		for call, n := range st.APICalls {
			calls = append(calls, fmt.Sprintf("%s %.2f", call, float64(n)/float64(st.JobsDone)))
		}
		sort.Strings(calls)
		line += fmt.Sprintf("; %d jobs, %.2f provider calls/job (%s)", st.JobsDone, st.CallsPerJob(), strings.Join(calls, ", "))
	}
	return line
}

// applyReload gives each running fleet the idle policy of its runner in the
// reloaded config. Other changes take effect at the next start.
func applyReload(next *config.Config, fleets []*fleetRun, log *slog.Logger) {
	for _, fr := range fleets {
		found := false
		for _, r := range next.Runners {
			if r.Name == fr.name {
				fr.fleet.SetSchedule(r.Fleet.Schedule)
				found = true
			}
		}
		if !found {
			log.Warn("config reloaded without this runner; it keeps running until the next start", "runner", fr.name)
		}
	}
	log.Info("config reloaded: idle policies applied to the running fleets; other changes take effect at the next start")
}
