# Identities. The manager (and its gce plugin) runs as "manager"; job VMs run
# as "runner_vm", which has no roles at all: it exists so the firewall can
# select job VMs and so VMs do not get the default compute service account
# (which has Editor on the project in many projects).

resource "google_service_account" "manager" {
  account_id   = "${var.name}-manager"
  display_name = "mayfly runner manager"
  description  = "Runs mayfly and its gce plugin: creates, inspects and deletes job VMs."
  depends_on   = [google_project_service.iam]
}

resource "google_service_account" "runner_vm" {
  account_id   = "${var.name}-runner-vm"
  display_name = "mayfly job VM"
  description  = "Attached to every job VM. Deliberately granted no roles."
  depends_on   = [google_project_service.iam]
}

# Exactly the Compute Engine calls the gce plugin makes (plugins/gce):
#   instances.insert            -> create + what an insert carries (boot disk,
#                                  subnet, metadata, labels, tags, service account, image)
#   instances.delete / get      -> delete, get
#   instances.aggregatedList    -> list
#   instances.setMetadata       -> SSH keys, windows-keys (password reset)
#   instances.getSerialPortOutput -> Windows password from serial port 4
#   instances.getGuestAttributes  -> SSH host keys published by the guest agent
#   zoneOperations.get / wait   -> waiting for insert and setMetadata
resource "google_project_iam_custom_role" "manager" {
  role_id     = replace("${var.name}_manager", "-", "_")
  title       = "mayfly manager"
  description = "Least privilege for mayfly's gce plugin: manage the lifecycle of job VMs."
  permissions = concat([
    "compute.disks.create",
    "compute.images.useReadOnly",
    "compute.instances.create",
    "compute.instances.delete",
    "compute.instances.get",
    "compute.instances.getGuestAttributes",
    "compute.instances.getSerialPortOutput",
    "compute.instances.list",
    "compute.instances.setLabels",
    "compute.instances.setMetadata",
    "compute.instances.setServiceAccount",
    "compute.instances.setTags",
    "compute.subnetworks.use",
    "compute.zoneOperations.get",
  ], var.runner_external_ip ? ["compute.subnetworks.useExternalIp"] : [])
}

resource "google_project_iam_member" "manager_compute" {
  project = var.project_id
  role    = google_project_iam_custom_role.manager.name
  member  = "serviceAccount:${google_service_account.manager.email}"
}

# Attaching runner_vm to a VM needs iam.serviceAccounts.actAs on that one
# service account, not on the project.
resource "google_service_account_iam_member" "manager_acts_as_runner_vm" {
  service_account_id = google_service_account.runner_vm.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.manager.email}"
}
