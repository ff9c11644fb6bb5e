// Package host runs a provider plugin binary as a child process with
// hashicorp/go-plugin over gRPC and presents it as a providers.Provider.
//
// The host restarts the plugin with exponential backoff when its process
// dies: calls in flight fail with a transient error, calls made while it is
// down wait (bounded by their context and the call timeout) for the
// restarted process, which the host initialises again with the last
// settings. The plugin's logs reach the host's *slog.Logger.
package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/internal/wire"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// Config configures a plugin host.
type Config struct {
	// Name is the plugin's name, used to find its binary (see Find) and to
	// tag its logs.
	Name string
	// Path, if set, is the plugin binary; Name and Dirs are not searched.
	Path string
	// Dirs are plugin directories searched before $PATH.
	Dirs []string
	// Args and Env are passed to the plugin process (Env is added to the
	// host's environment).
	Args []string
	Env  []string
	// Logger receives the host's and the plugin's logs (default
	// slog.Default()), with attribute plugin=<Name>.
	Logger *slog.Logger
	// CallTimeout bounds every call, including the wait for a restarting
	// plugin (default 1m).
	CallTimeout time.Duration
	// StartTimeout bounds the start and handshake of the process (default 30s).
	StartTimeout time.Duration
	// MinBackoff and MaxBackoff bound the wait before a restart (defaults
	// 250ms and 30s); the wait doubles with each failed start or short-lived
	// process.
	MinBackoff time.Duration
	MaxBackoff time.Duration
	// StableAfter is the uptime after which a crash no longer counts
	// towards the backoff (default 1m).
	StableAfter time.Duration
	// PollInterval is how often the host checks that the process lives
	// (default 100ms).
	PollInterval time.Duration
}

func (c *Config) defaults() {
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	setDefault(&c.CallTimeout, time.Minute)
	setDefault(&c.StartTimeout, 30*time.Second)
	setDefault(&c.MinBackoff, 250*time.Millisecond)
	setDefault(&c.MaxBackoff, 30*time.Second)
	setDefault(&c.StableAfter, time.Minute)
	setDefault(&c.PollInterval, 100*time.Millisecond)
}

func setDefault(d *time.Duration, v time.Duration) {
	if *d <= 0 {
		*d = v
	}
}

// Plugin is a running provider plugin. It implements providers.Provider
// and is safe for concurrent use.
type Plugin struct {
	cfg     Config
	name    string
	path    string
	sockDir string
	log     *slog.Logger

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the supervisor has stopped

	mu       sync.Mutex
	cur      *proc         // the live process; nil while restarting
	ready    chan struct{} // closed while cur != nil
	settings json.RawMessage
	inited   bool
	gen      uint64 // bumped by every successful Init
	restarts int
	closed   bool
}

var (
	_ providers.Provider = (*Plugin)(nil)
	_ providers.Launcher = (*Plugin)(nil)
)

// proc is one plugin process.
type proc struct {
	client  *plugin.Client
	prov    providers.Provider
	pid     int
	started time.Time
}

// Start finds and starts the plugin described by cfg and waits for its
// handshake. ctx bounds the start only; Close or Shutdown ends the plugin.
func Start(ctx context.Context, cfg Config) (*Plugin, error) {
	cfg.defaults()
	path := cfg.Path
	if path == "" {
		var err error
		if path, err = Find(cfg.Name, cfg.Dirs); err != nil {
			return nil, err
		}
	}
	name := cfg.Name
	if name == "" {
		name = filepath.Base(path)
	}
	p := &Plugin{
		cfg:   cfg,
		name:  name,
		path:  path,
		log:   cfg.Logger.With("plugin", name),
		done:  make(chan struct{}),
		ready: make(chan struct{}),
	}
	// The plugin's gRPC socket lives in a directory of our own, removed on
	// Close, so a killed plugin leaves no socket file behind.
	sockDir, err := os.MkdirTemp("", "mayfly-plugin-")
	if err != nil {
		return nil, fmt.Errorf("start plugin %s: %w", name, err)
	}
	p.sockDir = sockDir
	p.ctx, p.cancel = context.WithCancel(context.Background())
	stop := context.AfterFunc(ctx, p.cancel) // an abandoned start is undone
	pr, err := p.launch(p.ctx)
	// A process that died before its handshake (killed, or crashed on a
	// bad moment) is started again a few times: one killed plugin must not
	// stop the manager. One that hangs has had its StartTimeout already.
	for attempt := 1; err != nil && errors.Is(err, errExitedEarly) && attempt < startAttempts && p.ctx.Err() == nil; attempt++ {
		p.log.Warn("plugin exited during its start; starting it again", "attempt", attempt+1, "of", startAttempts, "err", err)
		select {
		case <-time.After(startRetryDelay << (attempt - 1)):
		case <-p.ctx.Done():
		}
		if p.ctx.Err() == nil {
			pr, err = p.launch(p.ctx)
		}
	}
	stop()
	if err != nil {
		p.cancel()
		_ = os.RemoveAll(sockDir)
		return nil, fmt.Errorf("start plugin %s (%s): %w", name, path, err)
	}
	go p.supervise(pr)
	return p, nil
}

