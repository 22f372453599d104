"""Job and workflow statuses: the schema's enums, importable without SQLAlchemy."""

JOB_STATUSES = (
    "waiting",
    "ready",
    "running",
    "succeeded",
    "failed",
    "upstream_failed",
    "cancelled",
)
WORKFLOW_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
JOB_KINDS = ("command", "python", "smif")
RUNNER_STATES = ("registered", "active", "draining", "stopped", "lost")
MODEL_RUN_KINDS = ("smif", "python")
