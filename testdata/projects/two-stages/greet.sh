#!/bin/sh
# Prints the greeting the build job stores as an artifact.
echo "hello, built from $1"
