output "network" {
  description = "The fleet's VPC (gce plugin setting network)."
  value       = google_compute_network.fleet.self_link
}

output "runner_subnetwork" {
  description = "Subnet for job VMs (gce plugin setting subnetwork)."
  value       = google_compute_subnetwork.runners.self_link
}

output "manager_service_account" {
  description = "Email of the manager's service account."
  value       = google_service_account.manager.email
}

output "runner_vm_service_account" {
  description = "Email of the job VMs' service account (gce plugin setting service_account)."
  value       = google_service_account.runner_vm.email
}

output "cache_bucket" {
  description = "Name of the distributed-cache bucket."
  value       = google_storage_bucket.cache.name
}

output "manager_vm" {
  description = "Name of the manager VM, if created."
  value       = var.create_manager_vm ? google_compute_instance.manager[0].name : null
}

output "gce_plugin_config" {
  description = "The network part of [runners.autoscaler.plugin_config] for the gce plugin."
  value = {
    project         = var.project_id
    network         = google_compute_network.fleet.self_link
    subnetwork      = google_compute_subnetwork.runners.self_link
    service_account = google_service_account.runner_vm.email
    external_ip     = var.runner_external_ip
    use_external_ip = false
  }
}
