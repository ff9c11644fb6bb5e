package sdk

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mayfly-ci/mayfly/providers/internal/wire"
)

// The test binary plays three roles, chosen by MAYFLY_SDK_TEST_ROLE: the
// test, a "manager" that starts a "plugin" and then dies, and the plugin,
// which runs watchParent and says when it noticed.
func TestMain(m *testing.M) {
	switch os.Getenv("MAYFLY_SDK_TEST_ROLE") {
	case "manager":
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "MAYFLY_SDK_TEST_ROLE=plugin", wire.ParentEnv+"="+strconv.Itoa(os.Getpid()))
		cmd.Stdout = os.Stdout
		if err := cmd.Start(); err != nil {
			os.Exit(2)
		}
		fmt.Printf("plugin %d\n", cmd.Process.Pid)
		time.Sleep(200 * time.Millisecond)
		os.Exit(0) // dies without stopping its plugin
	case "plugin":
		stop := make(chan struct{})
		done := make(chan struct{})
		go watchParent(parentPID(), 20*time.Millisecond, stop, func() { close(done) })
		select {
		case <-done:
			fmt.Println("parent gone")
		case <-time.After(20 * time.Second):
			fmt.Println("still here")
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestWatchParent: a plugin notices within moments that the manager that
// started it died, and exits (issue 20).
func TestWatchParent(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "MAYFLY_SDK_TEST_ROLE=manager")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(out)
	var plugin int
	if lines.Scan() {
		plugin, _ = strconv.Atoi(strings.TrimPrefix(lines.Text(), "plugin "))
	}
	if plugin == 0 {
		t.Fatal("the manager role did not start a plugin")
	}
	defer syscall.Kill(plugin, syscall.SIGKILL)
	start := time.Now()
	if !lines.Scan() {
		t.Fatal("no word from the plugin")
	}
	if got := lines.Text(); got != "parent gone" {
		t.Fatalf("plugin said %q, want \"parent gone\"", got)
	}
	t.Logf("noticed %v after the manager started dying", time.Since(start).Round(time.Millisecond))
	_ = cmd.Wait()
}
