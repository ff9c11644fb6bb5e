//go:build !linux

package host

import "os/exec"

// tieToParent does nothing where the kernel has no parent-death signal;
// the plugin watches its parent itself (sdk.Serve).
func tieToParent(*exec.Cmd) {}