// How often Start tries a plugin whose process exits before its
// handshake, and the wait before the second try (doubled each time: at
// most 3 s of waiting in all).
const (
	startAttempts   = 5
	startRetryDelay = 200 * time.Millisecond
)

// errExitedEarly marks a start whose process exited before its handshake.
var errExitedEarly = errors.New("plugin process exited before its handshake")

// exitedWithin reports whether the client's process has exited, waiting
// up to d (and while ctx allows) for go-plugin to notice an exit, which it
// sees a little after the process's output or connection closed.
func exitedWithin(ctx context.Context, c *plugin.Client, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !c.Exited() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// launch starts a process, initialises it again with the last settings,
// and publishes it.
func (p *Plugin) launch(ctx context.Context) (*proc, error) {
	cmd := exec.Command(p.path, p.cfg.Args...)
	cmd.Env = append(cmd.Env, p.cfg.Env...)
	cmd.Env = append(cmd.Env, "PLUGIN_UNIX_SOCKET_DIR="+p.sockDir, wire.ParentEnv+"="+strconv.Itoa(os.Getpid()))
	tieToParent(cmd)
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  wire.Handshake,
		Plugins:          plugin.PluginSet{wire.PluginName: &wire.Plugin{}},
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           newHCLogAdapter(p.log),
		StartTimeout:     p.cfg.StartTimeout,
		SyncStdout:       slog.NewLogLogger(p.log.With("stream", "stdout").Handler(), slog.LevelInfo).Writer(),
		SyncStderr:       slog.NewLogLogger(p.log.With("stream", "stderr").Handler(), slog.LevelWarn).Writer(),
		AutoMTLS:         true,
		GRPCDialOptions: []grpc.DialOption{
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
		},
	})
	rpc, err := client.Client()
	if err != nil {
		exited := exitedWithin(ctx, client, deathWait)
		client.Kill()
		if exited {
			return nil, fmt.Errorf("%w: %w", errExitedEarly, err)
		}
		return nil, err
	}
	raw, err := rpc.Dispense(wire.PluginName)
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("dispense: %w", err)
	}
	prov, ok := raw.(providers.Provider)
	if !ok {
		client.Kill()
		return nil, fmt.Errorf("dispense: got %T, not a provider", raw)
	}
	pid, _ := strconv.Atoi(client.ID())
	pr := &proc{client: client, prov: prov, pid: pid, started: time.Now()}

	for {
		p.mu.Lock()
		if !p.inited || p.closed {
			p.publishLocked(pr)
			p.mu.Unlock()
			break
		}
		settings, gen := p.settings, p.gen
		p.mu.Unlock()

		ictx, cancel := context.WithTimeout(ctx, p.cfg.CallTimeout)
		_, err := prov.Init(ictx, settings)
		cancel()
		if err != nil {
			client.Kill()
			return nil, fmt.Errorf("init after restart: %w", err)
		}
		p.mu.Lock()
		if p.gen == gen {
			p.publishLocked(pr)
			p.mu.Unlock()
			break
		}
		p.mu.Unlock() // settings changed meanwhile: initialise again
	}
	p.log.Info("plugin started", "path", p.path, "pid", pid)
	return pr, nil
}

func (p *Plugin) publishLocked(pr *proc) {
	p.cur = pr
	close(p.ready)
}

