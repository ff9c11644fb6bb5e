// Package fake is an in-memory providers.Provider for tests of the fleet,
// with scriptable faults: slow creates and boots on an injected clock,
// failed creates, quota errors, rate limits with retry-after, instances
// that vanish or get preempted, deletes that fail N times, and counters of
// calls per operation.
//
// With a state directory it keeps its instances in a file, so a restarted
// plugin process (cmd/mayfly-plugin-fake) still lists what it created.
package fake

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/providers"
	"github.com/mayfly-ci/mayfly/providers/pluginkit"
)

// Version is the version the fake reports from Init.
const Version = "fake/1"

// Op names a Provider operation, for counters and faults.
type Op string

// Operations.
const (
	OpInit        Op = "init"
	OpCreate      Op = "create"
	OpDelete      Op = "delete"
	OpList        Op = "list"
	OpConnectInfo Op = "connect_info"
	OpHeartbeat   Op = "heartbeat"
	OpShutdown    Op = "shutdown"
)

var allOps = []Op{OpInit, OpCreate, OpDelete, OpList, OpConnectInfo, OpHeartbeat, OpShutdown}

// Options configure a Fake. The zero value is a usable, instant fake.
type Options struct {
	// ID is reported by Init (default "fake"); it also prefixes instance ids.
	ID string
	// MaxSize is reported by Init.
	MaxSize int
	// Quota caps the instances that may exist at once; 0 means no cap.
	// Create makes what fits and returns a quota error for the rest.
	Quota int
	// Now is the clock for boot and delete delays (default time.Now).
	Now func() time.Time
	// Sleep waits for CreateDelay (default: a timer honouring ctx). Tests
	// can pass a function that blocks on a channel.
	Sleep func(ctx context.Context, d time.Duration) error
	// CreateDelay is how long each Create call takes, after the instances
	// are recorded (as when a cloud accepts a request and answers late).
	CreateDelay time.Duration
	// BootDelay is how long (on Now) a new instance stays creating.
	BootDelay time.Duration
	// DeleteDelay is how long (on Now) a deleted instance stays deleting
	// before it leaves List.
	DeleteDelay time.Duration
	// StateDir, if set, holds state.json with the instances.
	StateDir string
	// Protocol, OS, Arch and Username fill ConnectInfo (defaults ssh,
	// linux, amd64, root).
	Protocol providers.Protocol
	OS       string
	Arch     string
	Username string
	// ConnectInfo, if set, replaces the generated connect info, e.g. to
	// point at a test SSH server.
	ConnectInfo func(id string) (providers.ConnectInfo, error)
	// Launch makes Create, called as providers.Launcher, return each new
	// instance with its connect info, as a provider does that knows the
	// address at creation: the fleet then waits for SSH or WinRM at once
	// instead of listing until the instance runs (BootDelay then only
	// delays the state List reports).
	Launch bool
	// Logger receives a record per operation (default: discard).
	Logger *slog.Logger
}

// Settings are the JSON settings Init accepts. Zero fields keep the value
// from Options.
type Settings struct {
	ID          string             `json:"id"`
	MaxSize     int                `json:"max_size"`
	Quota       int                `json:"quota"`
	CreateDelay providers.Duration `json:"create_delay"`
	BootDelay   providers.Duration `json:"boot_delay"`
	DeleteDelay providers.Duration `json:"delete_delay"`
	StateDir    string             `json:"state_dir"`
	Protocol    string             `json:"protocol"`
	OS          string             `json:"os"`
	Launch      bool               `json:"launch"`
	Faults      []FaultSpec        `json:"faults"`
	// Connect, when set, makes every instance's ConnectInfo point at one
	// real server, so tests can run jobs through the fake.
	Connect *ConnectSpec `json:"connect"`
	// Hostile, when set, makes the answers hostile (see HostileSpec).
	Hostile *HostileSpec `json:"hostile"`
	// Chaos, when set, injects faults at a seeded rate (see ChaosSpec).
	Chaos *ChaosSpec `json:"chaos"`
}

// ConnectSpec is the server every instance's ConnectInfo points at.
type ConnectSpec struct {
	Address    string `json:"address"`
	Port       int    `json:"port"`
	Username   string `json:"username"`
	PrivateKey string `json:"private_key"` // PEM
	HostKey    string `json:"host_key"`    // authorized_keys format
}

