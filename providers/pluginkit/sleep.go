package pluginkit

import (
	"context"
	"time"
)

// Sleep pauses for d, or until ctx is done; then it returns ctx's error. A
// d of zero or less returns nil at once, as time.Sleep does not wait.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
