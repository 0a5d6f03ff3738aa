"""Named targets, their build pipeline, schedules and export (cross-compilation)."""
