variable "project_id" {
  description = "GCP project that holds the fleet."
  type        = string
}

variable "region" {
  description = "Region of the subnets, the NAT and the cache bucket (the hosted Linux fleet runs in us-east1)."
  type        = string
  default     = "us-east1"
}

variable "name" {
  description = "Prefix of every resource name; also the network tag prefix."
  type        = string
  default     = "mayfly"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,19}$", var.name))
    error_message = "name must be 1-20 characters: lower-case letters, digits and dashes, starting with a letter."
  }
}

variable "runner_subnet_cidr" {
  description = "Primary range of the job VMs' subnet. A /16 holds the nightly spike of 700 idle VMs many times over."
  type        = string
  default     = "10.128.0.0/16"
}

variable "manager_subnet_cidr" {
  description = "Primary range of the managers' subnet."
  type        = string
  default     = "10.129.0.0/24"
}

variable "runner_egress_deny_ranges" {
  description = "Destinations job VMs may not reach: private and shared address space, so a job cannot reach the managers, other VMs or peered networks. Internet egress stays open."
  type        = list(string)
  default     = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]
}

variable "enable_nat" {
  description = "Create a Cloud Router and Cloud NAT so job VMs without an external address (gce plugin external_ip = false) reach the internet."
  type        = bool
  default     = true
}

variable "create_manager_vm" {
  description = "Create a VM that runs the manager with its service account. Set false when the manager runs elsewhere in this VPC."
  type        = bool
  default     = true
}

variable "manager_zone" {
  description = "Zone of the manager VM."
  type        = string
  default     = "us-east1-c"
}

variable "manager_machine_type" {
  description = "Machine type of the manager VM."
  type        = string
  default     = "e2-standard-4"
}

variable "manager_ssh_source_ranges" {
  description = "Who may SSH to the manager VM. Default: Identity-Aware Proxy TCP forwarding only."
  type        = list(string)
  default     = ["35.235.240.0/20"]
}

variable "metrics_source_ranges" {
  description = "Ranges of the Prometheus servers that scrape the manager's listen_address (port 9252). Empty: no rule."
  type        = list(string)
  default     = []
}

variable "cache_bucket_name" {
  description = "Name of the distributed-cache bucket (globally unique). Default: <project_id>-<name>-cache."
  type        = string
  default     = ""
}

variable "cache_expiry_days" {
  description = "Cache objects are deleted this many days after creation (hosted runners: 14)."
  type        = number
  default     = 14

  validation {
    condition     = var.cache_expiry_days >= 1
    error_message = "cache_expiry_days must be at least 1."
  }
}

variable "vm_service_account_scopes" {
  description = "OAuth scopes job VMs get with their (role-less) service account."
  type        = list(string)
  default     = ["https://www.googleapis.com/auth/cloud-platform"]
}

variable "runner_external_ip" {
  description = "Job VMs get an ephemeral external address (gce plugin external_ip = true). Adds compute.subnetworks.useExternalIp to the manager's role. Ingress stays closed either way."
  type        = bool
  default     = false
}
