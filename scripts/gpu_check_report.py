"""Writes OUTDIR/gpu_report.md and OUTDIR/gpu_results.json for gpu_check.sh.

Reads what the steps left: WORK/steps.tsv (one line per step: name, status,
seconds, expected, limit, note), WORK/harness.tsv (the device harness, one
line per case: ok or FAIL, the case, why), WORK/junit.xml (pytest),
OUTDIR/memcheck.log
and racecheck.log (compute-sanitizer), WORK/bench.json and bench.md
(benchmarks/bench_gpu.py), OUTDIR/env.log. Exits 0 when every step passed
(or was skipped by design), 1 otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

PASSING = {"ok", "reused", "skipped", "unsupported"}


def read(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()
  except OSError:
    return ""


def steps(work: str) -> list[dict]:
  out = []
  for line in read(os.path.join(work, "steps.tsv")).splitlines():
    name, status, secs, expected, limit, note = (line.split("\t") + [""] * 6)[
      :6
    ]
    out.append(
      dict(
        name=name,
        status=status,
        seconds=int(secs or 0),
        expected_s=int(expected or 0),
        limit_s=int(limit or 0),
        note=note,
      )
    )
  return out


HARNESS_PASSES = ("fwd-train", "fwd-infer", "tangent", "backward")


def harness_summary(work: str) -> dict:
  """The device harness's cases (tests/cuda_harness.cu --tsv): how many
  passed, which failed, and per grouping and pass how many passed."""
  text = read(os.path.join(work, "harness.tsv"))
  if not text:
    return dict(ran=False)
  cases, table = [], {}
  for line in text.splitlines():
    status, label, why = (line.split("\t") + ["", ""])[:3]
    fields = label.split()
    if len(fields) < 3:
      continue
    passed = status == "ok"
    cases.append(dict(passed=passed, case=" ".join(fields), why=why))
    row = table.setdefault(fields[2], {k: [0, 0] for k in HARNESS_PASSES})
    cell = row.setdefault(fields[0], [0, 0])
    cell[0] += passed
    cell[1] += 1
  n_ok = sum(c["passed"] for c in cases)
  return dict(
    ran=True,
    passed=n_ok,
    failed=len(cases) - n_ok,
    failures=[c for c in cases if not c["passed"]][:200],
    by_grouping={
      g: {k: f"{v[0]}/{v[1]}" for k, v in row.items()}
      for g, row in table.items()
    },
  )


def pytest_summary(work: str) -> dict:
  path = os.path.join(work, "junit.xml")
  if not os.path.exists(path):
    return dict(ran=False)
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    return dict(ran=False, error=f"junit.xml unreadable: {e}")
  suites = [root] if root.tag == "testsuite" else list(root)
  total = dict(tests=0, failures=0, errors=0, skipped=0, time_s=0.0)
  failed, skipped_reasons = [], {}
  for s in suites:
    for k in ("tests", "failures", "errors", "skipped"):
      total[k] += int(s.get(k, 0))
    total["time_s"] += float(s.get("time", 0))
    for case in s.iter("testcase"):
      name = f"{case.get('classname', '')}::{case.get('name', '')}"
      for tag in ("failure", "error"):
        el = case.find(tag)
        if el is not None:
          msg = (el.get("message") or "").splitlines()
          failed.append(
            dict(test=name, kind=tag, message=msg[0][:300] if msg else "")
          )
      el = case.find("skipped")
      if el is not None:
        reason = (el.get("message") or "").strip()[:200]
        skipped_reasons[reason] = skipped_reasons.get(reason, 0) + 1
  total["passed"] = (
    total["tests"] - total["failures"] - total["errors"] - total["skipped"]
  )
  return dict(ran=True, **total, failed=failed, skipped_reasons=skipped_reasons)


def sanitizer_summary(log: str) -> dict:
  text = read(log)
  if not text:
    return dict(ran=False)
  summary = [
    l.strip("= ").strip()
    for l in text.splitlines()
    if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l
  ]
  issues = [
    l.strip("= ").strip()
    for l in text.splitlines()
    if l.startswith("=========")
    and re.search(
      r"Invalid|hazard|Race|out of bounds|misaligned|Error:|"
      r"Barrier|Uninitialized",
      l,
    )
  ]
  kernels = sorted(
    {
      m.group(1)
      for m in re.finditer(
        r"=========\s+at (?:0x[0-9a-f]+ in )?([A-Za-z_][\w:<>, ]*?)[(+]", text
      )
    }
  )
  errors = None
  for l in summary:
    m = re.search(r"(\d+) errors?", l)
    if m:
      errors = (errors or 0) + int(m.group(1))
  return dict(
    ran=True,
    summary=summary,
    errors=errors,
    issues=issues[:30],
    kernels_named=kernels[:20],
    unsupported="Device not supported" in text,
    case_lines=[
      l
      for l in text.splitlines()
      if l.startswith(("  ok", "  FAIL", "gpu_sanitize_case"))
    ],
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--outdir", required=True)
  p.add_argument("--work", required=True)
  p.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
  p.add_argument("--seconds", type=int, default=0)
  p.add_argument("--budget", type=int, default=0)
  a = p.parse_args(argv)

  st = steps(a.work)
  harness = harness_summary(a.work)
  tests = pytest_summary(a.work)
  san = {
    t: sanitizer_summary(os.path.join(a.outdir, f"{t}.log"))
    for t in ("memcheck", "racecheck")
  }
  for s in st:
    if (
      s["name"] in san
      and s["status"] == "failed"
      and san[s["name"]].get("unsupported")
    ):
      s["status"] = "unsupported"
      s["note"] = "compute-sanitizer: Device not supported on this machine"
    if (
      s["name"] == "harness"
      and s["status"] == "ok"
      and harness.get("passed", 0) == 0
    ):
      s["status"] = "failed"
      s["note"] = "no harness case ran (see tests.log)"
    if (
      s["name"] == "tests"
      and s["status"] == "ok"
      and tests.get("ran")
      and a.mode == "gpu"
      and tests.get("passed", 0) == 0
    ):
      s["status"] = "failed"
      s["note"] = "no gpu test ran (all skipped: see tests.log)"
  bench = {}
  try:
    with open(os.path.join(a.work, "bench.json")) as f:
      bench = json.load(f)
  except (OSError, ValueError):
    pass
  bench_md = read(os.path.join(a.work, "bench.md"))
  if not bench_md and bench.get("rows"):
    bench_md = "(the benchmark stopped early; rows so far are in the JSON)\n"
  env = read(os.path.join(a.outdir, "env.log"))
  passed = bool(st) and all(s["status"] in PASSING for s in st)
  date = datetime.datetime.now(datetime.timezone.utc).strftime(
    "%Y-%m-%d %H:%M UTC"
  )

  results = dict(
    mode=a.mode,
    date=date,
    passed=passed,
    seconds=a.seconds,
    budget_s=a.budget,
    steps=st,
    environment=env.splitlines(),
    harness=harness,
    tests=tests,
    sanitizer=san,
    bench=bench,
  )
  with open(os.path.join(a.outdir, "gpu_results.json"), "w") as f:
    json.dump(results, f, indent=1)

  md = [
    f"# GPU check: {'PASSED' if passed else 'FAILED'}"
    f"{' (dry run, no GPU)' if a.mode == 'dry-run' else ''}",
    "",
    f"{date}; {a.seconds} s of a {a.budget} s budget. Written by "
    f"scripts/gpu_check.sh; the logs are beside this file.",
    "",
    "## Environment",
    "",
    "```",
    env.strip(),
    "```",
    "",
    "## Steps",
    "",
    "| step | status | seconds | expected | limit | note |",
    "|---|---|---:|---:|---:|---|",
  ]
  for s in st:
    md.append(
      f"| {s['name']} | {s['status']} | {s['seconds']} "
      f"| {s['expected_s']} | {s['limit_s']} | {s['note']} |"
    )
  md += ["", "## Device harness (`tests/cuda_harness.cu`)", ""]
  if harness.get("ran"):
    where = (
      "the host twin: the CUDA bodies on the CPU, not the GPU"
      if a.mode == "dry-run"
      else "on the GPU"
    )
    md.append(
      f"{harness['passed']} passed, {harness['failed']} failed "
      f"({where}); every output bit for bit against the CPU "
      f"kernels, none left poisoned. Passed cases per grouping "
      f"and pass (every dtype and guide):"
    )
    md += [
      "",
      "| grouping | " + " | ".join(HARNESS_PASSES) + " |",
      "|---|" + "---:|" * len(HARNESS_PASSES),
    ]
    for g, row in harness["by_grouping"].items():
      md.append(
        f"| {g} | "
        + " | ".join(row.get(k, "0/0") for k in HARNESS_PASSES)
        + " |"
      )
    for c in harness["failures"][:30]:
      md.append(f"- FAIL `{c['case']}`: {c['why'][:300]}")
  else:
    md.append("Did not run.")
  md += ["", "## Tests (`pytest -m gpu tests`)", ""]
  if tests.get("ran"):
    md.append(
      f"{tests['passed']} passed, {tests['failures']} failed, "
      f"{tests['errors']} errors, {tests['skipped']} skipped, in "
      f"{tests['time_s']:.0f} s."
    )
    for f_ in tests["failed"]:
      md.append(f"- {f_['kind'].upper()} `{f_['test']}`: {f_['message']}")
    for reason, n in tests["skipped_reasons"].items():
      md.append(f"- skipped ({n}): {reason}")
  else:
    md.append(
      "Did not run" + (f": {tests['error']}" if "error" in tests else ".")
    )
  md += ["", "## compute-sanitizer", ""]
  for tool, s in san.items():
    if not s.get("ran"):
      md.append(f"- {tool}: did not run.")
      continue
    head = "; ".join(s["summary"]) or (
      "no sanitizer summary (ran without the sanitizer)"
      if a.mode == "dry-run"
      else "no summary line: see the log"
    )
    md.append(
      f"- {tool}: {head}"
      + (" (Device not supported here)" if s["unsupported"] else "")
    )
    for line in s["issues"][:10]:
      md.append(f"  - `{line}`")
    if s["kernels_named"]:
      md.append(
        f"  - kernels named in reports: {', '.join(s['kernels_named'])}"
      )
    for line in s["case_lines"][-3:]:
      md.append(f"  - workload: `{line.strip()}`")
  md += ["", "## Benchmark (`benchmarks/bench_gpu.py`)", ""]
  md.append(bench_md.strip() or "Did not run.")
  if bench.get("verdict"):
    md += ["", "Targets:", ""] + [f"- {v}" for v in bench["verdict"]]
  md += ["", "## Not verified by this run", ""]
  if a.mode == "dry-run":
    md.append(
      "Everything that needs a GPU: this was a dry run. No CUDA "
      "kernel ran; the harness ran its host twin (the CUDA bodies "
      "compiled for the CPU), the tests were collected and skipped, "
      "the "
      "sanitizer workload ran on the CPU without the sanitizer, and "
      "the benchmark's numbers are CPU smoke-test numbers."
    )
  else:
    md += [
      "- Several GPUs: sharding and pmap over GPUs (tested on CPU "
      "devices only).",
      "- GPUs other than this one (other architectures run the PTX or "
      "the sm_80 build).",
      "- compute-sanitizer covers a small grid only; racecheck sees "
      "shared memory, not the global-memory ring (the CPU race "
      "detector covers that).",
    ]
  with open(os.path.join(a.outdir, "gpu_report.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
