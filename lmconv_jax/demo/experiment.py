"""The demo end to end: data, four models, one budget, a table, results.json."""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import sys
import time
from typing import Callable, Optional

import numpy as np

from lmconv_jax import ops
from lmconv_jax.benchmark import machine, markdown_table
from lmconv_jax.demo.data import CLASSES, MIN_DISTANCE, make_relation_data
from lmconv_jax.demo.models import (
  BOX_FIELD,
  BOX_REACH,
  DILATED_REACH,
  KINDS,
  RelationNet,
  count_params,
)
from lmconv_jax.demo.train import TrainConfig, train

BANDS = (
  ("near", MIN_DISTANCE, BOX_REACH),
  ("mid", BOX_REACH + 1, DILATED_REACH),
  ("far", DILATED_REACH + 1, 10**6),
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything a demo run depends on; the defaults are the documented run."""

  image_size: int = 40
  max_distance: Optional[int] = None  # None: image_size // 2
  features: int = 16
  train_size: int = 8000
  test_size: int = 2000
  steps: int = 400
  batch_size: int = 32
  learning_rate: float = 3e-3
  eval_every: int = 50
  eval_batch: int = 500
  seed: int = 0
  models: tuple = ("box", "dilated", "lm4", "lm8")
  implementation: str = "auto"

  def __post_init__(self):
    if self.max_distance is None:
      object.__setattr__(self, "max_distance", self.image_size // 2)
    object.__setattr__(self, "models", tuple(self.models))

  @classmethod
  def quick(cls, **overrides) -> "DemoConfig":
    """A tiny run for tests: seconds, not minutes. Its 24 x 24 images are too
    small for the long-range effect; the numbers mean little."""
    base = dict(
      image_size=24,
      features=16,
      train_size=1024,
      test_size=256,
      steps=100,
      batch_size=16,
      eval_every=50,
      eval_batch=256,
    )
    base.update(overrides)
    return cls(**base)

  def validate(self) -> None:
    """Raises ValueError, naming the field, for a config that cannot run."""
    for name in (
      "features",
      "train_size",
      "test_size",
      "steps",
      "batch_size",
      "eval_every",
      "eval_batch",
    ):
      if getattr(self, name) < 1:
        raise ValueError(
          f"{name} must be at least 1, got {getattr(self, name)}."
        )
    if not self.learning_rate > 0:
      raise ValueError(
        f"learning_rate must be positive, got {self.learning_rate}."
      )
    unknown = [m for m in self.models if m not in KINDS]
    if unknown or not self.models:
      given = ", ".join(map(repr, unknown)) or "(none given)"
      raise ValueError(
        f"unknown model(s) {given}; choose from {', '.join(KINDS)}."
      )
    for key, p in (("lm4", 4), ("lm8", 8)):
      if key in self.models and self.features % p:
        raise ValueError(
          f"features={self.features}: the {KINDS[key].name} model splits its "
          f"channels into {p} direction groups, so features must be a "
          f"multiple of {p} (e.g. {p * max(1, round(self.features / p))})."
        )
    lo = 2 * MIN_DISTANCE
    if self.image_size < lo:
      raise ValueError(
        f"image_size must be at least {lo}, got {self.image_size}."
      )
    if not MIN_DISTANCE <= self.max_distance <= self.image_size // 2:
      raise ValueError(
        f"max_distance must be between {MIN_DISTANCE} and image_size // 2 = "
        f"{self.image_size // 2} (farther pairs are nearer the other way "
        f"round for a circularly padded convolution), got "
        f"{self.max_distance}."
      )
    if self.batch_size > self.train_size:
      raise ValueError(
        f"batch_size ({self.batch_size}) is larger than "
        f"train_size ({self.train_size})."
      )


def pool_backend(implementation: str) -> str:
  """Which landmark pool runs here, in words, e.g. "ffi (cpu kernels)"."""
  chosen = ops.resolve_implementation(implementation, "demo")
  platform_ = ops.platform()
  if chosen == "ffi":
    return f"ffi ({platform_} kernels)"
  return (
    f"reference (pure jnp; no FFI kernels for {platform_!r}, see "
    f"`python -m lmconv_jax info`)"
    if implementation == "auto"
    else "reference (pure jnp)"
  )


def band_accuracy(correct: np.ndarray, distance: np.ndarray) -> dict:
  """Accuracy within each reach band (None where the band is empty)."""
  out = {}
  for name, lo, hi in BANDS:
    sel = (distance >= lo) & (distance <= hi)
    out[name] = float(correct[sel].mean()) if sel.any() else None
  return out


def distance_curve(correct: np.ndarray, distance: np.ndarray) -> dict:
  """Accuracy per distance (only distances that occur), as str -> float."""
  return {
    str(int(d)): float(correct[distance == d].mean())
    for d in np.unique(distance)
  }


def run_demo(
  config: DemoConfig,
  out_dir: pathlib.Path,
  *,
  progress: bool = True,
  figures: bool = True,
  log: Callable[[str], None] = print,
  command: Optional[str] = None,
) -> dict:
  """Runs the demo, writes results.json (and figures) to ``out_dir``.

  ``command`` is recorded in results.json (default: this process's argv).
  """
  config.validate()
  started = time.perf_counter()
  out_dir.mkdir(parents=True, exist_ok=True)
  backend = pool_backend(config.implementation)
  train_data = make_relation_data(
    config.train_size, config.image_size, config.seed, config.max_distance
  )
  test_data = make_relation_data(
    config.test_size, config.image_size, config.seed + 1, config.max_distance
  )
  far = float(np.mean(test_data.distance > BOX_REACH))
  log(
    f"data: {config.image_size}x{config.image_size} images, a plus and a "
    f"ring {int(test_data.distance.min())}-{int(test_data.distance.max())} "
    f"px apart, {len(CLASSES)} relations ({', '.join(CLASSES)}); "
    f"{config.train_size} train / {config.test_size} test; "
    f"in {far:.0%} of the test pairs no {BOX_FIELD}x{BOX_FIELD} window "
    f"(the receptive field of three 3x3 convolutions) sees both"
  )
  log(
    f"landmark pool: {backend}; every model: {config.steps} steps of "
    f"{config.batch_size}, Adam {config.learning_rate:g}, seed {config.seed}"
  )
  tc = TrainConfig(
    steps=config.steps,
    batch_size=config.batch_size,
    learning_rate=config.learning_rate,
    eval_every=config.eval_every,
    eval_batch=config.eval_batch,
  )
  rows, trained = [], {}
  for key in config.models:
    kind = KINDS[key]
    model = RelationNet(
      key, config.features, implementation=config.implementation
    )
    result = train(
      model,
      train_data,
      test_data,
      tc,
      seed=config.seed,
      progress=progress,
      desc=f"{kind.name:<22}",
    )
    correct = result.predictions == test_data.labels
    row = dict(
      model=kind.name,
      key=key,
      sees=kind.sees,
      params=count_params(result.params),
      test_accuracy=float(correct.mean()),
      accuracy_by_band=band_accuracy(correct, test_data.distance),
      accuracy_by_distance=distance_curve(correct, test_data.distance),
      train_seconds=result.train_seconds,
      compile_seconds=result.compile_seconds,
      step_ms=result.step_ms,
      curve=dict(
        steps=result.curve_steps,
        test_accuracy=result.curve_accuracy,
        loss_steps=result.loss_steps,
        train_loss=result.loss,
      ),
    )
    rows.append(row)
    trained[key] = (model, result)
    if not progress:
      log(
        f"  {kind.name}: test accuracy {row['test_accuracy']:.3f} "
        f"({row['train_seconds']:.1f} s)"
      )
  figure_files = []
  if figures:
    from lmconv_jax.demo import figures as figs  # matplotlib: only if asked

    figure_files = figs.write_all(out_dir, config, rows, trained, test_data)
  results = dict(
    date=datetime.datetime.now().isoformat(timespec="seconds"),
    command=command or " ".join(sys.argv),
    machine=machine(),
    landmark_pool=backend,
    config=dataclasses.asdict(config),
    data=dict(
      classes=list(CLASSES),
      image_size=config.image_size,
      distance_range=[
        int(test_data.distance.min()),
        int(test_data.distance.max()),
      ],
      test_fraction_beyond_box_reach=far,
      reach=dict(box=BOX_REACH, dilated=DILATED_REACH),
      bands={
        name: [lo, min(hi, config.max_distance)]
        for name, lo, hi in BANDS
        if lo <= config.max_distance
      },
    ),
    models=rows,
    figures=figure_files,
    total_seconds=time.perf_counter() - started,
  )
  results["verdict"] = verdict(results)
  with open(out_dir / "results.json", "w") as f:
    json.dump(results, f, indent=1)
  return results


def format_table(results: dict) -> str:
  """The results as a markdown table (it reads as a plain table too)."""
  bands = results["data"]["bands"]
  heads = [
    f"acc, {lo}-{hi} px apart" if lo < hi else f"acc, {lo} px apart"
    for lo, hi in bands.values()
  ]
  rows = []
  for r in results["models"]:
    cells = [
      "-"
      if r["accuracy_by_band"][n] is None
      else f"{r['accuracy_by_band'][n]:.3f}"
      for n in bands
    ]
    rows.append(
      [
        r["model"],
        f"{r['params']:,}",
        f"{r['test_accuracy']:.3f}",
        *cells,
        f"{r['train_seconds']:.1f} s",
      ]
    )
  return markdown_table(
    ["model", "params", "test acc", *heads, "train time"],
    rows,
    "lrr" + "r" * len(heads) + "r",
  )


def verdict(results: dict) -> str:
  """One honest sentence: who won, by how much, and whether a baseline did."""
  rows = sorted(results["models"], key=lambda r: -r["test_accuracy"])
  best = rows[0]["test_accuracy"]
  top = [r for r in rows if r["test_accuracy"] == best]
  lead = f"best: {' and '.join(r['model'] for r in top)} ({best:.3f})"
  landmark = {"lm4", "lm8"}
  top_keys = {r["key"] for r in top}
  if not top_keys & landmark:
    return lead + " - a baseline beat the landmark convolutions on this run."
  if top_keys - landmark:
    return lead + " - a baseline tied with the landmark convolutions."
  base = [r for r in rows if r["key"] not in landmark]
  if base:
    return lead + (
      f"; best baseline: {base[0]['model']} ({base[0]['test_accuracy']:.3f})."
    )
  return lead + "."