func (p *Plugin) unpublish(pr *proc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur == pr {
		p.cur = nil
		p.ready = make(chan struct{})
	}
}

// supervise watches the live process and restarts it when it dies, until
// Close.
func (p *Plugin) supervise(pr *proc) {
	defer close(p.done)
	tick := time.NewTicker(p.cfg.PollInterval)
	defer tick.Stop()
	failures := 0
	for {
		for !pr.client.Exited() {
			select {
			case <-p.ctx.Done():
				p.unpublish(pr)
				pr.client.Kill()
				return
			case <-tick.C:
			}
		}
		uptime := time.Since(pr.started)
		p.unpublish(pr)
		pr.client.Kill() // reap go-plugin's goroutines
		p.log.Error("plugin process exited unexpectedly", "pid", pr.pid, "uptime", uptime.Round(time.Millisecond))
		if uptime >= p.cfg.StableAfter {
			failures = 0
		}
		for {
			delay := p.backoff(failures)
			failures++
			p.log.Info("restarting plugin", "in", delay, "attempt", failures)
			if pluginkit.Sleep(p.ctx, delay) != nil {
				return
			}
			next, err := p.launch(p.ctx)
			if err == nil {
				pr = next
				p.mu.Lock()
				p.restarts++
				p.mu.Unlock()
				break
			}
			if p.ctx.Err() != nil {
				return
			}
			p.log.Error("plugin restart failed", "attempt", failures, "error", err)
		}
	}
}

func (p *Plugin) backoff(failures int) time.Duration {
	d := p.cfg.MinBackoff
	for range failures {
		d *= 2
		if d >= p.cfg.MaxBackoff {
			return p.cfg.MaxBackoff
		}
	}
	return d
}

// acquire returns the live process, waiting while the plugin restarts.
func (p *Plugin) acquire(ctx context.Context, op string) (*proc, error) {
	for {
		p.mu.Lock()
		closed, pr, ready := p.closed, p.cur, p.ready
		p.mu.Unlock()
		switch {
		case closed:
			return nil, providers.Permanent(fmt.Errorf("plugin %s %s: %w", p.name, op, providers.ErrClosed))
		case pr != nil:
			return pr, nil
		}
		select {
		case <-ready:
		case <-p.ctx.Done():
		case <-ctx.Done():
			return nil, &providers.Error{
				Kind: providers.KindTransient,
				Msg:  fmt.Sprintf("plugin %s %s: plugin process not running (restarting)", p.name, op),
				Err:  ctx.Err(),
			}
		}
	}
}

// do runs fn against the live process with the call timeout.
func (p *Plugin) do(ctx context.Context, op string, fn func(context.Context, providers.Provider) error) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.CallTimeout)
	defer cancel()
	pr, err := p.acquire(ctx, op)
	if err != nil {
		return err
	}
	if err := fn(ctx, pr.prov); err != nil {
		if errors.Is(err, wire.ErrConnection) {
			p.checkDeath(ctx, pr)
		}
		return fmt.Errorf("plugin %s %s: %w", p.name, op, err)
	}
	return nil
}

// checkDeath waits briefly for pr's process to be seen dead after its
// connection failed, and then takes it out of service at once, so that the
// calls that follow wait for the restart instead of meeting the dead
// connection.
func (p *Plugin) checkDeath(ctx context.Context, pr *proc) {
	if exitedWithin(ctx, pr.client, deathWait) {
		p.unpublish(pr)
	}
}

// deathWait bounds how long a call whose connection failed waits to see
// the plugin process exit.
const deathWait = time.Second

// initAttempts bounds the Init calls made when the plugin's connection
// fails during them.
const initAttempts = 3

