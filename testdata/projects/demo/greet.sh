#!/bin/sh
# Prints the greeting build stores as an artifact.
# TODO: greet in more languages (lint fails on this line, on purpose).
echo "hello, built from $1"
