"""Sweeps on a cluster: ``cilbench sweep SUITE --executor slurm`` through submitit.

Every missing run of a suite becomes one task of ONE SLURM job array (``executor.batch()``). A task is a
``SweepJob``: a picklable callable holding the run's ``RunOptions``; on the node it builds the same ``Runner`` the local
sweep builds and resumes the run's checkpoint when there is one. ``SweepJob.checkpoint`` is submitit's preemption /
time-out hook: submitit calls it on SLURM's signal, pickles what it returns and requeues the task, which then
continues from the last finished task (the runner saves a checkpoint after every task).

The jobs' files (submitit's pickles, logs, sbatch script) live in ``<results>/.sweeps/<suite>/`` (hidden, so record
readers skip it), with ``index.json``: each run (row label, method, dataset, scenario, seed, record file name) and the
SLURM job id of its last submission, written atomically. ``--status`` reads it and asks SLURM (``sacct``, through
submitit's ``job.state``) for the state of every run without a record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from submitit.helpers import Checkpointable, DelayedSubmission

from cilbench.errors import CilbenchError

INDEX_NAME = "index.json"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED", "CONFIGURING",
          "PREEMPTED", "RESIZING", "STAGE_OUT", "SIGNALING"}  # PREEMPTED: submitit requeues a checkpointable job
RUNNING = {"RUNNING", "COMPLETING"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "REVOKED",
          "SPECIAL_EXIT"}


class SweepJob(Checkpointable):
    """One run of a sweep as a SLURM task: the run's options, resumed from its checkpoint when one exists."""

    def __init__(self, opts: Any, restart: bool = False, plugins: tuple[str, ...] = ()):
        self.opts = opts  # cilbench.plan.RunOptions (out and cache_dir absolute)
        self.restart = restart  # start an unfinished run over once (sweep --restart); a requeued job resumes
        self.plugins = tuple(plugins)
        self.requeues = 0

    def __call__(self) -> str:
        from cilbench.data.user_catalog import use_cache
        from cilbench.engine.runner import Runner
        from cilbench.plugins import request

        if self.plugins:
            request([Path(p) for p in self.plugins])
        use_cache(self.opts.cache_dir)
        runner = Runner(dataclasses.replace(self.opts), restart_hint="resubmit with cilbench sweep --restart")
        if runner.existing_record_is_ours():
            print(f"cilbench: {runner.record_path} exists already", flush=True)
            return str(runner.record_path)
        runner.opts.resume = not self.restart and runner.checkpoint.exists()
        print(f"cilbench: {'resuming' if runner.opts.resume else 'running'} {runner.record_path.name}", flush=True)
        runner.run()
        print(f"cilbench: wrote {runner.record_path}", flush=True)
        return str(runner.record_path)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """submitit's preemption / time-out hook: requeue this run; it resumes from the runner's last checkpoint
        (saved after every task), never starting over."""
        again = SweepJob(self.opts, restart=False, plugins=self.plugins)
        again.requeues = self.requeues + 1
        return DelayedSubmission(again, *args, **kwargs)


@dataclass
class SlurmResources:
    partition: str | None = None
    gpus_per_job: int = 1
    cpus: int | None = None
    mem: str | None = None
    time: int = 240  # minutes
    array_parallelism: int = 256
    account: str | None = None
    qos: str | None = None

    def parameters(self, suite: str) -> dict[str, Any]:
        params: dict[str, Any] = {"job_name": f"cilbench-{suite}", "time": self.time,
                                  "array_parallelism": self.array_parallelism}
        if self.gpus_per_job:
            params["gres"] = f"gpu:{self.gpus_per_job}"
        for key, value in (("partition", self.partition), ("cpus_per_task", self.cpus), ("mem", self.mem),
                           ("account", self.account), ("qos", self.qos)):
            if value is not None:
                params[key] = value
        return params

    def check(self) -> None:
        if self.gpus_per_job < 0 or (self.cpus is not None and self.cpus < 1) or self.time < 1 \
                or self.array_parallelism < 1:
            raise CilbenchError("--gpus-per-job must be 0 or more, and --cpus, --time (minutes) and "
                                "--array-parallelism 1 or more")


def jobs_folder(results: Path, suite_name: str) -> Path:
    return Path(results).resolve() / ".sweeps" / suite_name


def check_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun", "sacct") if shutil.which(tool) is None]
    if missing:
        raise CilbenchError(f"--executor slurm needs SLURM's {' and '.join(missing)} on PATH (run it on the "
                            f"cluster's login node), or run the sweep on this machine with --executor local")


def read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_NAME
    if not path.is_file():
        return {"runs": {}}
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict):
            raise ValueError
        return doc
    except (OSError, ValueError):
        raise CilbenchError(f"{path} is not a readable sweep index; move it away to start the index over") from None


def write_index(folder: Path, index: dict[str, Any]) -> None:
    from cilbench.utils import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / INDEX_NAME, index)


