"""python -m lmconv_jax: demo --quick writes sane results; info; bench."""

import io
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from lmconv_jax import _ffi, cli
from lmconv_jax.demo.experiment import format_table, verdict

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
  """(exit code, stdout, stderr) of the CLI run in this process."""
  try:
    code = cli.main(list(argv))
  except SystemExit as e:  # argparse: --help, --version, usage errors
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
  """One `demo --quick` run shared by the tests that read its output."""
  out = tmp_path_factory.mktemp("demo") / "run"
  capture = pytest.MonkeyPatch()
  stdout, stderr = io.StringIO(), io.StringIO()
  capture.setattr(sys, "stdout", stdout)
  capture.setattr(sys, "stderr", stderr)
  try:
    code = cli.main(["demo", "--quick", "--out", str(out)])
  finally:
    capture.undo()
  return code, stdout.getvalue(), stderr.getvalue(), out


def test_quick_demo_succeeds_and_prints_the_table(quick_demo):
  code, out, err, _ = quick_demo
  assert code == 0, err
  for name in (
    "box 3x3",
    "dilated 3x3 (1, 2, 4)",
    "LandmarkConv4",
    "LandmarkConv8",
  ):
    assert f"| {name} |" in out
  assert "| model | params | test acc |" in out
  assert "wrote results.json" in out
  # A progress bar per model, on stderr.
  for name in ("box 3x3", "LandmarkConv8"):
    assert name in err and "100/100" in err
  assert "Traceback" not in err
  # Whatever the verdict, --quick says it is a smoke test, not the result.
  assert "--quick is a smoke test" in out


def test_quick_demo_results_json_holds_sane_numbers(quick_demo):
  _, _, _, out = quick_demo
  results = json.loads((out / "results.json").read_text())
  models = results["models"]
  assert [m["key"] for m in models] == ["box", "dilated", "lm4", "lm8"]
  params = {m["params"] for m in models}
  assert len(params) == 1 and params.pop() == 4868  # matched exactly
  n_test = results["config"]["test_size"]
  for m in models:
    assert 0.0 <= m["test_accuracy"] <= 1.0
    # Accuracies are counts over the 256 test images.
    hits = m["test_accuracy"] * n_test
    assert abs(hits - round(hits)) < 1e-6
    assert all(0.0 <= v <= 1.0 for v in m["accuracy_by_distance"].values())
    assert all(
      v is None or 0.0 <= v <= 1.0 for v in m["accuracy_by_band"].values()
    )
    assert m["train_seconds"] > 0 and m["compile_seconds"] > 0
    assert m["curve"]["steps"] == [50, 100]
    assert len(m["curve"]["test_accuracy"]) == 2
    assert all(v > 0 for v in m["curve"]["train_loss"])
  lo, hi = results["data"]["distance_range"]
  assert 6 <= lo <= hi <= 12
  assert results["landmark_pool"].startswith(("ffi", "reference"))
  # A duration, not a speed bound (speed belongs in the benchmarks).
  assert results["total_seconds"] > 0
  # The table is rebuilt from the file alone.
  assert format_table(results).count("\n") == 5


def test_quick_demo_writes_the_figures(quick_demo):
  _, _, _, out = quick_demo
  results = json.loads((out / "results.json").read_text())
  assert results["figures"] == [
    "examples.png",
    "accuracy_curves.png",
    "accuracy_by_distance.png",
    "equivalence.png",
    "landmarks.png",
  ]
  for name in results["figures"]:
    data = (out / name).read_bytes()
    assert data[:8] == PNG and len(data) > 5000, name


