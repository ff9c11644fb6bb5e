package pluginkit

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mayfly-ci/mayfly/providers"
)

// PlacementOptions configure a Placement.
type PlacementOptions struct {
	// Kind names a location in logs and errors, e.g. "zone" or "subnet".
	Kind string
	// Locations are tried in this order. None: one attempt with "" as the
	// location (the cloud's default placement), never cooled down.
	Locations []string
	// Cooldown is how long a location that had no capacity is tried only
	// after the others.
	Cooldown time.Duration
	// Now is the clock of the cooldown (default time.Now).
	Now func() time.Time
	// Logger receives a record per location that had no capacity
	// (default: discard).
	Logger *slog.Logger
}

// Placement spreads creations over locations (zones, subnets): each
// creation tries them in order until one has capacity, and a location
// that answered "no capacity" is tried after the others for a cooldown.
// No location is ever skipped: a cooling one is a last resort, not
// excluded. It is safe for concurrent use.
type Placement struct {
	opts PlacementOptions

	mu        sync.Mutex
	exhausted map[string]time.Time // location → when it last had no capacity
}

// NewPlacement returns a Placement with no location cooling down.
func NewPlacement(opts PlacementOptions) *Placement {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Kind == "" {
		opts.Kind = "location"
	}
	opts.Locations = slices.Clone(opts.Locations)
	return &Placement{opts: opts, exhausted: map[string]time.Time{}}
}

// Order returns the locations to try now: those not cooling down in the
// configured order, then the cooling ones, least recently exhausted first.
func (p *Placement) Order() []string {
	if len(p.opts.Locations) == 0 {
		return []string{""}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.opts.Now()
	var fresh, cooling []string
	for _, l := range p.opts.Locations {
		if t, ok := p.exhausted[l]; ok && now.Sub(t) < p.opts.Cooldown {
			cooling = append(cooling, l)
		} else {
			fresh = append(fresh, l)
		}
	}
	slices.SortStableFunc(cooling, func(a, b string) int { return p.exhausted[a].Compare(p.exhausted[b]) })
	return append(fresh, cooling...)
}

// Exhausted records that location had no capacity just now.
func (p *Placement) Exhausted(location string) {
	if location == "" {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.exhausted[location] = p.opts.Now()
}

// Try calls create with each location of Order, and its attempt number
// from 0, until one call succeeds or fails with other than a
// capacity_exhausted error; that call's error (nil on success) is
// returned. A location whose call fails with capacity_exhausted is marked
// Exhausted and the next is tried. When every location lacked capacity,
// Try returns a capacity_exhausted error of scope (default: the locations
// joined with ",") that wraps each location's error.
//
// With no locations Try makes one call with "" and returns its error as
// it is.
func (p *Placement) Try(scope string, create func(location string, attempt int) error) error {
	order := p.Order()
	if len(p.opts.Locations) == 0 {
		return create("", 0)
	}
	var errs []error
	for i, loc := range order {
		err := create(loc, i)
		if _, capacity := providers.IsCapacityExhausted(err); !capacity {
			return err
		}
		p.Exhausted(loc)
		p.opts.Logger.Warn("no capacity; trying the next "+p.opts.Kind, p.opts.Kind, loc, "error", err)
		errs = append(errs, fmt.Errorf("%s %s: %w", p.opts.Kind, loc, err))
	}
	if scope == "" {
		scope = strings.Join(order, ",")
	}
	return providers.CapacityExhausted(scope, fmt.Errorf("no %s has capacity: %w", p.opts.Kind, errors.Join(errs...)))
}
