package sshexec

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/mayfly-ci/mayfly/internal/testenv"
	"github.com/mayfly-ci/mayfly/vmexec"
)

// localShells are the shells the generated snippets must work in: a VM's
// login shell is usually busybox ash, a Debian host's dash or bash. dash
// and bash are Debian's essential packages; make setup installs busybox
// (busybox-static). A missing one fails the test under CI=true; elsewhere
// the test runs in those present and skips, saying why, when none is.
func localShells(t *testing.T) [][]string {
	var shells [][]string
	var missing []string
	for _, s := range [][]string{{"/usr/bin/dash"}, {"/usr/bin/bash"}, {"/usr/bin/busybox", "ash"}} {
		if _, err := os.Stat(s[0]); err == nil {
			shells = append(shells, s)
		} else {
			missing = append(missing, s[0])
		}
	}
	if len(missing) > 0 && (testenv.InCI() || len(shells) == 0) {
		testenv.Missing(t, fmt.Sprintf("shells %v are missing (make setup installs busybox-static; dash and bash are essential)", missing))
	}
	return shells
}

func shellCmd(sh []string, args ...string) *exec.Cmd {
	return exec.Command(sh[0], append(append([]string{}, sh[1:]...), args...)...)
}

func TestQuote(t *testing.T) {
	words := []string{"", "plain", "a b", "it's", "'", "''", `"$HOME"`, "`id`", "$(id)", "back\\slash", "new\nline", "ü✓日本", "*?[a]", "-n"}
	for _, sh := range localShells(t) {
		for _, w := range words {
			out, err := shellCmd(sh, "-c", "printf '%s' "+quote(w)).Output()
			if err != nil || string(out) != w {
				t.Errorf("%v: quote(%q) came back as %q (err %v)", sh, w, out, err)
			}
		}
	}
}

func TestRunPayloadInLocalShells(t *testing.T) {
	env, err := vmexec.ParseEnv([]string{"A=x y", "B=it's"})
	if err != nil {
		t.Fatal(err)
	}
	const token = "abc123"
	payload := runPayload(token, env, "echo \"$A|$B\"\ncat\nexit 7")
	for _, sh := range localShells(t) {
		t.Run(strings.Join(sh, " "), func(t *testing.T) {
			// As on the remote side: a shell reading the payload on stdin in its
			// own process group (Setpgid stands in for setsid).
			cmd := shellCmd(sh, "-s")
			cmd.Stdin = bytes.NewReader(payload)
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			err := cmd.Run()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 7 {
				t.Fatalf("exit: %v, want status 7; stderr %q", err, errb.String())
			}
			if out.String() != "x y|it's\n" {
				t.Errorf("stdout %q", out.String())
			}
			want := fmt.Sprintf("%s%s:%d\n", markerPrefix, token, cmd.Process.Pid)
			if errb.String() != want {
				t.Errorf("stderr %q, want the marker %q", errb.String(), want)
			}
		})
	}
}

func TestRunPayloadRefusesNonLeader(t *testing.T) {
	sh := localShells(t)[0]
	cmd := shellCmd(sh, "-s") // no Setpgid: in the test's process group
	cmd.Stdin = bytes.NewReader(runPayload("t", nil, "echo ran"))
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 125 || strings.Contains(string(out), "ran") {
		t.Errorf("err %v output %q: want exit 125 before the script runs", err, out)
	}
}

func TestKillCommandInLocalShells(t *testing.T) {
	for _, sh := range localShells(t) {
		for _, ignoreTerm := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/ignoreTERM=%v", strings.Join(sh, " "), ignoreTerm), func(t *testing.T) {
				script := "sleep 1000 & sleep 1000 & echo ready; wait"
				if ignoreTerm {
					script = "trap '' TERM; " + script
				}
				group := exec.Command("/bin/sh", "-c", script)
				group.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
				stdout, err := group.StdoutPipe()
				if err != nil {
					t.Fatal(err)
				}
				if err := group.Start(); err != nil {
					t.Fatal(err)
				}
				defer func() { syscall.Kill(-group.Process.Pid, syscall.SIGKILL); group.Wait() }()
				buf := make([]byte, 6)
				if _, err := stdout.Read(buf); err != nil {
					t.Fatal(err)
				}
				pgid := group.Process.Pid
				// The group leader is the test's child, so it stays a zombie
				// until Wait: the kill must not wait for zombies.
				start := time.Now()
				out, err := shellCmd(sh, "-c", killCommand(pgid, 1)).CombinedOutput()
				if err != nil {
					t.Fatalf("kill command: %v: %s", err, out)
				}
				for _, p := range groupMembers(pgid) {
					t.Errorf("process %d of group %d still alive", p, pgid)
				}
				t.Logf("group gone after %v", time.Since(start))
			})
		}
	}
}

