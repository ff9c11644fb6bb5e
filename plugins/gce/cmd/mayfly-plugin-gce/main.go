// Command mayfly-plugin-gce serves the Google Compute Engine provider as a
// mayfly plugin process. It is started by mayfly's plugin host, not by
// hand; see package gce for its settings.
package main

import (
	"github.com/mayfly-ci/mayfly/plugins/gce"
	"github.com/mayfly-ci/mayfly/providers/sdk"
)

func main() {
	sdk.Serve(gce.New(gce.Options{Logger: sdk.Logger()}))
}
