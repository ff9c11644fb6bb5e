package host

import (
	"os/exec"
	"syscall"
)

// tieToParent asks the kernel to send the plugin SIGTERM when the manager
// dies, also by SIGKILL, so that no plugin outlives it. The kernel ties
// this to the thread that started the process; the plugin also watches its
// parent itself (sdk.Serve), which covers a thread that exits.
func tieToParent(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGTERM
}
