"""The schema as SQLAlchemy Core metadata.

Migrations own the database; this module is the reference they are checked against
(tests/test_migrations.py fails on any drift between the two).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from smifdb.states import (
    JOB_KINDS,
    JOB_STATUSES,
    MODEL_RUN_KINDS,
    RUNNER_STATES,
    WORKFLOW_STATUSES,
)

metadata = MetaData()

job_status = Enum(*JOB_STATUSES, name="job_status", metadata=metadata)
workflow_status = Enum(*WORKFLOW_STATUSES, name="workflow_status", metadata=metadata)
job_kind = Enum(*JOB_KINDS, name="job_kind", metadata=metadata)
runner_state = Enum(*RUNNER_STATES, name="runner_state", metadata=metadata)
model_run_kind = Enum(*MODEL_RUN_KINDS, name="model_run_kind", metadata=metadata)

TS = DateTime(timezone=True)

model_runs = Table(
    "model_runs",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", model_run_kind, nullable=False),
    Column("project_dir", Text, nullable=False),
    Column("decide", Text),  # module:function for kind 'python'
    Column("options", JSONB, nullable=False, server_default="{}"),
    Column("status", workflow_status, nullable=False, server_default="running"),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("bundles", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("submitted_at", TS, nullable=False, server_default=func.now()),
    Column("finished_at", TS),
    Column("submitted_by", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),  # 0010
    CheckConstraint(
        "(kind = 'python') = (decide IS NOT NULL)", name="model_runs_decide_iff_python"
    ),
    CheckConstraint(
        "(finished_at IS NULL) = (status IN ('pending', 'running'))",
        name="model_runs_finished_iff_ended",
    ),
)
Index(
    "model_runs_submitted_by_idx",
    model_runs.c.submitted_by,
    postgresql_where=text("submitted_by IS NOT NULL"),
)
# Two live runs of one model run in one project would write the same results folder.
Index(
    "model_runs_live_name_idx",
    model_runs.c.project_dir,
    model_runs.c.name,
    unique=True,
    postgresql_where=text("finished_at IS NULL"),
)

workflows = Table(
    "workflows",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False),
    Column("status", workflow_status, nullable=False, server_default="pending"),
    Column("model_run", Text),
    Column("bundle", Integer),
    Column("job_count", Integer, nullable=False),
    Column("submitted_at", TS, nullable=False, server_default=func.now()),
    Column("started_at", TS),
    Column("finished_at", TS),
    Column("model_run_id", BigInteger, ForeignKey("model_runs.id")),
    Column("submitted_by", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),  # 0010
    # A bundle's: what its decider resumes from to decide the next bundle (0014).
    Column("decider_state", JSONB),
    CheckConstraint("job_count > 0", name="workflows_job_count_positive"),
    # A bundle is submitted once, whatever managers race: enforced here, not by timing.
    UniqueConstraint("model_run_id", "bundle", name="workflows_model_run_bundle_key"),
)
Index("workflows_status_idx", workflows.c.status)
Index(
    "workflows_submitted_by_idx",
    workflows.c.submitted_by,
    postgresql_where=text("submitted_by IS NOT NULL"),
)
# Is anything left to do anywhere? (`runner run --exit-when-idle`, `wait`)
Index(
    "workflows_unfinished_idx",
    workflows.c.id,
    postgresql_where=text("finished_at IS NULL"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "workflow_id",
        BigInteger,
        ForeignKey("workflows.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("key", Text, nullable=False),
    Column("kind", job_kind, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("model", Text),
    Column("operation", Text),
    Column("timestep", Integer),
    Column("decision", Integer),
    Column("status", job_status, nullable=False),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("unfinished_parents", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="1"),
    Column("not_before", TS),
    Column("timeout_seconds", Double),
    Column("retry_backoff_seconds", Double, nullable=False, server_default="1"),
    Column("cancel_requested_at", TS),
    Column("lease_owner", Text),
    Column("created_at", TS, nullable=False, server_default=func.now()),
    Column("started_at", TS),
    Column("finished_at", TS),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("result", JSONB),
    Column("log_tail", Text),
    UniqueConstraint("workflow_id", "key", name="jobs_workflow_key_key"),
    CheckConstraint("unfinished_parents >= 0", name="jobs_unfinished_parents_nonnegative"),
    CheckConstraint("max_attempts >= 1", name="jobs_max_attempts_positive"),
    CheckConstraint("attempts >= 0", name="jobs_attempts_nonnegative"),
    CheckConstraint("timeout_seconds IS NULL OR timeout_seconds > 0", name="jobs_timeout_positive"),
)
# Per-workflow reads use jobs_workflow_key_key (workflow_id leads it). No index names a column
# that a claim or a completion changes (status, lease, not_before), so those updates are HOT:
# the queue's orders live in ready_jobs, its leases in claims (migration 0009).

# One row per ready job, in claim order (priority desc, then age): inserted when a job becomes
# ready, deleted by the claim that takes it. Narrow, and never updated.
ready_jobs = Table(
    "ready_jobs",
    metadata,
    Column("job_id", BigInteger, nullable=False),
    Column("workflow_id", BigInteger, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("not_before", TS),
)
Index("ready_jobs_claim_idx", ready_jobs.c.priority.desc(), ready_jobs.c.job_id)
# Claims scoped to one workflow (smifdb run) or a model run's bundles: an ordered range scan.
Index(
    "ready_jobs_workflow_idx",
    ready_jobs.c.workflow_id,
    ready_jobs.c.priority.desc(),
    ready_jobs.c.job_id,
)
# When is the next retry due? (runners sleep until then)
Index(
    "ready_jobs_retry_idx",
    ready_jobs.c.not_before,
    postgresql_where=text("not_before IS NOT NULL"),
)

# One row per claim batch and workflow: the lease on its jobs. Open until every job of it is
# recorded; rescue reads only open claims, renewal extends a claim, not each job.
claims = Table(
    "claims",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("workflow_id", BigInteger, nullable=False),
    Column("owner", Text, nullable=False),
    Column("claimed_at", TS, nullable=False),  # the jobs' started_at: part of the fence
    Column("expires_at", TS, nullable=False),
    Column("closed_at", TS),
    Column("job_ids", ARRAY(BigInteger), nullable=False),
)
Index("claims_open_idx", claims.c.owner, postgresql_where=text("closed_at IS NULL"))
Index("claims_workflow_idx", claims.c.workflow_id)

# Finished jobs per workflow, one row per recording session (shard: its backend pid), so that
# runners recording into one workflow never wait for each other's row. Progress is the sum.
workflow_counts = Table(
    "workflow_counts",
    metadata,
    Column("workflow_id", BigInteger, nullable=False),
    Column("shard", Integer, nullable=False),
    Column("finished", Integer, nullable=False),
    PrimaryKeyConstraint("workflow_id", "shard", name="workflow_counts_pkey"),
)

job_edges = Table(
    "job_edges",
    metadata,
    # No foreign keys (0013): submit_dag writes edges only between the jobs it inserts, prune
    # deletes them before their jobs; checking two million edges row by row was most of a
    # million-job submit.
    Column("parent_id", BigInteger, nullable=False),
    Column("child_id", BigInteger, nullable=False),
    PrimaryKeyConstraint("parent_id", "child_id", name="job_edges_pkey"),
    CheckConstraint("parent_id <> child_id", name="job_edges_no_self_loop"),
)
Index("job_edges_child_idx", job_edges.c.child_id)

runners = Table(
    "runners",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("host", Text),
    Column("pid", Integer),
    Column("slots", Integer, nullable=False),
    Column("state", runner_state, nullable=False, server_default="registered"),
    Column("registered_at", TS, nullable=False, server_default=func.now()),
    Column("last_heartbeat_at", TS),
    Column("jobs_succeeded", BigInteger, nullable=False, server_default="0"),
    Column("jobs_failed", BigInteger, nullable=False, server_default="0"),
    Column("jobs_claimed", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("slots >= 1", name="runners_slots_positive"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("at", TS, nullable=False, server_default=func.clock_timestamp()),
    Column("workflow_id", BigInteger),
    Column("job_id", BigInteger),
    Column("from_status", Text),
    Column("to_status", Text, nullable=False),
    Column("attempt", Integer),
    Column("actor", Text, nullable=False),
    Column("reason", Text),
    Column("model_run_id", BigInteger),
    # On the event that ends an attempt: when and by whom the attempt was claimed (a claim is
    # recorded with its end, not as an event of its own; see smifdb_job_history).
    Column("claimed_at", TS),
    Column("claimed_by", Text),
)
# One index serves a workflow's history and a job's history (WHERE workflow_id = … AND job_id = …).
Index("events_workflow_job_idx", events.c.workflow_id, events.c.job_id, events.c.id)
Index(
    "events_model_run_idx",
    events.c.model_run_id,
    events.c.id,
    postgresql_where=text("model_run_id IS NOT NULL"),
)

# -- the HTTP API's users, and the DAFNI shim (migration 0003) ------------------------------

UUID_ = UUID(as_uuid=True)
NEW_UUID = text("gen_random_uuid()")

api_users = Table(
    "api_users",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),  # scrypt, see smifdb.store.auth
    Column("created_at", TS, nullable=False, server_default=func.now()),
    Column("role", Text, nullable=False, server_default="operator"),  # migration 0010
    CheckConstraint(
        "role IN ('viewer', 'operator', 'admin', 'runner')", name="api_users_role_check"
    ),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("token_hash", LargeBinary, primary_key=True),  # SHA-256 of the bearer token
    Column("user_id", BigInteger, ForeignKey("api_users.id", ondelete="CASCADE"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("issued_at", TS, nullable=False, server_default=func.now()),
    Column("expires_at", TS),  # NULL: an api token that never expires
    Column("id", BigInteger, Identity(always=False), nullable=False),
    Column("name", Text),  # a label, for api tokens
    Column("session_id", UUID(as_uuid=True)),  # one login's access, refresh and cookie tokens
    Column("spent_at", TS),  # a used refresh token, kept until it expires to notice reuse
    CheckConstraint(
        "kind IN ('access', 'refresh', 'session', 'api')", name="api_tokens_kind_check"
    ),
    UniqueConstraint("id", name="api_tokens_id_key"),
)
Index("api_tokens_user_idx", api_tokens.c.user_id)
Index(
    "api_tokens_session_idx",
    api_tokens.c.session_id,
    postgresql_where=text("session_id IS NOT NULL"),
)

# Failed sign-ins per user name and per client address: every API process throttles alike.
api_login_failures = Table(
    "api_login_failures",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure_at", TS, nullable=False),
    Column("blocked_until", TS),
    CheckConstraint("scope IN ('user', 'address')", name="api_login_failures_scope_check"),
)

dafni_models = Table(
    "dafni_models",
    metadata,
    Column("version_id", UUID_, primary_key=True, server_default=NEW_UUID),
    Column("model_id", UUID_, nullable=False),  # DAFNI's "parent": versions of one model share it
    Column("definition", JSONB, nullable=False),  # metadata and spec, incl. command or smif
    Column("version_message", Text, nullable=False, server_default=""),
    Column("owner", Text, nullable=False),  # the name, for display
    Column("owner_id", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),  # 0010
    Column("created_at", TS, nullable=False, server_default=func.now()),
)
Index("dafni_models_model_idx", dafni_models.c.model_id, dafni_models.c.created_at)

# dafni-cli uploads a model in steps (definition, image, ingest): the half-done upload lives here.
dafni_model_uploads = Table(
    "dafni_model_uploads",
    metadata,
    Column("id", UUID_, primary_key=True, server_default=NEW_UUID),
    Column("owner", Text, nullable=False),  # the name, for display
    Column("owner_id", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),  # 0010
    Column("definition", JSONB),
    Column("image_bytes", BigInteger),
    Column("created_at", TS, nullable=False, server_default=func.now()),
)

dafni_workflows = Table(
    "dafni_workflows",
    metadata,
    Column("version_id", UUID_, primary_key=True, server_default=NEW_UUID),
    Column("workflow_id", UUID_, nullable=False),  # DAFNI's "parent"
    Column("definition", JSONB, nullable=False),
    Column("version_message", Text, nullable=False, server_default=""),
    Column("owner", Text, nullable=False),  # the name, for display
    Column("owner_id", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),  # 0010
    Column("created_at", TS, nullable=False, server_default=func.now()),
)
Index("dafni_workflows_workflow_idx", dafni_workflows.c.workflow_id, dafni_workflows.c.created_at)

dafni_parameter_sets = Table(
    "dafni_parameter_sets",
    metadata,
    Column("id", UUID_, primary_key=True, server_default=NEW_UUID),
    Column(
        "workflow_version_id",
        UUID_,
        ForeignKey("dafni_workflows.version_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("definition", JSONB, nullable=False),
    Column("owner", Text, nullable=False),  # the name, for display
    Column("owner_id", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),  # 0010
    Column("created_at", TS, nullable=False, server_default=func.now()),
)
Index("dafni_parameter_sets_workflow_idx", dafni_parameter_sets.c.workflow_version_id)

dafni_instances = Table(
    "dafni_instances",
    metadata,
    Column("id", UUID_, primary_key=True, server_default=NEW_UUID),
    Column(
        "workflow_version_id",
        UUID_,
        ForeignKey("dafni_workflows.version_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "parameter_set_id",
        UUID_,
        ForeignKey("dafni_parameter_sets.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "workflow_id",
        BigInteger,
        ForeignKey("workflows.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("owner", Text, nullable=False),  # the name, for display
    Column("owner_id", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),  # 0010
    Column("idempotency_key", Text),
    Column("submitted_at", TS, nullable=False, server_default=func.now()),
    # A retried execute request with the same key gets the same instance, not a second one.
    UniqueConstraint("owner_id", "idempotency_key", name="dafni_instances_idempotency_key"),
)
Index("dafni_instances_workflow_version_idx", dafni_instances.c.workflow_version_id)
Index("dafni_instances_parameter_set_idx", dafni_instances.c.parameter_set_id)

# The blob store (migration 0011): content stored once by SHA-256, in ≤ 1 MiB chunks, visible
# only once complete (one transaction writes a blob's row and its chunks). last_used_at: every
# upload and dedup hit bumps it, so prune's grace covers a blob until its record names it.
blobs = Table(
    "blobs",
    metadata,
    Column("sha256", LargeBinary, primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("created_at", TS, nullable=False, server_default=func.now()),
    Column("last_used_at", TS, nullable=False, server_default=func.now()),
    CheckConstraint("length(sha256) = 32", name="blobs_sha256_length"),
    CheckConstraint("size >= 0", name="blobs_size_check"),
    CheckConstraint("chunks >= 0", name="blobs_chunks_check"),
)

# data is STORAGE EXTERNAL: out of line, never through pglz (most data is compressed already).
blob_chunks = Table(
    "blob_chunks",
    metadata,
    Column(
        "sha256",
        LargeBinary,
        ForeignKey("blobs.sha256", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("seq", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("sha256", "seq", name="blob_chunks_pkey"),
)

# Relative POSIX paths: not empty, not absolute, no '..' component.
_PATH_CHECK = "path <> '' AND left(path, 1) <> '/' AND NOT ('..' = ANY(string_to_array(path, '/')))"


def _files(name: str, owner_column: str, owner: str, *extra: Column) -> Table:
    """Paths naming blobs, owned by a record (cascade) and holding their blob (no cascade)."""
    table = Table(
        name,
        metadata,
        Column(
            owner_column,
            BigInteger,
            ForeignKey(f"{owner}.id", ondelete="CASCADE"),
            nullable=False,
        ),
        *extra,
        Column("path", Text, nullable=False),
        Column("sha256", LargeBinary, ForeignKey("blobs.sha256"), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("mode", Integer, nullable=False, server_default="420"),  # 0o644 or 0o755
        PrimaryKeyConstraint(owner_column, "path", name=f"{name}_pkey"),
        CheckConstraint(_PATH_CHECK, name=f"{name}_path_relative"),
        CheckConstraint("mode IN (420, 493)", name=f"{name}_mode_check"),
    )
    Index(f"{name}_sha256_idx", table.c.sha256)  # prune's anti-join
    return table


# Files present in every job's folder of a workflow (the spec's `files:`).
workflow_files = _files("workflow_files", "workflow_id", "workflows")
# The recorded attempt's outputs.
job_outputs = _files("job_outputs", "job_id", "jobs", Column("attempt", Integer, nullable=False))
# A smif project snapshot and the decision-state files a manager writes.
model_run_files = _files("model_run_files", "model_run_id", "model_runs")


# The DAFNI data catalogue (migration 0012): datasets, their versions, each version's metadata
# versions and files, and dafni-cli's temporary upload buckets.
def _owned() -> list[Column]:
    return [
        Column("owner", Text, nullable=False),  # the name, for display
        Column("owner_id", BigInteger, ForeignKey("api_users.id", ondelete="SET NULL")),
        Column("created_at", TS, nullable=False, server_default=func.now()),
    ]


def _dataset_files(name: str, owner_column: str, owner: str) -> Table:
    table = Table(
        name,
        metadata,
        Column(owner_column, UUID_, ForeignKey(owner, ondelete="CASCADE"), nullable=False),
        Column("path", Text, nullable=False),
        Column("sha256", LargeBinary, ForeignKey("blobs.sha256"), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("media_type", Text, nullable=False, server_default="application/octet-stream"),
        PrimaryKeyConstraint(owner_column, "path", name=f"{name}_pkey"),
        CheckConstraint(_PATH_CHECK, name=f"{name}_path_relative"),
    )
    Index(f"{name}_sha256_idx", table.c.sha256)  # prune's anti-join
    return table


dafni_datasets = Table(
    "dafni_datasets",
    metadata,
    Column("dataset_id", UUID_, primary_key=True, server_default=NEW_UUID),
    *_owned(),
)
dafni_dataset_versions = Table(
    "dafni_dataset_versions",
    metadata,
    Column("version_id", UUID_, primary_key=True, server_default=NEW_UUID),
    Column(
        "dataset_id",
        UUID_,
        ForeignKey("dafni_datasets.dataset_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("reference_url", Text),  # a reference version points at a URL and holds no files
    *_owned(),
)
Index(
    "dafni_dataset_versions_dataset_idx",
    dafni_dataset_versions.c.dataset_id,
    dafni_dataset_versions.c.created_at,
)
dafni_dataset_metadata = Table(
    "dafni_dataset_metadata",
    metadata,
    Column("metadata_id", UUID_, primary_key=True, server_default=NEW_UUID),
    Column(
        "version_id",
        UUID_,
        ForeignKey("dafni_dataset_versions.version_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("metadata", JSONB, nullable=False),
    *_owned(),
)
Index(
    "dafni_dataset_metadata_version_idx",
    dafni_dataset_metadata.c.version_id,
    dafni_dataset_metadata.c.created_at,
)
dafni_dataset_files = _dataset_files(
    "dafni_dataset_files", "version_id", "dafni_dataset_versions.version_id"
)
dafni_dataset_uploads = Table(
    "dafni_dataset_uploads",
    metadata,
    Column("bucket_id", UUID_, primary_key=True, server_default=NEW_UUID),
    *_owned(),
)
dafni_dataset_upload_files = _dataset_files(
    "dafni_dataset_upload_files", "bucket_id", "dafni_dataset_uploads.bucket_id"
)
