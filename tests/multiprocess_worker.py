"""One process of a multi-process training run (tests/test_multiprocess.py).

A small linen model with LandmarkConv4, LandmarkConv8 and LandmarkBlock takes
a few jitted optax steps with the batch sharded over one global mesh. Run as

  python tests/multiprocess_worker.py --out DIR --num-processes 2 \\
      --process-id I --coordinator 127.0.0.1:PORT      # one per process
  python tests/multiprocess_worker.py --out DIR        # the single-process run

with XLA_FLAGS=--xla_force_host_platform_device_count=N set for the
multi-process run (N devices per process). Each process writes
DIR/result_<name>.npz (losses, parameters and BatchNorm statistics after the
last step, and the logits of the trained model exported with jax.export and
called back), DIR/hlo_<name>.txt (the compiled training step) and
DIR/hlo_export_<name>.txt (the compiled exported model). This is also
the runnable example of docs/multidevice.md's recipe.
"""

import argparse
import os
import sys
import traceback

STEPS = 3
GLOBAL_BATCH = 8  # 2 per device over 2 processes x 2 devices
IMAGE = (12, 12, 3)  # H, W, C
CLASSES = 4


def load_examples(step: int, rows: range):
  """Examples ``rows`` of batch ``step``: each one from its own seed, so a
  process makes only the rows it holds and every process count sees the same
  data (a real loader reads its own files or its slice of a data set)."""
  import numpy as np

  images, labels = [], []
  for i in rows:
    rng = np.random.default_rng([step, i])
    images.append(rng.normal(size=IMAGE).astype(np.float32))
    labels.append(rng.integers(CLASSES))
  return np.stack(images), np.asarray(labels, np.int32)


def run(args) -> None:
  import jax

  # Cross-process collectives on CPU (the default in this jax; explicit, as a
  # GPU run would use NCCL without any setting).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.num_processes > 1:
    # Short timeouts: a dead peer ends the run in seconds, not minutes. The
    # coordinator (process 0) listens on that address only, not on every
    # interface (the default).
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      coordinator_bind_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=60,
      heartbeat_timeout_seconds=10,
      shutdown_timeout_seconds=20,
    )
  if args.fail == "after_initialize":
    raise RuntimeError(f"process {jax.process_index()}: failing as asked")

  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import lmconv_jax

  impl = "ffi"  # the custom calls are what this run is about

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.relu(lmconv_jax.LandmarkConv4(8, (3, 3), implementation=impl)(x))
      x = nn.relu(lmconv_jax.LandmarkConv8(8, (3, 3), implementation=impl)(x))
      x = lmconv_jax.LandmarkBlock(8, implementation=impl)(x, train=train)
      return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))

  # One mesh over every device of every process; the batch is split over it.
  # Auto axes: jit's partitioner places what the code does not say (this
  # jax's make_mesh defaults to Explicit axes, under which optax's integer-
  # label loss needs an explicit out_sharding for its gather).
  mesh = jax.make_mesh(
    (jax.device_count(),), ("data",), axis_types=(AxisType.Auto,)
  )
  batch = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def global_batch(step: int):
    """The step's global batch; this process loads only its own rows."""

    def shard(index):  # called once per local device
      rows = range(*index[0].indices(GLOBAL_BATCH))
      return load_examples(step, rows)

    images = jax.make_array_from_callback(
      (GLOBAL_BATCH, *IMAGE), batch, lambda index: shard(index)[0]
    )
    labels = jax.make_array_from_callback(
      (GLOBAL_BATCH,), batch, lambda index: shard(index)[1]
    )
    return images, labels

  model = Net()
  # SGD with momentum rather than Adam: Adam's first steps are about
  # lr * sign(grad), which turns the rounding of a near-zero gradient entry
  # into an O(lr) parameter difference; SGD keeps differences proportional
  # to rounding, so the comparison tests the partitioning, not the optimizer.
  tx = optax.sgd(0.05, momentum=0.9)

  # Parameters made inside jit, replicated on every device of the mesh: each
  # process computes the same values from the same key, no transfer needed.
  # An "rbg" key: XLA compiles threefry's initializers for these 20 arrays in
  # ~10 s on a loaded 2-core machine, the RngBitGenerator in well under 1 s.
  def init():
    key = jax.random.key(0, impl="rbg")
    variables = model.init(key, jnp.zeros((1, *IMAGE)), train=False)
    params = variables["params"]
    return params, variables["batch_stats"], tx.init(params)

  params, batch_stats, opt_state = jax.jit(init, out_shardings=replicated)()

  @jax.jit
  def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  losses = []
  for step in range(STEPS):
    images, labels = global_batch(step)
    if step == 0:
      compiled = train_step.lower(
        params, batch_stats, opt_state, images, labels
      ).compile()
      with open(os.path.join(args.out, f"hlo_{args.name}.txt"), "w") as f:
        f.write(compiled.as_text())
    params, batch_stats, opt_state, loss = compiled(
      params, batch_stats, opt_state, images, labels
    )
    assert loss.sharding.is_fully_replicated, loss.sharding
    losses.append(float(loss))  # replicated: every process has it

  # jax.export of the trained model for inference, batch-sharded over every
  # device of every process: the module holds no Python partitioning
  # callbacks, so the deserialized call partitions our custom calls itself.
  from jax import export
  from jax.experimental import multihost_utils

  def predict(params, batch_stats, images):
    return model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=False
    )

  images, _ = global_batch(STEPS)
  exported = export.export(
    jax.jit(predict, out_shardings=batch),
    disabled_checks=lmconv_jax.export_disabled_checks(),
  )(params, batch_stats, images)
  call = jax.jit(export.deserialize(exported.serialize()).call)
  compiled = call.lower(params, batch_stats, images).compile()
  with open(os.path.join(args.out, f"hlo_export_{args.name}.txt"), "w") as f:
    f.write(compiled.as_text())
  logits = compiled(params, batch_stats, images)
  per_device = GLOBAL_BATCH // jax.device_count()
  assert logits.sharding.shard_shape(logits.shape)[0] == per_device, (
    logits.sharding
  )

  flat = {
    "loss": np.asarray(losses),
    # sharded over the processes: gathered to every process to read it
    "logits": multihost_utils.process_allgather(logits, tiled=True),
    "exported_devices": np.asarray(exported.nr_devices),
  }
  for kind, tree in (("params", params), ("batch_stats", batch_stats)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      assert leaf.sharding.is_fully_replicated, (path, leaf.sharding)
      flat[kind + jax.tree_util.keystr(path)] = np.asarray(leaf)
  flat["devices"] = np.asarray(
    [jax.device_count(), jax.local_device_count(), jax.process_count()]
  )
  np.savez(os.path.join(args.out, f"result_{args.name}.npz"), **flat)
  if args.num_processes > 1:
    jax.distributed.shutdown()  # waits for the other processes
  print(f"{args.name}: done, losses {losses}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--coordinator", default=None)
  parser.add_argument(
    "--fail",
    choices=("after_initialize",),
    default=None,
    help="raise at that point (tests the failure path)",
  )
  args = parser.parse_args()
  args.name = (
    f"process{args.process_id}" if args.num_processes > 1 else "single"
  )
  os.makedirs(args.out, exist_ok=True)
  try:
    run(args)
  except BaseException:  # noqa: BLE001 - report, then exit hard
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: jax's atexit hook would call jax.distributed.shutdown(),
    # whose barrier waits for the other processes (up to the shutdown
    # timeout) before this one exits. Exiting at once lets the launcher see
    # the failure and stop the others.
    os._exit(1)


if __name__ == "__main__":
  main()
