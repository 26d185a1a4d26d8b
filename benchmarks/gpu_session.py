"""The GPU session's stages, each with its own time budget, and a summary of what ran: run by ``gpu_session.sh``.

Stages, in order: ``install`` (carried wheels into /tmp/site), ``tests`` (the
GPU-marked tests), ``splitbn`` (split BN before and after), ``data`` (generated
photos on every core, sharded), ``bench`` (``moco-bench all``), ``quality``
(Fashion-MNIST pretraining with the time left, kNN per epoch, the record). A stage
whose prerequisite failed is skipped, with the reason. Everything that comes back
is under ``--out`` (at most 8 files: the device returns no more); scratch goes to
``--work``. ``summary.json`` is rewritten after every stage, so a run cut short still
says how far it got. This module imports nothing beyond the standard library
itself: the stages run as subprocesses, after the install.

``--dry-run`` runs every stage at a tiny size on the CPU (GPU-only tests are
skipped there), to check the script before the device time is spent.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("install", "tests", "splitbn", "data", "bench", "quality")
# Seconds per stage at most; quality takes whatever the total budget leaves. Stages
# that end early leave their time to quality. Sized from the first H200 session
# (2026-11-30): install 10-14 s, the GPU tests 128 s in 4 processes (now 8), split BN
# 14 s, data 25 s. The bench's windows are sized to 4 s of each contender's rate and the
# reference loader's run back to back (no refill waits), so each mode of `all` fits its
# 120 s (docs/benchmarks.md estimates each from the H200 rates); what the eager `all`
# leaves goes to the compiled e2e. Quality takes a call of its own (--stages quality), and
# split BN, measured once, runs when asked for.
BUDGETS_S = {"install": 60, "tests": 120, "splitbn": 20, "data": 30, "bench": 400, "quality": 0}
DEFAULT_STAGES = ("install", "tests", "data", "bench", "quality")
GRACE_S = 20.0  # after SIGTERM, before SIGKILL: moco-train checkpoints in it
NEEDS = {"tests": "install", "data": "install", "bench": "data", "quality": "install"}


class Session:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.out, self.work = args.out, args.work
        self.started = time.monotonic()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log = open(self.out / "session.log", "a")
        self.results: dict[str, dict] = {}
        self.cores = len(os.sched_getaffinity(0))

    # ------------------------------------------------------------------ plumbing

    def left_s(self) -> float:
        return self.args.total_s - (time.monotonic() - self.started)

    def say(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.started:6.0f} s] {line}"
        print(stamp, flush=True)
        self.log.write(stamp + "\n")
        self.log.flush()

    def run(self, command: list[str], timeout_s: float, grace_s: float = GRACE_S) -> int:
        """Run ``command``, its output into the log; 124 if it ran past ``timeout_s``.

        Past its time it gets SIGTERM first (moco-train then checkpoints and exits 0)
        and ``grace_s`` to finish before SIGKILL.
        """
        self.say("$ " + " ".join(command))
        child = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        try:
            return child.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                code = child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                code = None
            self.say(f"stopped after {timeout_s:.0f} s (exit code {code} after SIGTERM)")
            return 124

    def python(self, *args: str) -> list[str]:
        return [self.args.python, *args]

    def write_summary(self) -> None:
        summary = {
            "dry_run": self.dry,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(),
            "total_budget_s": self.args.total_s,
            "wall_s": round(time.monotonic() - self.started, 1),
            "out": sorted(p.name for p in self.out.iterdir()),
            "stages": self.results,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    def stage(self, name: str) -> None:
        budget = self.args.budget.get(name, BUDGETS_S[name])
        # Every stage ends inside the total (a call's limit kills everything at once):
        # what it leaves, less the summary's time and a stopped command's grace.
        room = self.left_s() - 15 - GRACE_S
        if name == "quality" or budget <= 0:
            budget = room
        budget = min(budget, room)
        record = {"budget_s": round(budget)}
        need = NEEDS.get(name)
        if name not in self.args.stages and name != "install":  # the others need what it installs
            record.update(status="skipped", reason="not asked for (--stages)")
        elif (
            need
            and self.results.get(need, {}).get("status") not in ("ok", None)
            and need in self.args.stages
        ):
            record.update(
                status="skipped", reason=f"needs {need}, which {self.results[need]['status']}"
            )
        elif budget < self.args.min_stage_s:
            record.update(
                status="skipped", reason=f"{max(0, self.left_s()):.0f} s left of the total budget"
            )
        else:
            self.say(f"--- {name} (budget {budget:.0f} s)")
            start = time.monotonic()
            try:
                record.update(getattr(self, "stage_" + name)(budget))
            except Exception as exc:  # a stage's own bug must not lose the others' results
                record.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            record["seconds"] = round(time.monotonic() - start, 1)
        self.results[name] = record
        self.say(
            f"{name}: {record['status']}"
            + (f" ({record['reason']})" if record.get("reason") else "")
        )
        self.write_summary()

    # ------------------------------------------------------------------ stages

    def stage_install(self, budget: float) -> dict:
        site = Path("/tmp/site")
        notes = []
        carry = REPO / ".gpu" / "carry" / "assemble.sh"  # benchmarks/gpu_carry.sh: the fewest parts
        if (
            carry.is_file() and self.dry
        ):  # built for the device's Python 3.12: only the parts are checked here
            if self.run(
                [
                    "bash",
                    "-c",
                    f"cd {shlex.quote(str(carry.parent))} && sha256sum -c --quiet SHA256SUMS",
                ],
                budget / 2,
            ):
                return {"status": "failed", "reason": ".gpu/carry: a part is missing or damaged"}
            notes.append(".gpu/carry parts checked (not installed in a dry run)")
        elif carry.is_file():
            if self.run(["bash", str(carry), str(site), str(REPO / ".gpu" / "fmnist")], budget / 2):
                return {
                    "status": "failed",
                    "reason": f"{carry.relative_to(REPO)} failed (see session.log)",
                }
            notes.append("DALI (CUDA 13), webdataset, simplejpeg and Fashion-MNIST from .gpu/carry")
        assemble = REPO / ".gpu" / "dali" / "assemble.sh"  # ../shared/scripts/wheel-parts --dali
        if assemble.is_file() and not self.dry:
            if self.run(["bash", str(assemble), str(site)], budget / 2):
                return {
                    "status": "failed",
                    "reason": f"{assemble.relative_to(REPO)} failed (see session.log)",
                }
            notes.append("DALI wheels from .gpu/dali")
        wheels = sorted(glob.glob(str(REPO / ".gpu" / "wheels" / "*.whl")))
        if wheels and not self.dry:
            if self.run(
                self.python(
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--upgrade",
                    "--target",
                    str(site),
                    *wheels,
                ),
                budget / 2,
            ):
                return {
                    "status": "failed",
                    "reason": "installing .gpu/wheels failed (see session.log)",
                }
            notes.append(f"{len(wheels)} wheels from .gpu/wheels")
        if site.is_dir() and not self.dry:
            self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env.get("PYTHONPATH", "")])
        probe = (
            "import json, torch, nvidia.dali, webdataset, simplejpeg; "
            "print(json.dumps({'torch': torch.__version__, 'dali': nvidia.dali.__version__, "
            "'webdataset': webdataset.__version__, 'cuda': torch.cuda.is_available(), "
            "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))"
        )
        found = subprocess.run(
            self.python("-c", probe), cwd=REPO, env=self.env, capture_output=True, text=True
        )
        self.log.write(found.stdout + found.stderr)
        if found.returncode:
            return {
                "status": "failed",
                "reason": "missing after install: " + found.stderr.strip().splitlines()[-1],
                "installed": notes,
            }
        versions = json.loads(found.stdout.strip().splitlines()[-1])
        if not versions["cuda"] and not self.dry:
            return {"status": "failed", "reason": "torch sees no CUDA GPU", **versions}
        return {
            "status": "ok",
            "installed": notes or ["nothing carried: the environment's own packages"],
            **versions,
        }

    def stage_tests(self, budget: float) -> dict:
        junit = self.work / "tests.xml"
        junit.unlink(missing_ok=True)
        # Several processes where pytest-xdist is there (the device's image has it): the tests
        # share one GPU of 139 GiB, and most of their time is DALI pipelines built on the CPU.
        spread = ["-n", "8"] if importlib.util.find_spec("xdist") and not self.dry else []
        code = self.run(
            self.python(
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-q",
                "-rfEs",
                "-p",
                "no:cacheprovider",
                "--timeout",
                "90",
                *spread,
                f"--junitxml={junit}",
                "tests",
            ),
            budget,
        )
        record = {
            "status": {0: "ok", 5: "ok", 124: "timed_out"}.get(code, "failed"),
            "exit_code": code,
        }
        if junit.is_file():
            import xml.etree.ElementTree as ElementTree

            cases = ElementTree.parse(junit).getroot().iter("testcase")
            counts, failures = {"passed": 0, "failed": 0, "skipped": 0}, []
            for case in cases:
                bad = (
                    case.find("failure") if case.find("failure") is not None else case.find("error")
                )
                if bad is not None:
                    counts["failed"] += 1
                    failures.append(
                        f"{case.get('classname')}::{case.get('name')}: "
                        f"{(bad.get('message') or '').splitlines()[0][:300] if bad.get('message') else ''}"
                    )
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
            record.update(counts=counts, failures=failures)
        return record

    def stage_splitbn(self, budget: float) -> dict:
        size = (
            [
                "--device",
                "cpu",
                "--arch",
                "resnet18",
                "--batch",
                "16",
                "--size",
                "32",
                "--reps",
                "1",
                "--warmup",
                "1",
            ]
            if self.dry
            else [
                "--device",
                "cuda",
                "--arch",
                "resnet50",
                "--batch",
                "256",
                "--size",
                "224",
                "--reps",
                "7",
            ]
        )
        code = self.run(
            self.python(
                "-m", "benchmarks.studies.split_bn", *size, "--out", str(self.out / "splitbn.json")
            ),
            budget,
        )
        return {
            "status": "ok" if code == 0 else "timed_out" if code == 124 else "failed",
            "exit_code": code,
            "output": "splitbn.json",
        }

    def stage_data(self, budget: float) -> dict:
        """Generated ImageNet-like photos, one generator process per core, then shards (>= one per loader worker)."""
        count = self.args.photos or (32 if self.dry else 2000)
        processes = min(self.cores, count)
        photos, parts = self.work / "photos", self.work / "photo-parts"
        shutil.rmtree(photos, ignore_errors=True)
        shutil.rmtree(parts, ignore_errors=True)
        children = []
        for part in range(processes):
            n = count // processes + (part < count % processes)
            children.append(
                subprocess.Popen(
                    self.python(
                        "-m",
                        "moco_dali.tools.bench.synthetic",
                        "--out",
                        str(parts / f"{part:02d}"),
                        "--count",
                        str(n),
                        "--seed",
                        str(part),
                    ),
                    cwd=REPO,
                    env=self.env,
                    stdout=self.log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + budget * 0.7
        for child in children:
            try:
                child.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for c in children:
                    c.kill()
                return {"status": "timed_out", "reason": "generating photos"}
        if any(child.returncode for child in children):
            return {"status": "failed", "reason": "a photo generator failed (see session.log)"}
        photos.mkdir(parents=True)
        for path in sorted(parts.glob("*/*.jpg")):
            path.rename(photos / f"{path.parent.name}-{path.name}")
        workers = self.cores if not self.dry else 2
        per_shard = max(1, count // workers)
        code = self.run(
            self.python(
                "-m",
                "moco_dali.tools.shards.cli",
                "build",
                str(photos),
                "--out",
                str(self.work / "shards"),
                "--max-count",
                str(per_shard),
                "--workers",
                str(self.cores),
                "--no-progress",
            ),
            deadline + budget * 0.3 - time.monotonic(),
        )
        if code:
            return {
                "status": "failed" if code != 124 else "timed_out",
                "reason": "moco-shards build",
            }
        shards = len(list((self.work / "shards").glob("*.tar")))
        return {"status": "ok", "photos": count, "generators": processes, "shards": shards}

    def stage_bench(self, budget: float) -> dict:
        tiny = [
            "--model.arch",
            "resnet18",
            "--data.views.size",
            "32",
            "--data.batch_size",
            "16",
            "--batches",
            "1",
            "--reps",
            "1",
            "--warmup",
            "1",
            "--model.K",
            "256",
            "--workers",
            "1",
            "--data.threads",
            "1",
            "--calls",
            "1",
            "--modes",
            "e2e,step,pipeline,momentum,views",
            "--data.views.hue_space",
            "yiq",
            "--device",
            "cpu",
        ]
        extra = tiny if self.dry else self.args.bench_args.split()
        started = time.monotonic()
        code = self.run(
            self.python(
                "-m",
                "moco_dali.tools.bench.cli",
                "all",
                "--shards",
                str(self.work / "shards"),
                "--photos",
                str(self.work / "photos"),
                *extra,
                "--out",
                str(self.out / "bench.json"),
                "--chart",
                str(self.out / "bench.png"),
            ),
            budget,
        )
        record = {
            "status": "ok" if code == 0 else "timed_out" if code == 124 else "failed",
            "exit_code": code,
            "arguments": extra,
        }
        if (self.out / "bench.json").is_file():  # exit 1 still writes the modes that ran
            try:
                record["headline"] = headline(json.loads((self.out / "bench.json").read_text()))
            except (ValueError, KeyError) as exc:
                record["headline"] = f"bench.json unreadable: {type(exc).__name__}: {exc}"
        # The same e2e compiled (run.compile: both encoders, inductor), with what time is left:
        # its step_ours beside e2e_ours, and the compilation's seconds apart from both.
        left = budget - (time.monotonic() - started)
        if left > (30 if self.dry else 60):
            code = self.run(
                self.python(
                    "-m",
                    "moco_dali.tools.bench.cli",
                    "e2e",
                    "--shards",
                    str(self.work / "shards"),
                    *_without(extra, "--modes", "--calls", "--photos"),
                    "--run.compile",
                    "true",
                    "--out",
                    str(self.out / "bench-compiled.json"),
                ),
                left,
            )
            record["compiled"] = {"exit_code": code, "output": "bench-compiled.json"}
        else:
            record["compiled"] = {"status": "skipped", "reason": f"{left:.0f} s left"}
        return record

    def stage_quality(self, budget: float) -> dict:
        from benchmarks.gpu_quality import quality_stage

        return quality_stage(self, budget)


def headline(record: dict) -> dict:
    """The figures the GPU goals are about, from a ``moco-bench all`` record."""
    r = record["records"]
    figures = {f"{mode}_error": sub["error"] for mode, sub in r.items() if "error" in sub}
    ok = {mode: sub for mode, sub in r.items() if "error" not in sub}
    if "pipeline" in ok:
        figures.update(
            pipeline_pairs_per_s=ok["pipeline"]["results"]["dali"]["pairs_per_s"],
            pipeline_dali_over_reference=ok["pipeline"]["dali_over_reference"],
        )
    if "step" in ok:
        figures["step_images_per_s"] = ok["step"]["results"]["ours"]["images_per_s"]
    if "e2e" in ok:
        figures.update(
            e2e_images_per_s=ok["e2e"]["results"]["e2e_ours"]["images_per_s"],
            e2e_over_step=ok["e2e"]["e2e_over_step"],
            e2e_over_reference=ok["e2e"]["ours_over_reference"],
        )
    if "views" in ok:
        figures["views_share"] = {
            name: round(cost["share"], 3) for name, cost in ok["views"]["costs"].items()
        }
    if "momentum" in ok:
        figures.update(
            momentum_ms=ok["momentum"]["momentum"][ok["momentum"]["best"]]["median_ms"],
            momentum_floor_ms=ok["momentum"]["floor_ms"],
        )
    return figures


def _without(args: list[str], *flags: str) -> list[str]:
    """``args`` less each of ``flags`` and the value after it."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            kept.append(arg)
    return kept


