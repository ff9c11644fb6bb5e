// Package pluginkit is the toolkit of a cloud provider plugin: what every
// plugin for a cloud needs and should not write again.
//
//   - Placement: the locations (zones, subnets) a create tries in order,
//     with a cooldown for a location that answered "no capacity".
//   - FanOut: the calls of one Create or Delete in parallel, bounded, with
//     one partial-failure rule for every plugin.
//   - CheckCreateLabels and Owned: the identity labels (the manager's) every
//     instance carries, checked alike everywhere.
//   - Limiter: token buckets (golang.org/x/time/rate) in front of the cloud
//     API and the one backoff policy after the cloud throttles.
//   - Sleep: a pause that ends with its context.
//   - RenameKeys: settings keys renamed, the old names kept as aliases with
//     a deprecation warning.
//
// # Which layer is the API budget
//
// The plugin's Limiter is the budget. It counts what the cloud meters
// (requests per API action, instances per launch), hears the cloud's
// throttling answers first, and owns the only backoff: every rate_limited
// error a plugin returns carries, as its retry-after, the pause its Limiter
// now enforces. The fleet's per-provider bucket (package fleet, api.go) is
// a pass-through: it holds all of the fleet's calls to that provider for
// exactly the retry-after the plugin returned, so that no gRPC call is made
// only to wait inside the plugin, and it adds no backoff of its own for
// such errors. Its token bucket counts fleet calls (one Create of n
// instances is one call), not cloud requests; it is a fuse against a
// runaway loop, sized above what a plugin's budget lets through.
package pluginkit
