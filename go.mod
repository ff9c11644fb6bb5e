module github.com/mayfly-ci/mayfly

go 1.26.8