@dataclass
class RunState:
    row: str
    method: str
    dataset: str
    scenario: str
    seed: int
    record: str  # the record's file name ("" when the run cannot be built)
    state: str  # done | missing | queued | running | failed
    job_id: str = ""
    message: str = ""
    opts: Any = None

    def where(self) -> str:
        return f"{self.row} ({self.method}) on {self.dataset} {self.scenario} seed {self.seed}"


def plan(suite, results: Path, quick: bool, device: str, cache_dir: Path | None) -> list[RunState]:
    """Every run of the suite with its record name and whether the record exists (done) or not (missing)."""
    from cilbench.engine.runner import Runner
    from cilbench.suites import run_options

    out = []
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else None
    for row, col, seed in suite.runs():
        opts = run_options(suite, row, col, seed, Path(results).resolve(), quick, device, cache)
        try:
            runner = Runner(opts, restart_hint="run the sweep again with --restart")
        except CilbenchError as err:
            out.append(RunState(row.label, row.method, col.dataset, col.scenario, seed, "", "failed",
                                message=f"cannot run: {err}"))
            continue
        state = "done" if runner.existing_record_is_ours() else "missing"
        out.append(RunState(row.label, row.method, col.dataset, col.scenario, seed, runner.record_path.name, state,
                            opts=opts))
    return out


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    return lines[-1].removeprefix("cilbench.errors.")[:300] if lines else ""


def _error_line(job) -> str:
    """The last line of the job's stderr, where submitit writes a failing job's traceback. Submitit's result pickle
    is never loaded: reading a results folder must not run code from it (a pickle can)."""
    try:
        return _last_line(job.stderr())
    except Exception:  # noqa: BLE001 - logs may be gone; the state still shows
        return ""


def job_states(folder: Path, states: list[RunState]) -> list[RunState]:
    """Fill in queued / running / failed for the runs without a record that were submitted (one ``sacct`` call)."""
    from submitit.slurm.slurm import SlurmJob

    runs = read_index(folder)["runs"]
    SlurmJob.watcher.clear()  # another command in this process may have cached older states
    jobs = {}
    for st in states:
        entry = runs.get(st.record)
        if st.state == "missing" and entry:
            st.job_id = str(entry["job_id"])
            jobs[st.record] = SlurmJob(folder=folder, job_id=st.job_id)
    if not jobs:
        return states
    SlurmJob.watcher.update()
    for st in states:
        job = jobs.get(st.record)
        if job is None:
            continue
        slurm_state = job.watcher.get_state(job.job_id, mode="cache").split()[0] if job.job_id else "UNKNOWN"
        if job.paths.result_pickle.exists():  # submitit's own outcome: the job ended
            st.state = "failed"
            st.message = _error_line(job) or "the job ended without writing the record"
        elif slurm_state in RUNNING:
            st.state = "running"
        elif slurm_state in QUEUED or slurm_state == "UNKNOWN" and not job.paths.stderr.exists():
            st.state = "queued"
        elif slurm_state == "UNKNOWN":  # it started (it has a log) but sacct no longer knows it: it died
            st.state = "failed"
            st.message = "SLURM no longer knows the job: " + (_error_line(job) or "no error in the job's log")
        elif slurm_state in FAILED or slurm_state == "COMPLETED":
            st.state = "failed"
            st.message = f"{slurm_state}: " + (_error_line(job) or "no error in the job's log")
        else:
            st.state, st.message = "queued", f"SLURM state {slurm_state}"
        if st.state == "failed" and not st.message:
            st.message = slurm_state
    return states


def submit(suite, states: list[RunState], folder: Path, resources: SlurmResources, restart: bool = False,
           plugins: tuple[str, ...] = ()) -> list[RunState]:
    """Submit the given runs as ONE job array and note each run's job id in the index."""
    import submitit

    todo = [st for st in states if st.opts is not None]
    if not todo:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(**resources.parameters(suite.name))
    try:
        with ex.batch():
            jobs = [ex.submit(SweepJob(st.opts, restart, plugins)) for st in todo]
    except Exception as err:  # noqa: BLE001 - sbatch refused: one line, nothing noted in the index
        text = " ".join(str(err).split())
        raise CilbenchError(f"submitting the job array failed: {text[:300]}") from None
    index = read_index(folder)
    index["suite"] = suite.name
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for st, job in zip(todo, jobs):
        st.job_id, st.state, st.message = str(job.job_id), "queued", ""
        index["runs"][st.record] = dict(row=st.row, method=st.method, dataset=st.dataset, scenario=st.scenario,
                                        seed=st.seed, record=st.record, job_id=st.job_id,
                                        submitted_at=now)
    write_index(folder, index)
    return todo


def status_lines(states: list[RunState], escape: Callable[[str], str] = lambda s: s) -> list[str]:
    lines = []
    for st in states:
        job = escape(f" [job {st.job_id}]") if st.job_id and st.state != "done" else ""
        msg = f": {escape(st.message)}" if st.message else ""
        lines.append(f"{st.state:8} {escape(st.where())} -> {escape(st.record or '-')}{job}{msg}")
    counts = {k: sum(st.state == k for st in states) for k in ("done", "queued", "running", "failed", "missing")}
    lines.append(", ".join(f"{n} {k}" for k, n in counts.items()))
    return lines
