"""One training run: Adam on softmax cross-entropy, jit-compiled, with a
progress bar and a test-accuracy curve. Every model gets the same batches
in the same order (they come from ``seed``), the same steps and schedule."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmconv_jax.demo.data import RelationData


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 64
  learning_rate: float = 3e-3
  eval_every: int = 100
  eval_batch: int = 500


@dataclasses.dataclass
class TrainResult:
  params: dict
  curve_steps: list  # steps at which the test set was evaluated
  curve_accuracy: list  # test accuracy there
  loss_steps: list
  loss: list  # training loss (mean over each eval interval)
  predictions: np.ndarray  # final test predictions
  train_seconds: float  # the training loop, compilation included
  compile_seconds: float  # the first step (tracing + XLA compilation)
  step_ms: float  # median steady-state step time


def _predict_fn(model):
  @jax.jit
  def predict(params, x):
    return jnp.argmax(model.apply({"params": params}, x), axis=-1)

  return predict


def predict(
  model, params, images: np.ndarray, batch: int = 500, fn=None
) -> np.ndarray:
  fn = fn or _predict_fn(model)
  out = [
    np.asarray(fn(params, images[i : i + batch]))
    for i in range(0, len(images), batch)
  ]
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def train(
  model,
  train_data: RelationData,
  test_data: RelationData,
  config: TrainConfig,
  seed: int = 0,
  progress: bool = True,
  desc: Optional[str] = None,
) -> TrainResult:
  """Trains ``model`` from ``seed`` and returns its parameters and history."""
  from tqdm.auto import tqdm  # imported here: only the demo needs it

  init_key = jax.random.key(seed)
  params = model.init(init_key, jnp.asarray(train_data.images[:1]))["params"]
  schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict_fn = _predict_fn(model)
  rng = np.random.default_rng(seed)  # the same batches for every model
  n = len(train_data)
  order = rng.permutation(n)
  pos = 0
  curve_steps, curve_acc, loss_steps, losses, pending = [], [], [], [], []
  step_times = []
  compile_seconds = 0.0
  start = time.perf_counter()
  last_sync, last_k = start, 0  # set at k == 1, before their first use
  bar = tqdm(
    total=config.steps,
    desc=desc,
    disable=not progress,
    leave=True,
    unit="step",
    dynamic_ncols=True,
  )
  try:
    for k in range(1, config.steps + 1):
      if pos + config.batch_size > n:
        order, pos = rng.permutation(n), 0
      idx = order[pos : pos + config.batch_size]
      pos += config.batch_size
      params, opt_state, loss = step(
        params, opt_state, train_data.images[idx], train_data.labels[idx]
      )
      pending.append(loss)
      if k == 1 or k % 10 == 0:  # a sync now and then, for the timings
        loss.block_until_ready()
        now = time.perf_counter()
        if k == 1:
          compile_seconds = now - start
        elif last_k % config.eval_every:  # no evaluation in the interval
          step_times.append((now - last_sync) / (k - last_k))
        last_sync, last_k = now, k
      if k % config.eval_every == 0 or k == config.steps:
        mean_loss = float(np.mean([float(v) for v in pending]))
        pending = []
        loss_steps.append(k)
        losses.append(mean_loss)
        sub = test_data.images[: config.eval_batch]
        acc = float(
          np.mean(
            predict(model, params, sub, fn=predict_fn)
            == test_data.labels[: config.eval_batch]
          )
        )
        curve_steps.append(k)
        curve_acc.append(acc)
        bar.set_postfix(loss=f"{mean_loss:.3f}", test_acc=f"{acc:.3f}")
      bar.update(1)
  finally:
    bar.close()
  train_seconds = time.perf_counter() - start
  predictions = predict(model, params, test_data.images, fn=predict_fn)
  return TrainResult(
    params,
    curve_steps,
    curve_acc,
    loss_steps,
    losses,
    predictions,
    train_seconds,
    compile_seconds,
    float(np.median(step_times) * 1e3) if step_times else float("nan"),
  )
