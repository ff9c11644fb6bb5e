// Package simplot draws a simulation report's series as a picture:
// instances by state over time above the wait of the oldest queued job.
package simplot

import (
	"errors"
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"github.com/mayfly-ci/mayfly/fleet/sim"
)

// Size of the picture.
const (
	width  = 28 * vg.Centimeter
	height = 18 * vg.Centimeter
)

var (
	colBooting  = color.RGBA{R: 230, G: 159, B: 0, A: 255}
	colIdle     = color.RGBA{R: 86, G: 180, B: 233, A: 255}
	colBusy     = color.RGBA{R: 0, G: 158, B: 115, A: 255}
	colDeleting = color.RGBA{R: 204, G: 121, B: 167, A: 255}
	colWait     = color.RGBA{R: 213, G: 94, B: 0, A: 255}
	colSLO      = color.RGBA{R: 120, G: 120, B: 120, A: 255}
)

// WritePNG draws r's series into a PNG file at path. The report must have
// been made with Options.SeriesStep set.
func WritePNG(path string, r sim.Report) error {
	if len(r.Series) < 2 {
		return errors.New("plot: the report has no series (run the simulation with a series step)")
	}
	t0 := r.Series[0].Time
	hours := func(i int) float64 { return r.Series[i].Time.Sub(t0).Hours() }
	line := func(val func(sim.Sample) float64) plotter.XYs {
		xy := make(plotter.XYs, len(r.Series))
		for i, s := range r.Series {
			xy[i] = plotter.XY{X: hours(i), Y: val(s)}
		}
		return xy
	}

	fleet := plot.New()
	fleet.Title.Text = fmt.Sprintf("%s, policy %s: instances by state", r.Trace, r.Policy)
	fleet.X.Label.Text = "hours"
	fleet.Y.Label.Text = "instances"
	fleet.Legend.Top = true
	for _, l := range []struct {
		name string
		col  color.Color
		val  func(sim.Sample) float64
	}{
		{"booting", colBooting, func(s sim.Sample) float64 { return float64(s.Booting) }},
		{"idle", colIdle, func(s sim.Sample) float64 { return float64(s.Idle) }},
		{"running a job", colBusy, func(s sim.Sample) float64 { return float64(s.Busy) }},
		{"deleting", colDeleting, func(s sim.Sample) float64 { return float64(s.Deleting) }},
	} {
		ln, err := plotter.NewLine(line(l.val))
		if err != nil {
			return fmt.Errorf("plot %s: %w", l.name, err)
		}
		ln.Color = l.col
		fleet.Add(ln)
		fleet.Legend.Add(l.name, ln)
	}

	wait := plot.New()
	wait.Title.Text = fmt.Sprintf("oldest queued job's wait (p90 %.0f s, %.1f %% within the SLO)", r.LatencyP90, r.WithinSLO*100)
	wait.X.Label.Text = "hours"
	wait.Y.Label.Text = "seconds"
	wl, err := plotter.NewLine(line(func(s sim.Sample) float64 { return s.OldestWait }))
	if err != nil {
		return fmt.Errorf("plot wait: %w", err)
	}
	wl.Color = colWait
	wait.Add(wl)
	slo, err := plotter.NewLine(plotter.XYs{{X: 0, Y: 120}, {X: hours(len(r.Series) - 1), Y: 120}})
	if err != nil {
		return fmt.Errorf("plot SLO: %w", err)
	}
	slo.Color = colSLO
	slo.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	wait.Add(slo)
	wait.Legend.Add("oldest wait", wl)
	wait.Legend.Add("120 s", slo)
	wait.Legend.Top = true

	img := vgimg.New(width, height)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 2, Cols: 1, PadX: vg.Millimeter, PadY: 3 * vg.Millimeter, PadTop: 2 * vg.Millimeter, PadBottom: 2 * vg.Millimeter, PadLeft: 2 * vg.Millimeter, PadRight: 4 * vg.Millimeter}
	fleet.Draw(tiles.At(dc, 0, 0))
	wait.Draw(tiles.At(dc, 0, 1))

	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("plot %s: %w", path, err)
	}
	return f.Close()
}
