// Command mayfly-plugin-aws serves the Amazon EC2 provider
// (package plugins/aws) as a mayfly plugin process. It is started by
// mayfly's plugin host, not by hand; its settings are described by
// aws.Settings.
package main

import (
	"github.com/mayfly-ci/mayfly/plugins/aws"
	"github.com/mayfly-ci/mayfly/providers/sdk"
)

func main() {
	sdk.Serve(aws.New(aws.Options{Logger: sdk.Logger()}))
}
