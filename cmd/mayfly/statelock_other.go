//go:build !unix

package main

import (
	"os"
	"time"
)

// lockStateDir does nothing where flock(2) is missing: run one manager per
// state directory.
func lockStateDir(string, time.Duration) (func(), error) { return func() {}, nil }

// sigHandOver is a signal this system never sends: hand-over needs SIGUSR2.
var sigHandOver os.Signal = noSignal{}

type noSignal struct{}

func (noSignal) String() string { return "none" }
func (noSignal) Signal()        {}
