# Optional: a VM that runs the manager as the manager service account, in
# the managers subnet, without an external address (egress through NAT).
# Install mayfly on it with deploy/systemd/mayfly.service.

resource "google_compute_instance" "manager" {
  count        = var.create_manager_vm ? 1 : 0
  name         = "${var.name}-manager"
  zone         = var.manager_zone
  machine_type = var.manager_machine_type

  boot_disk {
    initialize_params {
      image = "debian-cloud/debian-12"
      size  = 50
    }
  }

  network_interface {
    subnetwork = google_compute_subnetwork.managers.id
  }

  service_account {
    email  = google_service_account.manager.email
    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    enable-oslogin         = "TRUE"
    block-project-ssh-keys = "TRUE"
  }

  labels = {
    app  = "mayfly"
    role = "manager"
  }
}
