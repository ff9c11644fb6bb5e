package containerrun_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/client"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/mayfly-ci/mayfly/manager/config"
	"github.com/mayfly-ci/mayfly/manager/containerrun"
	"github.com/mayfly-ci/mayfly/manager/stagerun"
	"github.com/mayfly-ci/mayfly/vmexec/detach"
	"github.com/mayfly-ci/mayfly/vmexec/dockertest"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// One Docker Engine serves every test of the package (each job has its
// own id, so its containers, network and volumes are its own).
var (
	daemonOnce sync.Once
	daemon     *dockertest.Daemon
	daemonErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if daemon != nil {
		if err := daemon.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stop the test Docker Engine:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func sharedDaemon(t testing.TB) *dockertest.Daemon {
	t.Helper()
	dockertest.Require(t)
	daemonOnce.Do(func() { daemon, daemonErr = dockertest.Start(context.Background()) })
	if daemonErr != nil {
		t.Fatal(daemonErr)
	}
	return daemon
}

// Registry credentials the test registry accepts, as GitLab's accepts
// gitlab-ci-token and the job token.
const (
	regUser  = "gitlab-ci-token"
	jobToken = "job-token-6f1e2d3c4b5a"
)

// env is a "VM" for one test: a real OpenSSH on 127.0.0.1 as its sshd, the
// shared Docker Engine reached through it, a builds directory, and a
// registry on 127.0.0.1 that wants the job token.
type env struct {
	ssh      *sshexec.Client
	docker   *client.Client
	sock     string
	builds   string
	registry string // host:port
	pulls    *pullLog
}

// pullLog records the registry's manifest requests and their user names.
type pullLog struct {
	mu    sync.Mutex
	users []string
}

func (p *pullLog) add(u string) { p.mu.Lock(); p.users = append(p.users, u); p.mu.Unlock() }
func (p *pullLog) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.users...)
}

func newEnv(t testing.TB) *env {
	t.Helper()
	d := sharedDaemon(t)
	sshd := sshtest.RunIn(t, sshtest.OpenSSH, d.NetNS, d.GuestIP)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ssh, err := sshexec.Dial(ctx, sshd.Target())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ssh.Close() })
	c, err := containerrun.NewClient(ssh.DialContext, "unix://"+d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	e := &env{ssh: ssh, docker: c, sock: d.Socket, builds: t.TempDir(), pulls: &pullLog{}}

	reg := ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		if !ok || u != regUser || p != jobToken {
			w.Header().Set("WWW-Authenticate", `Basic realm="test registry"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/") {
			e.pulls.add(u)
		}
		reg.ServeHTTP(w, r)
	}))
	// The registry is on the host's side of the machine's veth, as the
	// coordinator is at 10.0.2.2 for a qemu VM.
	ln, err := net.Listen("tcp", net.JoinHostPort(d.HostIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	e.registry = strings.TrimPrefix(srv.URL, "http://")
	return e
}

// push pushes img to the test registry as repo:tag and returns the
// reference.
func (e *env) push(t testing.TB, img v1.Image, repoTag string) string {
	t.Helper()
	ref := e.registry + "/" + repoTag
	tag, err := name.NewTag(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(tag, img, remote.WithAuth(&authn.Basic{Username: regUser, Password: jobToken})); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref
}

// busybox is the test image; withPort adds an exposed port and a command.
func busybox(t testing.TB) v1.Image {
	t.Helper()
	img, err := dockertest.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func serviceImage(t testing.TB, port int, cmd ...string) v1.Image {
	t.Helper()
	cf, err := busybox(t).ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Config.ExposedPorts = map[string]struct{}{fmt.Sprintf("%d/tcp", port): {}}
	cf.Config.Cmd = cmd
	img, err := mutate.ConfigFile(busybox(t), cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// newRunner makes the job's runner on env, as the manager does: runner
// stages attached in the VM's shell (bash).
func (e *env) newRunner(t testing.TB, o containerrun.Options) *containerrun.Runner {
	t.Helper()
	// The VM's shell runs the runner's stages detached, as the manager's
	// shell runner does: they too reattach in a new runner. The job
	// directory is the job's own, the same for every runner of the job.
	d, err := detach.New(detach.Options{Dir: filepath.Join(e.builds, ".mayfly", fmt.Sprintf("job-%d", o.Job.ID)), Shell: "bash",
		Exec: e.ssh, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	o.Shell = detached{d}
	o.Client = e.docker
	o.Dial = e.ssh.DialContext
	o.InternalNetwork = true
	o.BuildsDir = e.builds
	o.StopGrace = 2 * time.Second
	if o.Docker.PullPolicy == nil {
		o.Docker.PullPolicy = []string{"always"}
	}
	if o.Docker.WaitForServicesTimeout == 0 {
		o.Docker.WaitForServicesTimeout = 20 * time.Second
	}
	o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	r, err := containerrun.New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := r.Close(ctx, true); err != nil {
			t.Errorf("close the runner: %v", err)
		}
	})
	return r
}

type dockerCfg = config.Docker

// detached is a detach.Runner seen as a stagerun.Runner (as the
// manager's adapter does).
type detached struct{ r *detach.Runner }

func toDetach(s stagerun.Stage) detach.Stage {
	d := detach.Stage{ID: s.ID, Script: s.Script, Env: s.Env, From: s.From}
	for _, n := range s.Then {
		d.Then = append(d.Then, toDetach(n))
	}
	return d
}

func (d detached) Run(ctx context.Context, s stagerun.Stage, out io.Writer) (int, error) {
	return d.r.Run(ctx, toDetach(s), out)
}

func (d detached) Stop(ctx context.Context, id string) error { return d.r.Stop(ctx, id) }

// dockerConfig is [runners.docker] with gitlab-runner's defaults.
func dockerConfig() config.Docker {
	return config.Docker{Host: config.DefaultDockerHost, PullPolicy: []string{"always"}, ServicesLimit: -1,
		WaitForServicesTimeout: 20 * time.Second}
}
