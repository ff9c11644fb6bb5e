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

# A signed URL carries the signer's rights: the manager signs GETs
# (objects.get) and PUTs that may overwrite (objects.create and
# objects.delete), on this bucket only. Nothing else: no listing, no
# metadata or IAM changes (roles/storage.objectAdmin would add those). The
# job VMs' service account has no role here (nor anywhere: see iam.tf); a
# VM only ever holds the URLs the manager signed for its own job.
resource "google_project_iam_custom_role" "cache_signer" {
  role_id     = replace("${var.name}_cache_signer", "-", "_")
  title       = "mayfly cache signer"
  description = "What a signed cache URL needs: read, create and overwrite objects."
  permissions = [
    "storage.objects.create",
    "storage.objects.delete",
    "storage.objects.get",
  ]
}

resource "google_storage_bucket_iam_member" "manager_cache" {
  bucket = google_storage_bucket.cache.name
  role   = google_project_iam_custom_role.cache_signer.name
  member = "serviceAccount:${google_service_account.manager.email}"
}

# Signing URLs without a key file goes through the IAM Credentials API's
# signBlob on the manager's own service account, and needs that alone
# (roles/iam.serviceAccountTokenCreator would also mint access and ID
# tokens).
resource "google_project_iam_custom_role" "sign_blob" {
  role_id     = replace("${var.name}_sign_blob", "-", "_")
  title       = "mayfly URL signing"
  description = "Sign blobs as a service account (V4 signed URLs without a key file)."
  permissions = ["iam.serviceAccounts.signBlob"]
}

resource "google_service_account_iam_member" "manager_signs_urls" {
  service_account_id = google_service_account.manager.name
  role               = google_project_iam_custom_role.sign_blob.name
  member             = "serviceAccount:${google_service_account.manager.email}"
}
