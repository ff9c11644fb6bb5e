// Command mayfly-plugin-fake serves the in-memory fake provider as a plugin
// process, for tests of the plugin host and the conformance kit. Give it a
// "state_dir" setting to keep its instances across restarts, and a
// "launch" setting to return connect info with Create.
package main

import (
	"fmt"
	"os"

	"github.com/mayfly-ci/mayfly/providers/fake"
	"github.com/mayfly-ci/mayfly/providers/sdk"
)

func main() {
	f, err := fake.New(fake.Options{Logger: sdk.Logger()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "mayfly-plugin-fake:", err)
		os.Exit(1)
	}
	sdk.Serve(fake.Launching{Fake: f})
}