// groupMembers lists non-zombie processes of process group pgid.
func groupMembers(pgid int) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(data, ')')
		f := strings.Fields(string(data[i+1:]))
		if len(f) > 2 && f[0] != "Z" && f[2] == fmt.Sprint(pgid) {
			var pid int
			fmt.Sscan(e.Name(), &pid)
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestUploadCommandInLocalShells(t *testing.T) {
	for _, sh := range localShells(t) {
		t.Run(strings.Join(sh, " "), func(t *testing.T) {
			dir := t.TempDir()
			p := dir + "/new dir/it's"
			content := []byte("data\x00\xff\n")
			cmd := shellCmd(sh, "-c", uploadCommand(p, len(content), 0o640))
			cmd.Stdin = bytes.NewReader(content)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			got, err := os.ReadFile(p)
			st, serr := os.Stat(p)
			if err != nil || serr != nil || !bytes.Equal(got, content) || st.Mode().Perm() != 0o640 {
				t.Fatalf("file %q mode %v err %v %v", got, st.Mode(), err, serr)
			}
			// A short stream (connection dropped) must leave the old file alone.
			cmd = shellCmd(sh, "-c", uploadCommand(p, 100, 0o600))
			cmd.Stdin = strings.NewReader("partial")
			if out, err := cmd.CombinedOutput(); err == nil {
				t.Fatalf("truncated upload succeeded: %s", out)
			}
			if got, _ := os.ReadFile(p); !bytes.Equal(got, content) {
				t.Errorf("truncated upload replaced the file: %q", got)
			}
			ents, _ := os.ReadDir(dir + "/new dir")
			if len(ents) != 1 {
				t.Errorf("left behind: %v", ents)
			}
		})
	}
}

func TestValidateUploadPath(t *testing.T) {
	tests := []struct {
		path string
		ok   bool
	}{
		{"/builds/x/script.sh", true},
		{"/a b/c'd", true},
		{"", false},
		{"relative", false},
		{"/", false},
		{"/a/../b", false},
		{"/a/", false},
		{"/a//b", false},
		{"/a\nb", false},
		{"/a\x00b", false},
	}
	for _, tt := range tests {
		if err := validateUploadPath(tt.path); (err == nil) != tt.ok {
			t.Errorf("validateUploadPath(%q) = %v, want ok=%v", tt.path, err, tt.ok)
		}
	}
}

func TestMarkerFilter(t *testing.T) {
	const token = "tok"
	tests := []struct {
		name    string
		stream  string
		pid     int
		out     string
		lost    bool
		flushed string
	}{
		{name: "marker first", stream: "mayfly-pgid:tok:123\nhello\n", pid: 123, out: "hello\n"},
		{name: "noise before", stream: "motd\nmayfly-pgid:tok:45\nerr\n", pid: 45, out: "motd\nerr\n"},
		{name: "other token is output", stream: "mayfly-pgid:other:9\nmayfly-pgid:tok:10\n", pid: 10, out: "mayfly-pgid:other:9\n"},
		{name: "never printed", stream: "sh: setsid: not found\n", out: "sh: setsid: not found\n", flushed: "sh: setsid: not found\n"},
		{name: "malformed pid", stream: "mayfly-pgid:tok:x\nrest\n", out: "mayfly-pgid:tok:x\nrest\n", lost: true},
	}
	for _, tt := range tests {
		// Every split point of the stream into two writes gives the same result.
		splits := []int{0, len(tt.stream) / 2, len(tt.stream)}
		for i := 1; i < len(tt.stream) && i < 40; i++ {
			splits = append(splits, i)
		}
		for _, at := range splits {
			var out bytes.Buffer
			m := newMarkerFilter(&out, token)
			m.Write([]byte(tt.stream[:at]))
			m.Write([]byte(tt.stream[at:]))
			pid, ok := m.PID()
			flushed := m.flush()
			if pid != tt.pid || ok != (tt.pid > 0) || out.String() != tt.out || m.lost() != tt.lost || flushed != tt.flushed {
				t.Errorf("%s split %d: pid %d lost %v flushed %q out %q; want pid %d lost %v flushed %q out %q",
					tt.name, at, pid, m.lost(), flushed, out.String(), tt.pid, tt.lost, tt.flushed, tt.out)
				break
			}
		}
	}
	t.Run("gives up after maxPreMarker bytes of noise", func(t *testing.T) {
		var out bytes.Buffer
		m := newMarkerFilter(&out, token)
		noise := bytes.Repeat([]byte("n"), 1000)
		for range maxPreMarker/len(noise) + 1 {
			m.Write(noise)
		}
		m.Write([]byte("mayfly-pgid:tok:5\nafter\n"))
		if _, ok := m.PID(); ok || !m.lost() || out.Len() != (maxPreMarker/len(noise)+1)*len(noise)+len("mayfly-pgid:tok:5\nafter\n") {
			t.Errorf("pid found %v, lost %v, %d bytes passed", ok, m.lost(), out.Len())
		}
	})
}

func TestTargetValidation(t *testing.T) {
	key := "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFHImv3npIRXtZSLyXBcQtS3sd69sEJQebrWkWkkvyWG"
	pemKey := []byte("-----BEGIN OPENSSH PRIVATE KEY-----\nbad\n-----END OPENSSH PRIVATE KEY-----\n")
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		t    Target
		want string
	}{
		{"no addr", Target{User: "u", PrivateKey: pemKey, HostKey: key}, "Target.Addr"},
		{"addr without port", Target{Addr: "127.0.0.1", User: "u", PrivateKey: pemKey, HostKey: key}, "Target.Addr"},
		{"no user", Target{Addr: "127.0.0.1:22", PrivateKey: pemKey, HostKey: key}, "Target.User"},
		{"no key", Target{Addr: "127.0.0.1:22", User: "u", HostKey: key}, "Target.Signer"},
		{"bad key", Target{Addr: "127.0.0.1:22", User: "u", PrivateKey: pemKey, HostKey: key}, "Target.PrivateKey"},
		{"no host key", Target{Addr: "127.0.0.1:22", User: "u", Signer: signer}, "Target.HostKey"},
		{"bad host key", Target{Addr: "127.0.0.1:22", User: "u", Signer: signer, HostKey: "ssh-ed25519 notbase64"}, "Target.HostKey"},
	}
	if _, _, err := (&Target{Addr: "127.0.0.1:22", User: "u", Signer: signer, HostKey: key}).clientConfig(); err != nil {
		t.Errorf("valid target: %v", err)
	}
	for _, tt := range tests {
		_, _, err := tt.t.clientConfig()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err %v, want it to name %s", tt.name, err, tt.want)
		}
	}
}
