"""A job's life: submission, cron schedules, the merge, the reconciler, retry and cancel."""
