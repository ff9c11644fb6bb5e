package containerrun

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/client"
	"github.com/docker/docker/errdefs"
	"github.com/docker/docker/pkg/stdcopy"

	"github.com/mayfly-ci/mayfly/manager/buildscript"
	"github.com/mayfly-ci/mayfly/manager/runnerapi"
)

// service is a started service container.
type service struct {
	name    string // the container's name
	display string // the image as the trace shows it
	ip      string // on the job's network
	ports   []int  // its image's exposed TCP ports
}

// startServices pulls and starts the services on the job's network, each
// reachable by its aliases; an alias already taken is skipped with a
// warning, as in gitlab-runner.
func (r *Runner) startServices(ctx context.Context, p *preparation, svcs []runnerapi.Image) ([]service, error) {
	taken := map[string]bool{}
	var out []service
	for i, svc := range svcs {
		var aliases []string
		for _, a := range serviceAliases(svc) {
			if taken[a] {
				p.warnf("Skipping alias %q for service %q (services[%d]): alias is already in use by another service.", a, svc.Name, i)
				continue
			}
			taken[a] = true
			aliases = append(aliases, a)
		}
		p.printf("Starting service %s ...", withTag(svc.Name))
		id, err := r.getImage(ctx, p, svc.Name, svc.PullPolicy)
		if err != nil {
			return nil, err
		}
		s, err := r.startService(ctx, i, svc, id, aliases)
		if err != nil {
			return nil, fmt.Errorf("start service %s: %w", svc.Name, err)
		}
		s.display = svc.Name
		out = append(out, s)
	}
	return out, nil
}

// startService creates and starts one service container unless it exists
// (a restarted preparation), and reads its address and ports.
func (r *Runner) startService(ctx context.Context, i int, svc runnerapi.Image, imageID string, aliases []string) (service, error) {
	name := serviceContainer(r.job, i)
	env := []string{}
	for _, v := range r.o.Job.Variables {
		if v.Public && !v.File {
			env = append(env, v.Key+"="+v.Value)
		}
	}
	for _, v := range svc.Variables {
		env = append(env, v.Key+"="+r.expand(v.Value))
	}
	cfg := &container.Config{
		Image:      imageID,
		Env:        env,
		Cmd:        svc.Command,
		Entrypoint: svc.Entrypoint,
		Labels:     map[string]string{labelJob: strconv.FormatInt(r.job, 10), labelKind: "service"},
	}
	hc := r.hostConfig(false)
	nc := &network.NetworkingConfig{EndpointsConfig: map[string]*network.EndpointSettings{
		networkName(r.job): {Aliases: aliases},
	}}
	if _, err := r.o.Client.ContainerCreate(ctx, cfg, hc, nc, nil, name); err != nil && !errdefs.IsConflict(err) {
		return service{}, err
	}
	if err := r.o.Client.ContainerStart(ctx, name, container.StartOptions{}); err != nil {
		return service{}, err
	}
	ins, err := r.o.Client.ContainerInspect(ctx, name)
	if err != nil {
		return service{}, err
	}
	s := service{name: name}
	if ins.NetworkSettings != nil {
		if ep := ins.NetworkSettings.Networks[networkName(r.job)]; ep != nil {
			s.ip = ep.IPAddress
		}
	}
	if ins.Config != nil {
		for p := range ins.Config.ExposedPorts {
			if p.Proto() == "tcp" {
				s.ports = append(s.ports, p.Int())
			}
		}
	}
	sort.Ints(s.ports)
	return s, nil
}

// waitForServices waits, as gitlab-runner does, until one exposed port of
// each service accepts a TCP connection (from the VM, through the job's
// connection), at most wait_for_services_timeout. A service that does not
// answer gets a warning with its log; the job goes on.
func (r *Runner) waitForServices(ctx context.Context, p *preparation, svcs []service) {
	timeout := r.o.Docker.WaitForServicesTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	if len(svcs) == 0 || timeout < 0 || r.o.Dial == nil {
		return
	}
	p.printf("Waiting for services to be up and running (timeout %d seconds)...", int(timeout/time.Second))
	warnings := make([]string, len(svcs))
	var wg sync.WaitGroup
	for i, s := range svcs {
		wg.Add(1)
		go func() { // ends within timeout
			defer wg.Done()
			if err := r.waitForService(ctx, s, timeout); err != nil {
				warnings[i] = r.serviceWarning(ctx, s, err)
			}
		}()
	}
	wg.Wait()
	for _, w := range warnings {
		fmt.Fprint(p, w)
	}
}

func (r *Runner) waitForService(ctx context.Context, s service, timeout time.Duration) error {
	if len(s.ports) == 0 {
		return fmt.Errorf("service %q has no exposed ports", s.name)
	}
	if s.ip == "" {
		return fmt.Errorf("service %q has no address on the job's network", s.name)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		for _, port := range s.ports {
			dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
			c, err := r.o.Dial(dctx, "tcp", net.JoinHostPort(s.ip, strconv.Itoa(port)))
			dcancel()
			if err == nil {
				c.Close()
				return nil
			}
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("service %q timeout: %v", s.name, last)
		case <-time.After(time.Second):
		}
	}
}

// serviceWarning is gitlab-runner's block for a service that did not
// answer, with the end of its log.
func (r *Runner) serviceWarning(ctx context.Context, s service, err error) string {
	var b strings.Builder
	b.WriteString("\n" + buildscript.WarningLine("Service "+s.display+" probably didn't start properly.") + "\n")
	b.WriteString("Health check error:\n" + strings.TrimSpace(err.Error()) + "\n\n")
	b.WriteString("Service container logs:\n" + r.tail(ctx, s.name) + "\n\n")
	b.WriteString(buildscript.WarningLine("*********") + "\n")
	return b.String()
}

// tail returns the last lines a container wrote.
func (r *Runner) tail(ctx context.Context, name string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rc, err := r.o.Client.ContainerLogs(ctx, name, container.LogsOptions{ShowStdout: true, ShowStderr: true, Tail: "50"})
	if err != nil {
		if client.IsErrNotFound(err) {
			return "(no container)"
		}
		return "(cannot read the log: " + err.Error() + ")"
	}
	defer rc.Close()
	var buf bytes.Buffer
	_, _ = stdcopy.StdCopy(&buf, &buf, rc)
	return strings.TrimRight(buf.String(), "\n")
}
