"""The project's error types for what a user can act on, and the small checks that raise them.

main.py prints a ProjectError (a setting, an input file, a workdir, a diverged run) as one line and exits
with status 1; any other exception is a bug or an environment problem and keeps its traceback.
"""
import jax
import numpy as np


class ProjectError(Exception):
  """An error the project raises for a situation the user must act on; its message says what to do."""


class ConfigError(ProjectError, ValueError):
  """A setting or input the user can fix; the message names the value and what to do."""


class WorkdirError(ProjectError, OSError):
  """The workdir cannot be used: another run holds it, or it cannot be written (the message names the path)."""


class CheckpointError(ProjectError):
  """No checkpoint of the workdir can be restored (the message names every step tried and why)."""


class NonFiniteLossError(ProjectError, FloatingPointError):
  """The loss became NaN or Inf (the message names the step and the last good checkpoint)."""


class MissingFileError(ConfigError, FileNotFoundError):
  """A file the run needs (a checkpoint, weights, statistics) does not exist; the message says how to make it."""


def check_choice(kind: str, value: str, allowed) -> None:
  """Raises a ConfigError naming `value` and the allowed choices when it is not one of them."""
  if value not in allowed:
    raise ConfigError(f'Unknown {kind} {value!r}; choose one of {sorted(allowed)}.')


def check_positive_int(name: str, value) -> None:
  """Raises a ConfigError naming the setting when `value` is not a positive integer (bools are not)."""
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f'{name} must be a positive integer, got {value!r}.')


def check_concrete_range(name: str, values, low, high, high_inclusive: bool) -> None:
  """Raises a ConfigError when concrete (not traced) `values` fall outside [low, high] (or [low, high))."""
  if isinstance(values, jax.core.Tracer):
    return
  values = np.asarray(values)
  outside = (values < low) | ((values > high) if high_inclusive else (values >= high))
  if np.any(outside):
    bracket = ']' if high_inclusive else ')'
    raise ConfigError(f'{name} must lie in [{low}, {high}{bracket}, got {values[outside].tolist()[:8]}.')
