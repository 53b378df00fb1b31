"""The project's error type for what a user can fix, and the small checks that raise it.

main.py prints a ConfigError (a setting, an input file, a workdir) as one line and exits; any other
exception is a bug or an environment problem and keeps its traceback.
"""
import jax
import numpy as np


class ConfigError(ValueError):
  """A setting or input the user can fix; the message names the value and what to do."""


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
