"""The error of everything that talks to SLURM."""

from __future__ import annotations

from flsl_cli.errors import FlslError


class SlurmError(FlslError):
    """Submitting to SLURM, or requeueing inside a job, did not work."""
