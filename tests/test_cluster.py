"""Sweeps on a cluster (``sweep --executor slurm``) against fake SLURM tools: what is submitted, how jobs run,
fail, are retried and resume after preemption. No real SLURM: ``sbatch``/``sacct``/``squeue``/``scancel``/``srun``/
``scontrol`` are small scripts on PATH, and a job is run in-process the way submitit's ``_submit`` entry runs it."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

SUITE = """title: tiny cluster
paper: cicae
table: I
columns:
  - {dataset: synthetic, scenario: B0Inc10}
rows:
  - {label: SimpleCIL, method: simplecil}
  - {label: Finetune, method: finetune}
  - {label: previous best}
"""

SBATCH = r'''
import json, os, sys
log = os.environ["FAKE_SLURM_LOG"]
script = open(sys.argv[-1]).read()
flags = dict(line[len("#SBATCH --"):].split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH --")
             and "=" in line)
n = sum(1 for _ in open(os.path.join(log, "sbatch.jsonl"))) if os.path.exists(os.path.join(log, "sbatch.jsonl")) else 0
job = 100 + n
with open(os.path.join(log, "sbatch.jsonl"), "a") as f:
    f.write(json.dumps({"job": str(job), "flags": flags, "script": script}) + "\n")
print(f"Submitted batch job {job}")
'''

SACCT = r'''
import json, os, sys
log = os.environ["FAKE_SLURM_LOG"]
path = os.path.join(log, "states.json")
states = json.load(open(path)) if os.path.exists(path) else {}
asked = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for jid, state in states.items():
    if jid.split("_")[0] in asked:
        print(f"{jid}|{state}|node1")
        print(f"{jid}.batch|{state}|node1")
'''

RECORD = r'''
import json, os, sys
with open(os.path.join(os.environ["FAKE_SLURM_LOG"], "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\n")
'''


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """Fake SLURM tools on PATH; ``slurm.log`` holds what they were asked, ``states.json`` what sacct answers."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm-log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("sbatch", SBATCH), ("sacct", SACCT), ("squeue", SACCT), ("scancel", RECORD),
                       ("srun", RECORD), ("scontrol", RECORD)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    from submitit.slurm.slurm import SlurmJob

    SlurmJob.watcher.clear()

    class Slurm:
        def __init__(self):
            self.log = log

        def submissions(self) -> list[dict]:
            path = log / "sbatch.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        def set_states(self, states: dict[str, str]) -> None:
            path = log / "states.json"
            old = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**old, **states}))

        def calls(self) -> list[list[str]]:
            path = log / "calls.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return Slurm()


def run_job(monkeypatch, folder: Path, job_id: str, preempt_after_first_task: bool = False) -> None:
    """Run one job as its sbatch script would (``python -m submitit.core._submit FOLDER`` under srun with SLURM's
    environment), in this process: submitit loads the job's pickle, runs it and pickles the outcome. ``job_id`` is
    ``ARRAY_TASK`` for an array task, a plain id for a single job. ``preempt_after_first_task``: SLURM's preemption
    signal (submitit's USR2) arrives once the first task's checkpoint is saved."""
    from submitit.core import submission

    from cilbench.engine import checkpoint as ckpt_module

    array, _, task = job_id.partition("_")
    env = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=str(1000 + int(task)) if task else job_id, SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="node1", SUBMITIT_FOLDER=str(folder))
    if task:
        env.update(SLURM_ARRAY_JOB_ID=array, SLURM_ARRAY_TASK_ID=task)
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        if not task:
            m.delenv("SLURM_ARRAY_JOB_ID", raising=False)
            m.delenv("SLURM_ARRAY_TASK_ID", raising=False)
        if preempt_after_first_task:
            save = ckpt_module.Checkpoint.save

            def save_then_preempt(self, meta, *args, **kwargs):
                path = save(self, meta, *args, **kwargs)
                if meta["next_task"] == 1:
                    os.kill(os.getpid(), signal.SIGUSR2)
                return path

            m.setattr(ckpt_module.Checkpoint, "save", save_then_preempt)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2)}
        try:
            submission.process_job(folder)
        except Exception:  # noqa: BLE001 - a failing job raises after pickling its error, as on a node
            # where the uncaught error ends the process with its traceback on the job's stderr (srun --error)
            import traceback

            from submitit.core.utils import JobPaths

            with open(JobPaths(folder, job_id=job_id, task_id=0).stderr, "a") as log:
                log.write(traceback.format_exc())
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)


