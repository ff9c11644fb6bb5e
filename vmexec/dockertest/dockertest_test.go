package dockertest_test

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/client"
	"github.com/docker/docker/pkg/stdcopy"

	"github.com/mayfly-ci/mayfly/vmexec/dockertest"
	"github.com/mayfly-ci/mayfly/vmexec/sshexec"
	"github.com/mayfly-ci/mayfly/vmexec/sshtest"
)

// TestEngineThroughSSH reaches the test daemon as the manager reaches a
// VM's Docker Engine: its socket dialled through the machine's OpenSSH
// (direct-streamlocal), reached on GuestIP, the API version negotiated down to the daemon's
// (Debian's docker.io 20.10 speaks 1.41), and runs a container of the
// busybox image in it.
func TestEngineThroughSSH(t *testing.T) {
	d := dockertest.Run(t)
	sshd := sshtest.RunIn(t, sshtest.OpenSSH, d.NetNS, d.GuestIP)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ssh, err := sshexec.Dial(ctx, sshd.Target())
	if err != nil {
		t.Fatal(err)
	}
	defer ssh.Close()
	c, err := client.NewClientWithOpts(client.WithHost("unix:///var/run/docker.sock"), client.WithAPIVersionNegotiation(),
		client.WithDialContext(func(ctx context.Context, _, _ string) (net.Conn, error) {
			return ssh.DialContext(ctx, "unix", d.Socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.ServerVersion(ctx)
	if err != nil {
		t.Fatalf("version through SSH: %v", err)
	}
	t.Logf("Docker Engine %s, API %s (client negotiated %s)", v.Version, v.APIVersion, c.ClientVersion())
	if c.ClientVersion() != v.APIVersion {
		t.Errorf("client speaks API %s, the daemon %s", c.ClientVersion(), v.APIVersion)
	}
	img, err := dockertest.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	if err := dockertest.Load(ctx, c, img, "busybox:test"); err != nil {
		t.Fatal(err)
	}
	cr, err := c.ContainerCreate(ctx, &container.Config{Image: "busybox:test", Cmd: []string{"cat", "/etc/os-release"}}, &container.HostConfig{NetworkMode: "none"}, nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.ContainerRemove(context.Background(), cr.ID, container.RemoveOptions{Force: true})
	if err := c.ContainerStart(ctx, cr.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	waitC, errC := c.ContainerWait(ctx, cr.ID, container.WaitConditionNotRunning)
	select {
	case w := <-waitC:
		if w.StatusCode != 0 {
			t.Errorf("exit %d", w.StatusCode)
		}
	case err := <-errC:
		t.Fatal(err)
	}
	logs, err := c.ContainerLogs(ctx, cr.ID, container.LogsOptions{ShowStdout: true, ShowStderr: true})
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close()
	var out bytes.Buffer
	if _, err := stdcopy.StdCopy(&out, &out, logs); err != nil {
		t.Fatal(err)
	}
	if out.String() != dockertest.BusyboxOSRelease {
		t.Errorf("the container printed %q, want the image's os-release %q", out.String(), dockertest.BusyboxOSRelease)
	}
}
