// Package main is a small program the sample pipeline tests and builds.
package main

import (
	"fmt"
	"os"
)

// Greeting says hello to name.
func Greeting(name string) string {
	if name == "" {
		name = "world"
	}
	return fmt.Sprintf("hello, %s", name)
}

func main() {
	name := ""
	if len(os.Args) > 1 {
		name = os.Args[1]
	}
	fmt.Println(Greeting(name))
}
