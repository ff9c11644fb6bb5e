# The distributed-cache bucket. Objects expire 14 days after creation.
#
# The 5 GB cap per cache object is NOT something GCS enforces (its own limit
# is 5 TiB per object): the runner side enforces it, by refusing larger
# archives and by signing upload URLs with an x-goog-content-length-range
# header, which GCS then checks on upload.

locals {
  cache_bucket_name = var.cache_bucket_name != "" ? var.cache_bucket_name : "${var.project_id}-${var.name}-cache"
}

resource "google_storage_bucket" "cache" {
  name                        = local.cache_bucket_name
  location                    = upper(var.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true

  # A cache needs no recovery window; soft-deleted objects would be billed.
  soft_delete_policy {
    retention_duration_seconds = 0
  }

  lifecycle_rule {
    condition {
      age = var.cache_expiry_days
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.storage]
}

# The manager reads and writes cache objects and signs URLs for jobs.
resource "google_storage_bucket_iam_member" "manager_cache" {
  bucket = google_storage_bucket.cache.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.manager.email}"
}

# Signing URLs without a key file goes through iam.serviceAccounts.signBlob
# on the manager's own service account.
resource "google_service_account_iam_member" "manager_signs_urls" {
  service_account_id = google_service_account.manager.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:${google_service_account.manager.email}"
}
