package pluginkit

import (
	"fmt"
	"slices"

	"github.com/mayfly-ci/mayfly/providers"
)

// CheckCreateLabels checks the labels of a Create the way every plugin
// must: they carry the manager label (List finds the group's instances by
// it, and the fleet reconciles by it); when the plugin's settings name a
// manager, the label equals it (else List would not see the instance);
// and no label uses a key the plugin sets itself. Errors are
// invalid_argument.
func CheckCreateLabels(labels map[string]string, manager string, reserved ...string) error {
	got := labels[providers.LabelManager]
	if got == "" {
		return providers.InvalidArgument(fmt.Errorf("create: labels lack %q; every instance must carry its manager", providers.LabelManager))
	}
	if manager != "" && got != manager {
		return providers.InvalidArgument(fmt.Errorf("create: label %s=%q differs from the manager setting %q; List would not see the instance",
			providers.LabelManager, got, manager))
	}
	for k := range labels {
		if slices.Contains(reserved, k) {
			return providers.InvalidArgument(fmt.Errorf("create: label %q is reserved for the plugin", k))
		}
	}
	return nil
}

// Owned reports whether labels mark an instance of manager, or of any
// manager when manager is "": the test List applies to what the cloud
// returns.
func Owned(labels map[string]string, manager string) bool {
	got, ok := labels[providers.LabelManager]
	if manager == "" {
		return ok && got != ""
	}
	return got == manager
}
