package main

import "testing"

func TestGreeting(t *testing.T) {
	for in, want := range map[string]string{"": "hello, world", "mayfly": "hello, mayfly"} {
		if got := Greeting(in); got != want {
			t.Errorf("Greeting(%q) = %q, want %q", in, got, want)
		}
	}
}
