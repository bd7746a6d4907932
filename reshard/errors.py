"""Every error a user can hit. Each class also inherits the stdlib type it resembles, so
callers can catch either. Messages name the file, the tensor and the numbers, and say the fix.
Only the CLI prints them and maps them to exit codes (see EXIT_CODES)."""


class ReshardError(Exception):
    """Root of reshard's errors. `exit_code` is what the CLI exits with."""

    exit_code = 2


class InputError(ReshardError, ValueError):
    """Bad input: a malformed checkpoint, a bad recipe, a flag that makes no sense."""


class CheckpointError(InputError):
    """The source checkpoint is malformed (bad header, missing file, index disagreement)."""


class UnsupportedModelError(InputError):
    """The architecture or a tensor is not one reshard knows how to split."""


class LayoutError(InputError):
    """The requested layout is infeasible for this model (divisibility, memory, stages)."""


class RefusalError(InputError, PermissionError):
    """reshard refuses an unsafe input (pickle) unless the user opts in."""


class OutputError(InputError):
    """The output folder is not a complete reshard output (no manifest, missing files)."""


class OutputBusyError(InputError):
    """Another reshard convert holds the output folder's lock."""


class VerificationError(ReshardError):
    """Verification found a mismatch or corruption."""

    exit_code = 1


class ReshardIOError(ReshardError, OSError):
    """An I/O or environment failure: disk full, permissions, a vanished file."""

    exit_code = 3
