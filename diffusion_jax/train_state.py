"""The train state: the step, the params, their exponential moving average and the optimizer state, all trees.

Every leaf is a plain array of the params' structure (or optax's state for it), so the state is what a
checkpoint holds (checkpoints.py) and any optax optimizer can be dropped in.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 (): updates applied so far.
  params: Any  # The model's parameters (float32 trees).
  ema_params: Any  # Their exponential moving average, a tree like params: what sampling uses by default.
  opt_state: Any  # optax's state of the optimizer for the params tree.


def create(params, tx: optax.GradientTransformation) -> TrainState:
  """A step-0 state whose EMA params start as a copy (a separate buffer) of params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(lambda p: p + 0.0, params),
                    opt_state=tx.init(params))


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation, decay: jax.Array) -> TrainState:
  """The next state: one optimizer step for `grads` (a tree like params), then the EMA with `decay` in [0, 1]."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
