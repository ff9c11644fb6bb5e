# The hosted runners' network promise for job VMs:
#   - VMs may reach out (the internet), nothing else may reach in;
#   - no VM-to-VM traffic;
#   - only the runner manager may reach a VM, on SSH (22) and WinRM/HTTPS (5986).
#
# Rules select VMs and managers by service account, not network tag: anyone
# who may edit an instance can add a tag, while attaching a service account
# needs iam.serviceAccounts.actAs on it. (GCP does not allow source service
# accounts together with target tags, so targets are service accounts too.)
# Source service accounts match only VMs in this VPC: the manager must run
# here (the managers subnet).
#
# Lower priority numbers win. Firewalls are stateful: replies to the manager's
# connections pass the egress denies.

# Only the manager's service account reaches job VMs, on 22 and 5986.
resource "google_compute_firewall" "runner_allow_manager" {
  name      = "${var.name}-runner-allow-manager"
  network   = google_compute_network.fleet.id
  direction = "INGRESS"
  priority  = 1000

  source_service_accounts = [google_service_account.manager.email]
  target_service_accounts = [google_service_account.runner_vm.email]

  allow {
    protocol = "tcp"
    ports    = ["22", "5986"]
  }

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}

# No job VM reaches another, whatever other rules someone adds later.
resource "google_compute_firewall" "runner_deny_vm_to_vm" {
  name      = "${var.name}-runner-deny-vm-to-vm"
  network   = google_compute_network.fleet.id
  direction = "INGRESS"
  priority  = 900

  source_service_accounts = [google_service_account.runner_vm.email]
  target_service_accounts = [google_service_account.runner_vm.email]

  deny {
    protocol = "all"
  }
}

# Nothing else reaches a job VM: the internet, other subnets, peered networks.
# Spelt out (GCP's implied rule does the same at the lowest priority) so that
# a broad allow added to the network later still cannot open job VMs.
resource "google_compute_firewall" "runner_deny_ingress" {
  name      = "${var.name}-runner-deny-ingress"
  network   = google_compute_network.fleet.id
  direction = "INGRESS"
  priority  = 65000

  source_ranges           = ["0.0.0.0/0"]
  target_service_accounts = [google_service_account.runner_vm.email]

  deny {
    protocol = "all"
  }
}

# Job VMs may not open connections to private address space: not to each
# other, not to the managers, not to peered networks.
resource "google_compute_firewall" "runner_deny_egress_private" {
  name      = "${var.name}-runner-deny-egress-private"
  network   = google_compute_network.fleet.id
  direction = "EGRESS"
  priority  = 900

  destination_ranges      = var.runner_egress_deny_ranges
  target_service_accounts = [google_service_account.runner_vm.email]

  deny {
    protocol = "all"
  }
}

# Job VMs reach out to the internet.
resource "google_compute_firewall" "runner_allow_egress" {
  name      = "${var.name}-runner-allow-egress"
  network   = google_compute_network.fleet.id
  direction = "EGRESS"
  priority  = 1000

  destination_ranges      = ["0.0.0.0/0"]
  target_service_accounts = [google_service_account.runner_vm.email]

  allow {
    protocol = "all"
  }
}

# Operators reach the manager VM over SSH (IAP by default).
resource "google_compute_firewall" "manager_allow_ssh" {
  name      = "${var.name}-manager-allow-ssh"
  network   = google_compute_network.fleet.id
  direction = "INGRESS"
  priority  = 1000

  source_ranges           = var.manager_ssh_source_ranges
  target_service_accounts = [google_service_account.manager.email]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}

# Prometheus scrapes the manager's metrics (listen_address, port 9252).
resource "google_compute_firewall" "manager_allow_metrics" {
  count     = length(var.metrics_source_ranges) > 0 ? 1 : 0
  name      = "${var.name}-manager-allow-metrics"
  network   = google_compute_network.fleet.id
  direction = "INGRESS"
  priority  = 1000

  source_ranges           = var.metrics_source_ranges
  target_service_accounts = [google_service_account.manager.email]

  allow {
    protocol = "tcp"
    ports    = ["9252"]
  }
}