// FaultSpec scripts a fault from settings.
type FaultSpec struct {
	// Op is the failing operation.
	Op Op `json:"op"`
	// Kind is a providers.Kind name: "rate_limited", "quota_exceeded",
	// "capacity_exhausted", "not_found", "permanent", "transient",
	// "invalid_argument".
	Kind string `json:"kind"`
	// Times is how many calls fail (default 1; negative: every call).
	Times int `json:"times"`
	// RetryAfter goes with rate_limited.
	RetryAfter providers.Duration `json:"retry_after"`
	// Scope goes with quota_exceeded and capacity_exhausted.
	Scope string `json:"scope"`
	// ID limits a delete fault to this instance.
	ID string `json:"id"`
}

type fault struct {
	op        Op
	id        string // delete only: the instance whose deletion fails
	remaining int    // < 0: forever
	err       error
}

// instance is the stored form of an instance.
type instance struct {
	ID         string            `json:"id"`
	Labels     map[string]string `json:"labels,omitempty"`
	CreatedAt  time.Time         `json:"created_at"`
	State      providers.State   `json:"state"`
	Reason     string            `json:"reason,omitempty"`
	FailBoot   bool              `json:"fail_boot,omitempty"`
	DeletedAt  time.Time         `json:"deleted_at,omitzero"`
	PreemptAt  time.Time         `json:"preempt_at,omitzero"`
	Port       int               `json:"port"`
	PrivateKey string            `json:"private_key,omitempty"`
	HostKey    string            `json:"host_key,omitempty"`
}

type stateFile struct {
	NextSeq   int         `json:"next_seq"`
	Instances []*instance `json:"instances"`
}

// Fake is an in-memory provider. It is safe for concurrent use.
type Fake struct {
	mu        sync.Mutex
	opts      Options
	seq       int
	instances map[string]*instance
	faults    []*fault
	failBoots int
	holds     map[Op]chan struct{}
	calls     map[Op]int
	closed    bool
	hostile   *HostileSpec
	chaos     *ChaosSpec
	chaosRand *mrand.Rand
	// chaosFirstDone: the ChaosSpec's First fault was injected
	chaosFirstDone bool
}

var _ providers.Provider = (*Fake)(nil)

// New returns a fake configured by opts. With opts.StateDir it loads the
// instances stored there.
func New(opts Options) (*Fake, error) {
	f := &Fake{
		opts:      opts,
		instances: map[string]*instance{},
		holds:     map[Op]chan struct{}{},
		calls:     map[Op]int{},
	}
	f.defaults()
	if f.opts.StateDir != "" {
		if err := f.load(); err != nil {
			return nil, err
		}
	}
	return f, nil
}

