package detach

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/mayfly-ci/mayfly/internal/testenv"
)

// mf_lastpid gives the pid the kernel handed out last in each shell a
// machine may run stages with. Read from ns_last_pid, dash and busybox
// ash got "1" (a sysctl file read one byte at a time), and the leftover
// check read every process's stat file after every stage.
func TestLastPidInEachShell(t *testing.T) {
	shells := []struct{ name, install string }{
		{"dash", "Debian's /bin/sh"},
		{"busybox", "make setup installs it"},
		{"bash", "Debian's bash"},
	}
	for _, sh := range shells {
		t.Run(sh.name, func(t *testing.T) {
			argv := []string{testenv.LookPath(t, sh.name, sh.install)}
			if sh.name == "busybox" {
				argv = append(argv, "sh")
			}
			// The pid of a child just made is the last one handed out, or
			// older than one another process made since.
			script := lastPidFunction + `(exit 0) & child=$!; wait; mf_lastpid; echo "$child $mf_np"`
			out, err := exec.Command(argv[0], append(argv[1:], "-c", script)...).CombinedOutput()
			if err != nil {
				t.Fatalf("%s: %v\n%s", sh.name, err, out)
			}
			f := strings.Fields(string(out))
			if len(f) != 2 {
				t.Fatalf("output %q, want two pids", out)
			}
			child, _ := strconv.Atoi(f[0])
			last, err := strconv.Atoi(f[1])
			if err != nil || child <= 1 || last < child {
				t.Errorf("%s: mf_lastpid gave %q after a child with pid %s; want a pid at least the child's", sh.name, f[1], f[0])
			}
		})
	}
}
