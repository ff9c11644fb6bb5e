// Command mayfly-helper runs in a job's environment for the runner's
// stages of the job: artifacts and caches (see package helper). The
// manager uploads it to each VM that needs it; it is built small and
// static, with no cloud SDK, for linux/amd64, linux/arm64 and
// windows/amd64 (make helpers).
package main

import (
	"os"

	"github.com/mayfly-ci/mayfly/manager/helper"
)

func main() {
	os.Exit(helper.Main(os.Args[1:], os.Stdout, os.Stderr, os.Getenv))
}
