"""Error tree for ats-deploy.

Every error a user can cause derives from :class:`AtsDeployError`; the CLI prints ``error: <message>`` on
one line and exits with the error's ``exit_code`` (1 for user errors, 3 for a failed gate), never with a
traceback. Messages name the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "AtsDeployError",
    "InputError",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "DependencyError",
    "GateFailed",
]


class AtsDeployError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code: int = 1


class InputError(AtsDeployError):
    """A file, folder or array given by the user is missing, unreadable or has the wrong shape or dtype."""


class CheckpointError(AtsDeployError):
    """A checkpoint cannot be read, is not a ViT, or would need untrusted unpickling."""


class ConfigError(AtsDeployError):
    """An option is out of range or inconsistent (K schedule, ATS blocks, heads...)."""


class ExportError(AtsDeployError):
    """An artifact could not be produced or written."""


class DependencyError(AtsDeployError):
    """An optional dependency (TensorRT, TensorRT-RTX, nvcc, matplotlib...) is missing or too old."""


class GateFailed(AtsDeployError):
    """A parity or latency gate failed: the run worked, the numbers did not pass."""

    exit_code = 3