def _budgets(text: str) -> dict[str, float]:
    budgets = {}
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds.replace(".", "", 1).isdigit():
            raise argparse.ArgumentTypeError(
                f"--budget {item!r}: give STAGE=SECONDS, STAGE one of {', '.join(STAGES)}"
            )
        budgets[name] = float(seconds)
    return budgets


def _stages(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}"
        )
    return names


def main() -> int:
    parser = argparse.ArgumentParser(prog="gpu_session.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or "/tmp/gpu-session-out"),
        help="what comes back (default $OUT)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch (default /tmp/gpu-session)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="every stage at a tiny size, on the CPU"
    )
    parser.add_argument(
        "--total-s",
        type=float,
        default=570.0,
        help="the whole session's budget: one device call allows 600 s",
    )
    parser.add_argument(
        "--budget", type=_budgets, default={}, metavar="STAGE=S,...", help="override stage budgets"
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        default=list(DEFAULT_STAGES),
        metavar="A,B,...",
        help=f"stages to run, from {','.join(STAGES)} (default {','.join(DEFAULT_STAGES)}; "
        "install always runs)",
    )
    parser.add_argument(
        "--min-stage-s", type=float, default=20.0, help="skip a stage given less than this"
    )
    parser.add_argument(
        "--photos", type=int, default=None, help="generated photos (default 2000; 32 dry)"
    )
    # The shard build is CPU work, measured in the CPU records: the device's minutes go to the GPU's figures.
    parser.add_argument(
        "--bench-args",
        default="--modes e2e,step,pipeline,momentum,views --reps 3 --warmup 5",
        help="moco-bench all arguments beside its GPU defaults (default: sized to fit its budget); "
        "they replace the default whole, --modes included: without --modes, all runs every mode "
        "but views, the shard builds too",
    )
    parser.add_argument(
        "--quality-min-s",
        type=float,
        default=120.0,
        help="the least time the quality stage needs to be worth starting (GPU)",
    )
    parser.add_argument(
        "--quality-preset",
        default="cifar",
        choices=["cifar", "small"],
        help="the quality stage's recipe (default cifar: the authors' CIFAR-10 recipe at 32 px)",
    )
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    args.work = args.work or Path("/tmp/gpu-session" + ("-dry" if args.dry_run else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    session = Session(args)
    session.say(
        f"gpu session{' (dry run)' if args.dry_run else ''}: out {args.out}, work {args.work}, "
        f"{session.cores} cores, total budget {args.total_s:.0f} s"
    )
    for name in STAGES:
        session.stage(name)
    session.say("summary: " + "; ".join(f"{n} {r['status']}" for n, r in session.results.items()))
    for name, record in session.results.items():
        for key in ("headline", "counts", "failures", "knn"):
            if key in record:
                session.say(f"{name} {key}: {json.dumps(record[key])}")
    ok = all(r["status"] in ("ok", "skipped") for r in session.results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
