// Command mayfly-plugin-aws serves the Amazon EC2 provider
// (plugins/aws/ec2provider) as a mayfly plugin process. It is started by
// mayfly's plugin host, not by hand; its settings are described by
// ec2provider.Settings.
package main

import (
	"github.com/mayfly-ci/mayfly/plugins/aws/ec2provider"
	"github.com/mayfly-ci/mayfly/providers/sdk"
)

func main() {
	sdk.Serve(ec2provider.New(ec2provider.Options{Logger: sdk.Logger()}))
}