def test_default_out_is_a_new_timestamped_folder(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, out, err = run_cli(
    capsys,
    "demo",
    "--quick",
    "--models",
    "box",
    "--steps",
    "3",
    "--no-figures",
    "--quiet",
  )
  assert code == 0, err
  folders = list(tmp_path.glob("lmconv_demo_*"))
  assert len(folders) == 1 and (folders[0] / "results.json").is_file()
  assert not list(folders[0].glob("*.png"))
  assert out.lstrip().startswith("| model |")  # --quiet: the table only
  assert err == ""  # and no progress bars


@pytest.mark.parametrize(
  "argv,exit_code,message",
  [
    (
      ["demo", "--steps", "0"],
      2,
      "--steps: expected a positive integer, got '0'",
    ),
    (["demo", "--steps", "ten"], 2, "expected a positive integer, got 'ten'"),
    (["demo", "--models", "box,resnet"], 2, "unknown model 'resnet'"),
    (["demo", "--features", "12"], 2, "--features must be a multiple of 8"),
    (
      ["demo", "--models", "box,lm4", "--features", "6"],
      2,
      "--features must be a multiple of 4",
    ),
    (
      ["demo", "--image-size", "32", "--max-distance", "20"],
      2,
      "--max-distance must be between 6 and --image-size // 2 = 16",
    ),
    (["demo", "--implementation", "cuda"], 2, "invalid choice: 'cuda'"),
    (["demo", "--seed", "-1"], 2, "expected an integer >= 0"),
    (["demo", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["bench", "--shape", "4,4"], 2, "at least 3 positive dims"),
    (["bench", "--sections", "grouping,up"], 2, "unknown section 'up'"),
    (["bench", "--dtype", "int8"], 2, "invalid choice: 'int8'"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ([], 2, "the following arguments are required: COMMAND"),
  ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
  capsys, argv, exit_code, message
):
  code, out, err = run_cli(capsys, *argv)
  assert code == exit_code
  assert message in err
  assert "Traceback" not in err and out == ""


def test_out_that_is_a_file_is_a_usage_error(capsys, tmp_path):
  f = tmp_path / "results.txt"
  f.write_text("x")
  code, _, err = run_cli(capsys, "demo", "--quick", "--out", str(f))
  assert code == 2 and "exists and is not a folder" in err


def unwritable_folder(tmp_path) -> pathlib.Path:
  """A folder nobody may create files in: a read-only one, or for root (who
  writes anywhere a mode allows) sysfs."""
  if os.geteuid() != 0:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder
  if os.path.isdir("/sys"):
    try:
      open("/sys/lmconv_write_check", "w").close()
    except OSError:
      return pathlib.Path("/sys")
  pytest.skip("no folder here that root cannot write to")


def test_unwritable_out_exits_2_before_any_training(
  capsys, tmp_path, monkeypatch
):
  from lmconv_jax.demo import experiment

  def run_demo(*args, **kwargs):
    raise AssertionError("training started")

  monkeypatch.setattr(experiment, "run_demo", run_demo)
  out = unwritable_folder(tmp_path)
  code, stdout, err = run_cli(capsys, "demo", "--quick", "--out", str(out))
  assert code == 2, err
  assert f"--out {str(out)!r}: cannot write there" in err
  assert err.count("\n") == 1 and "Traceback" not in err and stdout == ""
  # A new folder that cannot be created: the same, before training.
  code, _, err = run_cli(
    capsys, "demo", "--quick", "--out", str(out / "new" / "run")
  )
  assert code == 2 and "cannot create the folder" in err


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_unwritable_bench_output_exits_2_before_benchmarking(
  capsys, tmp_path, monkeypatch, option
):
  calls = []
  fake = types.SimpleNamespace(run=lambda **kw: calls.append(kw) or [])
  monkeypatch.setitem(sys.modules, "lmconv_jax.benchmark", fake)
  target = unwritable_folder(tmp_path) / "bench.out"
  code, out, err = run_cli(capsys, "bench", option, str(target))
  assert code == 2 and calls == []
  assert f"{option}: cannot write {str(target)!r}" in err
  assert "Traceback" not in err and out == ""


def test_bench_output_check_leaves_files_as_they_were(tmp_path):
  new, old = tmp_path / "new.json", tmp_path / "old.md"
  old.write_text("kept")
  assert cli._writable(str(new)) == str(new) and not new.exists()
  assert cli._writable(str(old)) == str(old) and old.read_text() == "kept"


def test_demo_without_the_demo_extra_says_what_to_install(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "optax", None)  # import optax fails
  monkeypatch.setitem(sys.modules, "tqdm", None)
  code, out, err = run_cli(capsys, "demo", "--quick")
  assert code == 2 and out == ""
  assert err.count("\n") == 1 and "Traceback" not in err
  assert "needs optax, tqdm" in err and "pip install 'lmconv-jax[demo]'" in err


def test_bench_without_the_demo_extra_says_what_to_install(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "tqdm", None)
  code, out, err = run_cli(capsys, "bench")
  assert code == 2 and out == "" and err.count("\n") == 1
  assert "the benchmark needs tqdm" in err and "lmconv-jax[demo]" in err


def test_the_library_imports_no_demo_dependency(tmp_path):
  """`import lmconv_jax` (and its layers) needs only the runtime deps; optax
  is not checked: flax itself requires and imports it."""
  code = (
    "import sys, lmconv_jax, lmconv_jax.nnx; "
    "print(sorted(m for m in ('tqdm', 'matplotlib') if m in sys.modules))"
  )
  run = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
  )
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == "[]"


def test_cuda_advice_names_the_cuda_version_of_the_build():
  built = {"cuda": {"built": True, "cuda_runtime": "13.0"}}
  advice = cli.cuda_advice(built, gpu_seen=False)
  assert 'pip install -U "jax[cuda13]"' in advice and "cuda12" not in advice
  assert cli.cuda_advice(built, gpu_seen=True) is None
  missing = {"cuda": {"built": False}}
  advice = cli.cuda_advice(missing, gpu_seen=False, nvcc_version="12.8")
  assert advice.startswith("To get the CUDA kernels")
  assert '"jax[cuda12]"' in advice and "cuda13" not in advice
  advice = cli.cuda_advice(missing, gpu_seen=False)  # no nvcc found
  assert '"jax[cuda13]" for CUDA 13' in advice and "CUDA 12" in advice


def test_ffi_asked_for_but_not_built_exits_3(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(_ffi, "has_kernels", lambda platform: False)
  code, _, err = run_cli(
    capsys,
    "demo",
    "--quick",
    "--implementation",
    "ffi",
    "--out",
    str(tmp_path / "x"),
  )
  assert code == 3
  assert "implementation='ffi' has no kernel" in err and "info" in err
  assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [[], ["demo"], ["info"], ["bench"]])
def test_help_on_every_command(capsys, command):
  code, out, _ = run_cli(capsys, *command, "--help")
  assert code == 0
  assert out.startswith("usage: python -m lmconv_jax")
  assert "exit codes:" in out


def test_module_entry_point(tmp_path):
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "lmconv_jax", *a],
    capture_output=True,
    text=True,
    cwd=tmp_path,
  )
  version = run("--version")
  assert version.returncode == 0 and version.stdout.startswith("lmconv_jax ")
  bad = run("demo", "--steps", "-1")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_info_shows_versions_kernels_devices(capsys):
  code, out, _ = run_cli(capsys, "info")
  assert code == 0
  assert out.startswith("lmconv_jax ")
  for text in (
    "jax ",
    "flax ",
    "kernels (XLA FFI):",
    "cpu",
    "cuda",
    "kernels (Pallas):\n  tpu   Pallas (Mosaic TPU)",
    "dtypes: float32, bfloat16 (others: the reference)",
    "devices (default backend:",
    'implementation="auto" runs',
  ):
    assert text in out
  built = _ffi.available_platforms()
  if "cpu" in built:
    assert "float32, float64, float16, bfloat16" in out
  if "cuda" not in built:
    assert "To get the CUDA kernels" in out and "nvcc" in out
  runtime = _ffi.build_info().get("cuda", {}).get("cuda_runtime")
  if runtime and "cuda" in built:  # the advice matches the build's CUDA
    major = runtime.split(".")[0]
    others = {"12", "13"} - {major}
    assert all(f"jax[cuda{m}]" not in out for m in others)


def test_info_json(capsys):
  code, out, _ = run_cli(capsys, "info", "--json")
  info = json.loads(out)
  assert code == 0
  assert set(info["kernels"]) == {"cpu", "cuda"}
  assert info["kernels"]["cpu"]["built"] == _ffi.has_kernels("cpu")
  assert info["devices"] and info["versions"]["jax"]
  assert info["auto_implementation"] in ("ffi", "reference")
  assert info["pallas"] == {
    "platforms": ["tpu"],
    "dtypes": ["float32", "bfloat16"],
  }


def test_bench_without_kernels_exits_3(capsys, monkeypatch):
  fake = types.SimpleNamespace(run=lambda **kw: [])
  monkeypatch.setitem(sys.modules, "lmconv_jax.benchmark", fake)
  monkeypatch.setattr(_ffi, "has_kernels", lambda platform: False)
  code, _, err = run_cli(capsys, "bench")
  assert code == 3 and "has no kernel for platform" in err


def test_bench_passes_options_and_writes_files(capsys, monkeypatch, tmp_path):
  """A real (tiny) run of one section, through the command line."""
  md, js = tmp_path / "b.md", tmp_path / "b.json"
  code, out, _ = run_cli(
    capsys,
    "bench",
    "--shape",
    "1,8,8,8",
    "--sections",
    "guide",
    "--repeats",
    "1",
    "--no-progress",
    "--markdown",
    str(md),
    "--json",
    str(js),
  )
  assert code == 0
  assert "| guide | guide (C,) | fwd+bwd |" in out
  assert md.read_text() + "\n" == out  # the printed table, as written
  saved = json.loads(js.read_text())
  assert saved["machine"]["cores"] and len(saved["rows"]) == 2
  assert saved["rows"][0]["shape"] == [1, 8, 8, 8]


def test_verdict_says_so_when_a_baseline_wins():
  results = {
    "models": [
      dict(model="box 3x3", key="box", test_accuracy=0.9),
      dict(model="LandmarkConv4", key="lm4", test_accuracy=0.8),
    ]
  }
  assert "a baseline beat the landmark convolutions" in verdict(results)
  results["models"][1]["test_accuracy"] = 0.9
  assert verdict(results).endswith(
    "a baseline tied with the landmark convolutions."
  )
  results["models"][1]["test_accuracy"] = 0.95
  assert verdict(results) == (
    "best: LandmarkConv4 (0.950); best baseline: box 3x3 (0.900)."
  )