func (f *Fake) defaults() {
	o := &f.opts
	if o.ID == "" {
		o.ID = "fake"
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Sleep == nil {
		o.Sleep = pluginkit.Sleep
	}
	if o.Protocol == "" {
		o.Protocol = providers.ProtocolSSH
	}
	if o.OS == "" {
		o.OS = "linux"
	}
	if o.Arch == "" {
		o.Arch = "amd64"
	}
	if o.Username == "" {
		o.Username = "root"
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// begin counts a call of op, waits while op is held, and returns the
// injected error for the call, if any. It is called without f.mu held.
func (f *Fake) begin(ctx context.Context, op Op) error {
	f.mu.Lock()
	f.calls[op]++
	hold := f.holds[op]
	closed := f.closed && op != OpShutdown
	f.mu.Unlock()
	if closed {
		return providers.Permanent(fmt.Errorf("%s: %w", op, providers.ErrClosed))
	}
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return providers.Transient(fmt.Errorf("%s: %w", op, ctx.Err()))
		}
	}
	if d := f.hostileDelay(op); d > 0 {
		if err := f.opts.Sleep(ctx, d); err != nil {
			return providers.Transient(fmt.Errorf("%s: %w", op, err))
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.takeFault(op, ""); err != nil {
		return err
	}
	return f.chaosFault(op)
}

// takeFault consumes and returns the first matching fault. f.mu is held.
func (f *Fake) takeFault(op Op, id string) error {
	for i, ft := range f.faults {
		if ft.op != op || ft.id != id || ft.remaining == 0 {
			continue
		}
		if ft.remaining > 0 {
			ft.remaining--
			if ft.remaining == 0 {
				f.faults = slices.Delete(f.faults, i, i+1)
			}
		}
		return ft.err
	}
	return nil
}

// Init implements providers.Provider. It applies Settings over Options.
func (f *Fake) Init(ctx context.Context, raw json.RawMessage) (providers.Info, error) {
	if err := f.begin(ctx, OpInit); err != nil {
		return providers.Info{}, err
	}
	var s Settings
	if err := providers.DecodeSettings(raw, &s); err != nil {
		return providers.Info{}, fmt.Errorf("fake init: %w", err)
	}
	faults := make([]*fault, 0, len(s.Faults))
	for i, spec := range s.Faults {
		ft, err := spec.fault()
		if err != nil {
			return providers.Info{}, providers.InvalidArgument(fmt.Errorf("fake init: settings key \"faults[%d]\": %w", i, err))
		}
		faults = append(faults, ft)
	}
	if s.Protocol != "" && s.Protocol != string(providers.ProtocolSSH) && s.Protocol != string(providers.ProtocolWinRM) {
		return providers.Info{}, providers.InvalidArgument(fmt.Errorf("fake init: settings key \"protocol\": %q is not ssh or winrm", s.Protocol))
	}
	if s.Hostile != nil {
		if err := s.Hostile.check(); err != nil {
			return providers.Info{}, providers.InvalidArgument(fmt.Errorf("fake init: settings key \"hostile\": %w", err))
		}
	}
	if s.Chaos != nil {
		if err := s.Chaos.check(); err != nil {
			return providers.Info{}, providers.InvalidArgument(fmt.Errorf("fake init: settings key \"chaos\": %w", err))
		}
	}
	if s.MaxSize < 0 || s.Quota < 0 {
		return providers.Info{}, providers.InvalidArgument(errors.New("fake init: settings keys \"max_size\" and \"quota\" must not be negative"))
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	o := &f.opts
	setIf(&o.ID, s.ID)
	setIf(&o.MaxSize, s.MaxSize)
	setIf(&o.Quota, s.Quota)
	setIf(&o.CreateDelay, time.Duration(s.CreateDelay))
	setIf(&o.BootDelay, time.Duration(s.BootDelay))
	setIf(&o.DeleteDelay, time.Duration(s.DeleteDelay))
	setIf(&o.Protocol, providers.Protocol(s.Protocol))
	setIf(&o.OS, s.OS)
	o.Launch = o.Launch || s.Launch
	if c := s.Connect; c != nil {
		if c.Address == "" || c.Port <= 0 || c.Username == "" {
			return providers.Info{}, providers.InvalidArgument(errors.New("fake init: settings key \"connect\": address, port and username are required"))
		}
		spec := *c
		o.ConnectInfo = func(id string) (providers.ConnectInfo, error) {
			return providers.ConnectInfo{ID: id, Address: spec.Address, Port: spec.Port, Protocol: providers.ProtocolSSH, OS: "linux", Arch: "amd64",
				Username: spec.Username, PrivateKey: []byte(spec.PrivateKey), HostKey: spec.HostKey}, nil
		}
	}
	if s.OS == "windows" && s.Protocol == "" {
		o.Protocol = providers.ProtocolWinRM
	}
	f.faults = append(f.faults, faults...)
	if s.Hostile != nil {
		f.applyHostileLocked(s.Hostile)
	}
	if s.Chaos != nil {
		f.applyChaosLocked(s.Chaos)
	}
	if s.StateDir != "" && s.StateDir != o.StateDir {
		o.StateDir = s.StateDir
		if err := f.load(); err != nil {
			return providers.Info{}, err
		}
	}
	o.Logger.Info("fake provider initialised", "id", o.ID, "state_dir", o.StateDir, "instances", len(f.instances))
	return providers.Info{ID: o.ID, MaxSize: o.MaxSize, Version: Version}, nil
}

func setIf[T comparable](dst *T, v T) {
	var zero T
	if v != zero {
		*dst = v
	}
}

func (s FaultSpec) fault() (*fault, error) {
	if !slices.Contains(allOps, s.Op) {
		return nil, fmt.Errorf("op %q is not one of %v", s.Op, allOps)
	}
	kind, err := providers.ParseKind(s.Kind)
	if err != nil {
		return nil, err
	}
	if s.ID != "" && s.Op != OpDelete {
		return nil, fmt.Errorf("id is only allowed with op %q", OpDelete)
	}
	times := s.Times
	if times == 0 {
		times = 1
	}
	return &fault{op: s.Op, id: s.ID, remaining: times, err: KindError(kind, time.Duration(s.RetryAfter), s.Scope)}, nil
}

// KindError returns an injected error of kind, as faults from settings do.
func KindError(kind providers.Kind, retryAfter time.Duration, scope string) error {
	cause := errors.New("injected by fake")
	switch kind {
	case providers.KindNotFound:
		return providers.NotFound("injected")
	case providers.KindQuotaExceeded:
		return providers.QuotaExceeded(scope, cause)
	case providers.KindRateLimited:
		return providers.RateLimited(retryAfter, cause)
	case providers.KindCapacityExhausted:
		return providers.CapacityExhausted(scope, cause)
	case providers.KindPermanent:
		return providers.Permanent(cause)
	case providers.KindTransient:
		return providers.Transient(cause)
	case providers.KindInvalidArgument:
		return providers.InvalidArgument(cause)
	}
	return cause
}

// Create implements providers.Provider.
func (f *Fake) Create(ctx context.Context, n int, labels map[string]string) ([]string, error) {
	timeOut := false // made in the cloud, timed out for the caller
	if err := f.begin(ctx, OpCreate); errors.Is(err, errCreateTimeout) {
		timeOut = true
	} else if err != nil {
		return nil, fmt.Errorf("fake create: %w", err)
	}
	if n < 0 {
		return nil, providers.InvalidArgument(fmt.Errorf("fake create: count %d is negative", n))
	}
	if n == 0 {
		return nil, nil
	}

	f.mu.Lock()
	now := f.opts.Now()
	f.advance(now)
	want := n
	var quotaErr error
	if q := f.opts.Quota; q > 0 {
		if free := q - len(f.instances); free < n {
			n = max(free, 0)
			quotaErr = providers.QuotaExceeded("fake", fmt.Errorf("%d of %d instances in use, %d more requested", len(f.instances), q, want))
		}
	}
	ids := make([]string, 0, n)
	for range n {
		f.seq++
		in := &instance{
			ID:        fmt.Sprintf("%s-%06d", f.opts.ID, f.seq),
			Labels:    maps.Clone(labels),
			CreatedAt: now,
			State:     providers.StateCreating,
			Port:      20000 + f.seq%40000,
		}
		if f.failBoots > 0 {
			f.failBoots--
			in.FailBoot = true
		}
		in.PreemptAt = f.chaosPreemptAt(now)
		f.instances[in.ID] = in
		ids = append(ids, in.ID)
	}
	f.advance(now) // a zero BootDelay makes them running at once
	err := f.save()
	delay := f.opts.CreateDelay
	sleepFn := f.opts.Sleep
	f.opts.Logger.Info("fake create", "requested", want, "created", len(ids))
	f.mu.Unlock()

	if err != nil {
		return ids, fmt.Errorf("fake create: %w", err)
	}
	if err := sleepFn(ctx, delay); err != nil {
		return ids, providers.Transient(fmt.Errorf("fake create: %w", err))
	}
	if timeOut {
		return nil, createTimedOut()
	}
	if quotaErr != nil {
		return ids, fmt.Errorf("fake create: %w", quotaErr)
	}
	return ids, nil
}

// Launching is the fake as a providers.Launcher: Create, with each new
// instance's connect info when Options.Launch (the "launch" setting) is
// set, ids only otherwise. The plugin serves it, so that the setting can
// turn launching on; *Fake itself is no Launcher, so that wrappers of it
// that record Create see every call.
type Launching struct{ *Fake }

var _ providers.Launcher = Launching{}

// Launch implements providers.Launcher. It counts as one Create call and
// no ConnectInfo call.
func (l Launching) Launch(ctx context.Context, n int, labels map[string]string) ([]providers.Instance, error) {
	f := l.Fake
	ids, err := f.Create(ctx, n, labels)
	out := make([]providers.Instance, 0, len(ids))
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range ids {
		in := providers.Instance{ID: id, State: providers.StateCreating}
		if f.opts.Launch {
			ci, cerr := f.connectInfoLocked(id)
			if cerr != nil {
				return out, errors.Join(err, cerr)
			}
			in.ConnectInfo = &ci
		}
		out = append(out, in)
	}
	return out, err
}

// Delete implements providers.Provider. Unknown ids count as deleted.
func (f *Fake) Delete(ctx context.Context, ids []string) ([]string, error) {
	if err := f.begin(ctx, OpDelete); err != nil {
		return nil, fmt.Errorf("fake delete: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.opts.Now()
	f.advance(now)
	deleted := make([]string, 0, len(ids))
	var errs []error
	for _, id := range ids {
		if err := f.takeFault(OpDelete, id); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", id, err))
			continue
		}
		if in, ok := f.instances[id]; ok && in.State != providers.StateDeleting {
			in.State = providers.StateDeleting
			in.Reason = ""
			in.DeletedAt = now
		}
		deleted = append(deleted, id)
	}
	f.advance(now)
	if err := f.save(); err != nil {
		errs = append(errs, err)
	}
	f.opts.Logger.Info("fake delete", "requested", len(ids), "deleted", len(deleted))
	if len(errs) > 0 {
		return deleted, fmt.Errorf("fake delete: %w", errors.Join(errs...))
	}
	return deleted, nil
}

// List implements providers.Provider. Instances are sorted by id.
func (f *Fake) List(ctx context.Context) ([]providers.Instance, error) {
	if err := f.begin(ctx, OpList); err != nil {
		return nil, fmt.Errorf("fake list: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.advance(f.opts.Now()) {
		if err := f.save(); err != nil {
			return nil, fmt.Errorf("fake list: %w", err)
		}
	}
	return f.hostileList(f.snapshot()), nil
}

// ConnectInfo implements providers.Provider.
func (f *Fake) ConnectInfo(ctx context.Context, id string) (providers.ConnectInfo, error) {
	if err := f.begin(ctx, OpConnectInfo); err != nil {
		return providers.ConnectInfo{}, fmt.Errorf("fake connect info: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.advance(f.opts.Now())
	return f.connectInfoLocked(id)
}

// connectInfoLocked is ConnectInfo without its call accounting. f.mu is
// held.
func (f *Fake) connectInfoLocked(id string) (providers.ConnectInfo, error) {
	in, ok := f.instances[id]
	if !ok {
		return providers.ConnectInfo{}, providers.NotFound(id)
	}
	if f.opts.ConnectInfo != nil {
		ci, err := f.opts.ConnectInfo(id)
		return f.hostileConnectInfo(ci), err
	}
	if in.PrivateKey == "" {
		priv, host, err := newKeys()
		if err != nil {
			return providers.ConnectInfo{}, providers.Transient(fmt.Errorf("fake connect info %s: %w", id, err))
		}
		in.PrivateKey, in.HostKey = priv, host
		if err := f.save(); err != nil {
			return providers.ConnectInfo{}, fmt.Errorf("fake connect info %s: %w", id, err)
		}
	}
	ci := providers.ConnectInfo{
		ID:       id,
		Address:  "127.0.0.1",
		Port:     in.Port,
		Protocol: f.opts.Protocol,
		OS:       f.opts.OS,
		Arch:     f.opts.Arch,
		Username: f.opts.Username,
		HostKey:  in.HostKey,
	}
	if ci.Protocol == providers.ProtocolWinRM {
		ci.Password = "fake-" + id
	} else {
		ci.PrivateKey = []byte(in.PrivateKey)
	}
	return f.hostileConnectInfo(ci), nil
}

// newKeys returns a PEM private login key and an authorized_keys host key.
func newKeys() (private, host string, err error) {
	_, login, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", err
	}
	block, err := ssh.MarshalPrivateKey(login, "mayfly-fake")
	if err != nil {
		return "", "", err
	}
	hostPub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", err
	}
	pub, err := ssh.NewPublicKey(hostPub)
	if err != nil {
		return "", "", err
	}
	return string(pem.EncodeToMemory(block)), string(ssh.MarshalAuthorizedKey(pub)), nil
}

// Heartbeat implements providers.Provider: nil for a running instance.
func (f *Fake) Heartbeat(ctx context.Context, id string) error {
	if err := f.begin(ctx, OpHeartbeat); err != nil {
		return fmt.Errorf("fake heartbeat: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.advance(f.opts.Now())
	in, ok := f.instances[id]
	switch {
	case !ok:
		return providers.NotFound(id)
	case in.State == providers.StateRunning:
		return nil
	case in.State == providers.StateCreating:
		return providers.Transient(fmt.Errorf("fake heartbeat %s: still creating", id))
	}
	return providers.Permanent(fmt.Errorf("fake heartbeat %s: instance is %s %s", id, in.State, in.Reason))
}

// Shutdown implements providers.Provider. Later calls fail with ErrClosed.
func (f *Fake) Shutdown(ctx context.Context) error {
	if err := f.begin(ctx, OpShutdown); err != nil {
		return fmt.Errorf("fake shutdown: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

// advance moves instances along their delays at now and reports whether
// anything changed. f.mu is held.
func (f *Fake) advance(now time.Time) bool {
	changed := false
	for id, in := range f.instances {
		switch in.State {
		case providers.StateCreating:
			if !now.Before(in.CreatedAt.Add(f.opts.BootDelay)) {
				in.State = providers.StateRunning
				if in.FailBoot {
					in.State, in.Reason = providers.StateFailed, "boot failed"
				}
				changed = true
			}
			fallthrough
		case providers.StateRunning:
			if in.State == providers.StateRunning && !in.PreemptAt.IsZero() && !now.Before(in.PreemptAt) {
				in.State, in.Reason = providers.StateFailed, "preempted"
				f.logFault(ChaosPreempted, id)
				changed = true
			}
		case providers.StateDeleting:
			if !now.Before(in.DeletedAt.Add(f.opts.DeleteDelay)) {
				delete(f.instances, id)
				changed = true
			}
		}
	}
	return changed
}

func (f *Fake) snapshot() []providers.Instance {
	out := make([]providers.Instance, 0, len(f.instances))
	for _, in := range f.instances {
		out = append(out, providers.Instance{
			ID:        in.ID,
			State:     in.State,
			Labels:    maps.Clone(in.Labels),
			CreatedAt: in.CreatedAt,
			Reason:    in.Reason,
		})
	}
	slices.SortFunc(out, func(a, b providers.Instance) int { return strings.Compare(a.ID, b.ID) })
	return out
}

const stateFileName = "state.json"

// load reads the state file, if any. f.mu is held (or f is unshared).
func (f *Fake) load() error {
	path := filepath.Join(f.opts.StateDir, stateFileName)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("fake: load state: %w", err)
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("fake: load state %s: %w", path, err)
	}
	f.seq = max(f.seq, st.NextSeq)
	for _, in := range st.Instances {
		if !in.State.Valid() {
			return fmt.Errorf("fake: load state %s: instance %s has invalid state %q", path, in.ID, in.State)
		}
		f.instances[in.ID] = in
	}
	return nil
}

// save writes the state file atomically. f.mu is held.
func (f *Fake) save() error {
	if f.opts.StateDir == "" {
		return nil
	}
	st := stateFile{NextSeq: f.seq, Instances: slices.Collect(maps.Values(f.instances))}
	slices.SortFunc(st.Instances, func(a, b *instance) int { return strings.Compare(a.ID, b.ID) })
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("fake: save state: %w", err)
	}
	if err := os.MkdirAll(f.opts.StateDir, 0o700); err != nil {
		return fmt.Errorf("fake: save state: %w", err)
	}
	tmp, err := os.CreateTemp(f.opts.StateDir, stateFileName+".*")
	if err != nil {
		return fmt.Errorf("fake: save state: %w", err)
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("fake: save state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("fake: save state: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(f.opts.StateDir, stateFileName)); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("fake: save state: %w", err)
	}
	return nil
}
