# One VPC with two subnets: job VMs and managers. No auto subnets, so the only
# firewall rules are the ones in firewall.tf plus GCP's implied ones (deny all
# ingress, allow all egress).

resource "google_compute_network" "fleet" {
  name                    = "${var.name}-fleet"
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"
  depends_on              = [google_project_service.compute]
}

resource "google_compute_subnetwork" "runners" {
  name                     = "${var.name}-runners"
  network                  = google_compute_network.fleet.id
  region                   = var.region
  ip_cidr_range            = var.runner_subnet_cidr
  private_ip_google_access = true
}

resource "google_compute_subnetwork" "managers" {
  name                     = "${var.name}-managers"
  network                  = google_compute_network.fleet.id
  region                   = var.region
  ip_cidr_range            = var.manager_subnet_cidr
  private_ip_google_access = true
}

resource "google_compute_router" "fleet" {
  count   = var.enable_nat ? 1 : 0
  name    = "${var.name}-router"
  network = google_compute_network.fleet.id
  region  = var.region
}

resource "google_compute_router_nat" "fleet" {
  count                              = var.enable_nat ? 1 : 0
  name                               = "${var.name}-nat"
  router                             = google_compute_router.fleet[0].name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"
  # A busy job opens many connections; the default 64 ports per VM is tight.
  min_ports_per_vm = 256

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}
