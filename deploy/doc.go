// Package deploy holds mayfly's deployment files: Prometheus rules and their
// unit tests, a Grafana dashboard, a systemd unit, a container image, Kubernetes
// manifests and Terraform for the hosted GCP topology. It has no code; its
// tests check those files (see README.md).
package deploy