// Init implements providers.Provider. The settings are kept and sent again
// to a restarted plugin process.
// A plugin that dies during Init (killed, or crashed on a bad moment) is
// initialised again once restarted, up to initAttempts calls in all: Init
// only hands over settings, and a manager must not stop for one dead child.
func (p *Plugin) Init(ctx context.Context, settings json.RawMessage) (providers.Info, error) {
	var info providers.Info
	call := func(ctx context.Context, prov providers.Provider) error {
		var err error
		info, err = prov.Init(ctx, settings)
		return err
	}
	err := p.do(ctx, "init", call)
	for attempt := 1; err != nil && errors.Is(err, wire.ErrConnection) && attempt < initAttempts && ctx.Err() == nil; attempt++ {
		p.log.Warn("plugin connection failed during init; initialising the restarted plugin", "attempt", attempt+1, "of", initAttempts, "err", err)
		err = p.do(ctx, "init", call)
	}
	if err != nil {
		return providers.Info{}, err
	}
	p.mu.Lock()
	p.settings = append(json.RawMessage(nil), settings...)
	p.inited = true
	p.gen++
	p.mu.Unlock()
	return info, nil
}

// Create implements providers.Provider: Launch, keeping the ids.
func (p *Plugin) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	made, err := p.Launch(ctx, n, labels)
	return providers.IDs(made), err
}

// Launch implements providers.Launcher: Create, with each instance's
// connect info when the plugin knows it at creation (ids only otherwise).
func (p *Plugin) Launch(ctx context.Context, n int, labels map[string]string) ([]providers.Instance, error) {
	var made []providers.Instance
	err := p.do(ctx, "create", func(ctx context.Context, prov providers.Provider) error {
		l, ok := prov.(providers.Launcher)
		if !ok {
			ids, err := prov.Create(ctx, n, labels)
			made = providers.InstancesOf(ids)
			return err
		}
		var err error
		made, err = l.Launch(ctx, n, labels)
		return err
	})
	return made, err
}

// Delete implements providers.Provider.
func (p *Plugin) Delete(ctx context.Context, ids []string) ([]string, error) {
	var deleted []string
	err := p.do(ctx, "delete", func(ctx context.Context, prov providers.Provider) error {
		var err error
		deleted, err = prov.Delete(ctx, ids)
		return err
	})
	return deleted, err
}

// List implements providers.Provider.
func (p *Plugin) List(ctx context.Context) ([]providers.Instance, error) {
	var list []providers.Instance
	err := p.do(ctx, "list", func(ctx context.Context, prov providers.Provider) error {
		var err error
		list, err = prov.List(ctx)
		return err
	})
	return list, err
}

// ConnectInfo implements providers.Provider.
func (p *Plugin) ConnectInfo(ctx context.Context, id string) (providers.ConnectInfo, error) {
	var ci providers.ConnectInfo
	err := p.do(ctx, "connect info", func(ctx context.Context, prov providers.Provider) error {
		var err error
		ci, err = prov.ConnectInfo(ctx, id)
		return err
	})
	return ci, err
}

// Heartbeat implements providers.Provider.
func (p *Plugin) Heartbeat(ctx context.Context, id string) error {
	return p.do(ctx, "heartbeat", func(ctx context.Context, prov providers.Provider) error {
		return prov.Heartbeat(ctx, id)
	})
}

// Shutdown asks the plugin to release its resources, then ends its process
// (see Close). Later calls fail with providers.ErrClosed.
func (p *Plugin) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	pr, already := p.cur, p.closed
	p.closed = true
	p.mu.Unlock()
	var err error
	if pr != nil && !already {
		ctx, cancel := context.WithTimeout(ctx, p.cfg.CallTimeout)
		if serr := pr.prov.Shutdown(ctx); serr != nil {
			err = fmt.Errorf("plugin %s shutdown: %w", p.name, serr)
		}
		cancel()
	}
	return errors.Join(err, p.Close())
}

// Close ends the plugin process without calling its Shutdown and waits for
// the host's goroutines to stop. It is safe to call more than once.
func (p *Plugin) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cancel()
	<-p.done
	if err := os.RemoveAll(p.sockDir); err != nil {
		return fmt.Errorf("plugin %s close: %w", p.name, err)
	}
	return nil
}

// Name returns the plugin's name.
func (p *Plugin) Name() string { return p.name }

// Path returns the plugin binary's path.
func (p *Plugin) Path() string { return p.path }

// PID returns the process id of the live plugin process, or 0 while it is
// not running.
func (p *Plugin) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur == nil {
		return 0
	}
	return p.cur.pid
}

// Restarts returns how many times the plugin process has been restarted.
func (p *Plugin) Restarts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.restarts
}
