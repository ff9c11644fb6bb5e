// Command mayfly-plugin-qemu is mayfly's provider plugin for local qemu
// microVMs (see package qemu for its settings). It is started by mayfly's
// plugin host, not by hand.
package main

import (
	"github.com/mayfly-ci/mayfly/plugins/qemu"
	"github.com/mayfly-ci/mayfly/providers/sdk"
)

func main() {
	sdk.Serve(qemu.New(sdk.Logger()))
}