@pytest.fixture
def suite(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(SUITE)
    return path


def test_slurm_without_sbatch_is_one_line(cli, suite, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    res = cli("sweep", str(suite), "--results", str(tmp_path / "r"), "--quick", "--executor", "slurm")
    assert res.code != 0 and "needs SLURM's sbatch" in res.err and "--executor local" in res.err
    assert len([line for line in res.err.strip().splitlines() if line.strip()]) <= 2


def test_one_array_with_the_resources_then_records_and_table(cli, suite, tmp_path, slurm, monkeypatch):
    out = tmp_path / "results"
    dry = cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm", "--dry-run")
    assert dry.code == 0 and dry.out.count("would submit") == 2 and not slurm.submissions()
    local = cli("sweep", str(suite), "--results", str(out), "--quick", "--status")  # records only, no SLURM
    assert local.code == 0 and "0 done, 0 queued, 0 running, 0 failed, 2 missing" in local.out
    res = cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm", "--partition", "gpu",
              "--gpus-per-job", "2", "--cpus", "8", "--mem", "64G", "--time", "120", "--array-parallelism", "1",
              "--account", "lab", "--qos", "high")
    assert res.code == 0, res.err + res.out
    [sub] = slurm.submissions()
    flags = sub["flags"]
    assert flags["array"] == "0-1%1"  # two runs, one array, one at a time
    assert (flags["partition"], flags["gres"], flags["cpus-per-task"], flags["mem"], flags["time"],
            flags["account"], flags["qos"]) == ("gpu", "gpu:2", "8", "64G", "120", "lab", "high")
    assert "submitit.core._submit" in sub["script"] and "submitted job array 100: 2 runs" in res.out
    folder = out / ".sweeps" / "tiny"
    index = json.loads((folder / "index.json").read_text())["runs"]
    assert sorted((r["row"], r["job_id"]) for r in index.values()) == [("Finetune", "100_1"), ("SimpleCIL", "100_0")]
    assert all(r["dataset"] == "synthetic" and r["seed"] == 1993 for r in index.values())

    slurm.set_states({"100_0": "PENDING", "100_1": "RUNNING"})
    st = cli("sweep", str(suite), "--results", str(out), "--quick", "--status", "--executor", "slurm")
    assert st.code == 0 and "0 done, 1 queued, 1 running, 0 failed, 0 missing" in st.out
    again = cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm")
    assert again.code == 0 and "nothing to submit" in again.out and len(slurm.submissions()) == 1

    for job_id in ("100_0", "100_1"):
        run_job(monkeypatch, folder, job_id)
    slurm.set_states({"100_0": "COMPLETED", "100_1": "COMPLETED"})
    st = cli("sweep", str(suite), "--results", str(out), "--quick", "--status", "--executor", "slurm")
    assert st.code == 0 and "2 done, 0 queued, 0 running, 0 failed, 0 missing" in st.out, st.out
    assert len(list(out.glob("*.json"))) == 2
    table = cli("table", "--benchmark", str(suite), "--results", str(out), "--quick", "--format", "markdown")
    assert table.code == 0 and "| SimpleCIL [quick] |" in table.out and "| Finetune [quick] |" in table.out
    local = cli("sweep", str(suite), "--results", str(out), "--quick")  # the local path sees the same records
    assert local.code == 0 and "2 already done, 0 ran, 0 failed" in local.out


def test_failed_job_shows_its_error_and_retry_resubmits_only_it(cli, suite, tmp_path, slurm, monkeypatch):
    out = tmp_path / "results"
    assert cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm").code == 0
    folder = out / ".sweeps" / "tiny"
    from cilbench.engine import runner as runner_module

    run = runner_module.Runner.run

    def finetune_breaks(self, *args, **kwargs):
        if self.opts.method == "finetune":
            raise RuntimeError("CUDA out of memory on the node")
        return run(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(runner_module.Runner, "run", finetune_breaks)
        run_job(monkeypatch, folder, "100_0")
        run_job(monkeypatch, folder, "100_1")
    slurm.set_states({"100_0": "COMPLETED", "100_1": "FAILED"})
    st = cli("sweep", str(suite), "--results", str(out), "--quick", "--status", "--executor", "slurm")
    assert "1 done, 0 queued, 0 running, 1 failed, 0 missing" in st.out
    [line] = [ln for ln in st.out.splitlines() if ln.startswith("failed")]
    assert "Finetune" in line and "[job 100_1]" in line and "RuntimeError: CUDA out of memory on the node" in line
    plain = cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm")
    assert plain.code == 1 and "--retry-failed" in plain.out and len(slurm.submissions()) == 1  # never dropped
    retry = cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm", "--retry-failed")
    assert retry.code == 0, retry.out + retry.err
    subs = slurm.submissions()
    assert len(subs) == 2 and "array" not in subs[1]["flags"]  # only the failed run: a single job, no array
    index = json.loads((folder / "index.json").read_text())["runs"]
    assert sorted(r["job_id"] for r in index.values()) == ["100_0", "101"]
    run_job(monkeypatch, folder, "101")
    slurm.set_states({"101": "COMPLETED"})
    st = cli("sweep", str(suite), "--results", str(out), "--quick", "--status", "--executor", "slurm")
    assert "2 done, 0 queued, 0 running, 0 failed, 0 missing" in st.out


def test_preempted_job_requeues_and_resumes_to_the_same_record(cli, suite, tmp_path, slurm, monkeypatch, capsys):
    one = tmp_path / "one.yaml"
    one.write_text(SUITE.replace("  - {label: Finetune, method: finetune}\n", ""))
    out = tmp_path / "results"
    assert cli("sweep", str(one), "--results", str(out), "--quick", "--executor", "slurm").code == 0
    folder = out / ".sweeps" / "one"
    from cilbench.cluster import SweepJob

    calls = []
    checkpoint = SweepJob.checkpoint
    monkeypatch.setattr(SweepJob, "checkpoint", lambda self, *a, **k: calls.append(1) or checkpoint(self, *a, **k))
    with pytest.raises(SystemExit):  # submitit's handler: checkpoint, requeue, exit
        run_job(monkeypatch, folder, "100", preempt_after_first_task=True)
    assert calls == [1]
    assert ["scontrol", "requeue", "100"] in slurm.calls()
    from submitit.core.utils import DelayedSubmission

    requeued = DelayedSubmission.load(folder / "100_submitted.pkl")  # what the requeued job will run
    assert isinstance(requeued.function, SweepJob) and requeued.function.requeues == 1
    assert not list(out.glob("*.json")) and list((out / ".checkpoints").glob("*"))
    slurm.set_states({"100": "PENDING"})
    st = cli("sweep", str(one), "--results", str(out), "--quick", "--status", "--executor", "slurm")
    assert "0 done, 1 queued" in st.out
    capsys.readouterr()
    run_job(monkeypatch, folder, "100")  # the requeued job: resumes after the first task
    assert "cilbench: resuming" in capsys.readouterr().out
    [record] = out.glob("*.json")
    resumed = json.loads(record.read_text())
    straight = tmp_path / "straight"
    assert cli("run", "simplecil", "--dataset", "synthetic", "--scenario", "B0Inc10", "--quick", "--out",
               str(straight)).code == 0
    [plain] = straight.glob("*.json")
    straight_record = json.loads(plain.read_text())
    assert len(resumed["accuracy_matrix"]) > 1 and straight_record["accuracy_matrix"] == resumed["accuracy_matrix"]
    assert straight_record["metrics"] == resumed["metrics"]


def test_job_killed_by_slurm_shows_its_state_and_log_line(cli, suite, tmp_path, slurm):
    out = tmp_path / "results"
    assert cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm").code == 0
    folder = out / ".sweeps" / "tiny"
    # killed without a Python error (no result pickle): the state and the last line of the job's stderr
    (folder / "100_1_0_log.err").write_text("starting\nslurmstepd: error: Detected 1 oom_kill event in StepId=100\n")
    slurm.set_states({"100_0": "PREEMPTED", "100_1": "OUT_OF_MEMORY"})
    st = cli("sweep", str(suite), "--results", str(out), "--quick", "--status", "--executor", "slurm")
    assert st.code == 0 and "0 done, 1 queued, 0 running, 1 failed, 0 missing" in st.out
    [line] = [ln for ln in st.out.splitlines() if ln.startswith("failed")]
    assert "OUT_OF_MEMORY: slurmstepd: error: Detected 1 oom_kill event" in line


class _Planted:
    """A pickle that would leave a file behind if anything loaded it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_status_never_loads_a_pickle_from_the_results_folder(cli, suite, tmp_path, slurm):
    import pickle

    out = tmp_path / "results"
    assert cli("sweep", str(suite), "--results", str(out), "--quick", "--executor", "slurm").code == 0
    folder = out / ".sweeps" / "tiny"
    marker = tmp_path / "ran"
    (folder / "100_0_result.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    slurm.set_states({"100_0": "COMPLETED", "100_1": "PENDING"})
    st = cli("sweep", str(suite), "--results", str(out), "--quick", "--status", "--executor", "slurm")
    assert not marker.exists()  # the job's outcome comes from SLURM's state and the job's log, never a pickle
    assert "0 done, 1 queued, 0 running, 1 failed" in st.out and "failed   SimpleCIL" in st.out


def test_a_paper_suite_goes_out_as_one_array_of_its_missing_runs(cli, tmp_path, slurm):
    """MoE-Adapters Table 3 as shipped: every row with a method (7) x every column (10 / 20 / 50 steps) is one task
    of one array, with the resources asked for; the rows the paper only quotes are not runs."""
    out = tmp_path / "results"
    res = cli("sweep", "moe-adapters-table3", "--results", str(out), "--executor", "slurm", "--partition", "a100",
              "--gpus-per-job", "1", "--cpus", "16", "--mem", "96G", "--time", "600", "--array-parallelism", "8")
    assert res.code == 0, res.err + res.out
    [sub] = slurm.submissions()
    assert sub["flags"]["array"] == "0-20%8"
    assert (sub["flags"]["partition"], sub["flags"]["gres"], sub["flags"]["mem"]) == ("a100", "gpu:1", "96G")
    runs = json.loads((out / ".sweeps" / "moe-adapters-table3" / "index.json").read_text())["runs"].values()
    assert {r["row"] for r in runs} == {"CLIP Zero-shot", "Fine-tune", "LwF", "iCaRL", "LwF-VR", "ZSCL", "Ours"}
    assert {(r["dataset"], r["scenario"]) for r in runs} == {("cifar100", s) for s in ("B0Inc10", "B0Inc5", "B0Inc2")}
    st = cli("sweep", "moe-adapters-table3", "--results", str(out), "--status", "--executor", "slurm")
    assert st.code == 0 and "0 done, 21 queued, 0 running, 0 failed, 0 missing" in st.out, st.out
    assert st.out.count("queued   ") == 21 and "[job 100_20]" in st.out
