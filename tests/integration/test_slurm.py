"""The slurm/ scripts on a REAL SLURM cluster: slurmctld + two slurmd ("nodes" n1, n2) on this machine.

Needs the Debian packages slurmctld, slurmd, slurm-client and munge, and root (DESIGN.md §4).
Skipped only when those are missing and PROMPTKD_SLURM_TESTS is unset (or 0); .ci/run sets it, so CI fails instead.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from promptkd.training import checkpoint  # noqa: E402
from tests.fixtures.tiny_run import write_tiny_run  # noqa: E402
from promptkd.training.signals import EXIT_PREEMPTED  # noqa: E402

STEPS = 24
SAVE_INTERVAL = 4
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
CLIENTS = ("sinfo", "sbatch", "scontrol", "scancel", "squeue")
DAEMONS = ("slurmctld", "slurmd", "munged")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _require_slurm() -> None:
    missing = [b for b in CLIENTS + DAEMONS if _which(b) is None]
    if missing:
        reason = f"SLURM binaries missing: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
    elif os.geteuid() != 0:
        reason = "the SLURM test cluster needs root (SlurmUser=root, munged started via runuser)"
    else:
        return
    if os.environ.get("PROMPTKD_SLURM_TESTS", "") not in ("", "0"):
        pytest.fail(f"PROMPTKD_SLURM_TESTS is set but {reason}")
    pytest.skip(reason)


def _client_env(conf: str, **extra: str) -> dict[str, str]:
    """This cluster's SLURM_CONF, and nothing inherited that would make the launcher skip the SLURM mapping."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PROMPTKD_ROOT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in drop}
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHON=sys.executable, PATH=SBIN_PATH)
    env.update(extra)
    return env


class Cluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = _client_env(self.conf)
        self.started: list[tuple[str, str]] = []  # (name, pid file) of the daemons this fixture started

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def log_tail(self) -> str:
        out = []
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".log"):
                with open(os.path.join(self.root, name)) as fh:
                    out.append(f"--- {name}\n" + "".join(fh.readlines()[-15:]))
        return "\n".join(out)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_hardware() -> str:
    """`slurmd -C`'s node line without its name and uptime, e.g. 'CPUs=2 Boards=1 ... RealMemory=24105'."""
    first = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    return " ".join(t for t in first.split() if not t.startswith(("NodeName=", "UpTime=")))


def _write_conf(root: str) -> str:
    host = socket.gethostname().split(".")[0]
    ctld, p1, p2 = _free_ports(3)
    hw = _node_hardware()
    conf = f"""# promptkd test cluster (DESIGN.md §4): one controller, two slurmd on this host
ClusterName=promptkdtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# sbatch --wait polls after 2, 10, 42 s unless MinJobAge is small (then every 8 s): 30 s less per job
MinJobAge=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} {hw}
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} {hw}
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""
    os.makedirs(os.path.join(root, "state"), exist_ok=True)
    path = os.path.join(root, "slurm.conf")
    with open(path, "w") as fh:
        fh.write(conf)
    return path


def _munge_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


def _start_munge(cluster: Cluster) -> None:
    if _munge_running():
        return  # a system munged (or another session's) serves this one too
    if not os.path.exists("/etc/munge/munge.key"):
        cluster.run("runuser", "-u", "munge", "--", _which("mungekey") or "mungekey", "--create")
    cluster.run("install", "-d", "-o", "munge", "-g", "munge", "/run/munge")
    cluster.run("runuser", "-u", "munge", "--", _which("munged"))
    cluster.started.append(("munged", "/run/munge/munged.pid"))


def _stop(cluster: Cluster) -> None:
    """Cancel this cluster's jobs, then stop the daemons this fixture started, by their pids."""
    try:
        cluster.run("scancel", "--full", "--partition=test", check=False, timeout=20)
        deadline = time.time() + 60
        while time.time() < deadline and cluster.run("squeue", "-h", check=False, timeout=20).stdout.strip():
            time.sleep(1)
    except (subprocess.SubprocessError, OSError):
        pass
    pids = []
    for _, pid_file in reversed(cluster.started):
        try:
            with open(pid_file) as fh:
                pids.append(int(fh.read().strip()))
            os.kill(pids[-1], signal.SIGTERM)
        except (OSError, ValueError):
            pass
    deadline = time.time() + 15
    for pid in pids:
        try:
            while time.time() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    _require_slurm()
    c = Cluster(str(tmp_path_factory.mktemp("slurm")))
    _write_conf(c.root)
    try:
        _start_munge(c)
        c.run(_which("slurmctld"), "-f", c.conf)
        c.started.append(("slurmctld", os.path.join(c.root, "slurmctld.pid")))
        for node in ("n1", "n2"):
            c.run(_which("slurmd"), "-f", c.conf, "-N", node)
            c.started.append((f"slurmd {node}", os.path.join(c.root, f"slurmd-{node}.pid")))
        deadline = time.time() + 60
        while c.run("sinfo", "-h", "-o", "%D %T", check=False).stdout.strip() != "2 idle":
            assert time.time() < deadline, "the test cluster never became idle\n" + c.log_tail()
            time.sleep(0.5)
        yield c
    finally:
        _stop(c)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer, data and a tiny PromptKD config (2 ranks on CPU, a few seconds of training)."""
    root = tmp_path_factory.mktemp("slurm_runs")
    cfg = write_tiny_run(root, STEPS, SAVE_INTERVAL)
    return root, cfg


def _steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _export(out) -> dict[str, torch.Tensor]:
    weights = load_file(str(out / "export" / "model.safetensors"))
    weights["prompt"] = load_file(str(out / "export" / "teacher_prompt" / "teacher_prompt.safetensors"))["prompt"]
    return weights


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny):
    """Test A's job: `sbatch --wait` of slurm/distill.sbatch on 2 nodes x 1 CPU task, submitted from outside
    the repo (the script must find the repo itself; its log goes to the default %x-%j.out there)."""
    root, cfg = tiny
    out = root / "uninterrupted"
    start = time.time()
    proc = cluster.run("sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                       os.path.join(REPO, "slurm", "distill.sbatch"), "--config", str(cfg), f"output.dir={out}",
                       check=False, cwd=str(root), timeout=600)
    elapsed = time.time() - start
    job_id = proc.stdout.strip().split(";")[0]
    log = root / f"promptkd-distill-{job_id}.out"
    info = cluster.job(job_id)
    print(f"\n[test_slurm] uninterrupted job {job_id}: {elapsed:.1f} s wall (sbatch --wait); submit "
          f"{info.get('SubmitTime')} start {info.get('StartTime')} end {info.get('EndTime')}")
    return proc, out, log, elapsed


def test_distill_sbatch_runs_two_nodes(cluster, uninterrupted):
    proc, out, log, _ = uninterrupted
    text = log.read_text() if log.exists() else "(no job log)"
    assert proc.returncode == 0, f"sbatch --wait -> {proc.returncode}\n{proc.stderr}\n{text[-4000:]}"
    assert "2 task(s) on n[1-2]" in text, text[-3000:]
    assert re.search(r"world size 2\b", text), text[-3000:]
    assert "output.resume=auto" in text  # always passed, so a requeue resumes on its own
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "teacher_prompt" / "teacher_prompt.safetensors").is_file()
    assert checkpoint.latest(str(out)) == str(out / "checkpoints" / f"step_{STEPS}")
    assert _steps_logged(out) == list(range(1, STEPS + 1))


def test_eval_sbatch_evaluates_the_export(cluster, tiny, uninterrupted):
    root, _ = tiny
    _, out, _, _ = uninterrupted
    assert (out / "export").is_dir(), "needs the distill job's export"
    # submitted and followed with scontrol: sbatch --wait's polling adds ~10 s
    proc = cluster.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                       os.path.join(REPO, "slurm", "eval.sbatch"), "--config", str(out / "config.yaml"),
                       f"output.dir={root / 'eval_run'}", f"eval.model_path={out / 'export'}",
                       f"eval.file={root / 'data' / 'test.jsonl'}", "eval.max_examples=4", "eval.seeds=[10]",
                       "eval.max_new_tokens=8", cwd=str(root), timeout=60)
    job_id = proc.stdout.strip().split(";")[0]
    log = root / f"promptkd-eval-{job_id}.out"
    info: dict[str, str] = {}
    _wait_for("the eval job", lambda: info.update(cluster.job(job_id)) or info.get("JobState") in FINAL_STATES, 300,
              cluster, job_id, log)
    text = log.read_text() if log.exists() else "(no job log)"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{text[-4000:]}"
    assert "2 task(s) on n[1-2]" in text and "stage=eval" in text
    results = json.loads((root / "eval_run" / "eval" / "results.json").read_text())
    scored = [d for d in _dicts(results) if "rougeL" in d and "n" in d]
    assert scored and all(d["n"] == 4 for d in scored), results  # eval.max_examples reached the launcher


def _dicts(obj):
    if isinstance(obj, dict):
        yield obj
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            yield from _dicts(item)


def _wait_for(what: str, predicate, timeout: float, cluster: Cluster, job_id: str, log) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            state = cluster.job(job_id)
            tail = log.read_text()[-4000:] if log.exists() else "(no job log)"
            pytest.fail(f"timed out waiting for {what}; job {state.get('JobState')}\n{tail}\n{cluster.log_tail()}")
        time.sleep(0.25)


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tiny, uninterrupted):
    """USR1 to the batch shell -> forwarded to the step -> checkpoint, exit 75 -> scontrol requeue ->
    the same command resumes (SLURM_RESTART_COUNT=1) and ends exactly like the uninterrupted run."""
    root, cfg = tiny
    out, log = root / "preempted", root / "preempted.out"
    start = time.time()
    # submitted the other way: the script run outside a job submits itself, sized by NODES / GPUS_PER_NODE
    env = _client_env(cluster.conf, NODES="2", GPUS_PER_NODE="0", TASKS_PER_NODE="1", SBATCH_OUTPUT=str(log))
    sub = cluster.run("bash", os.path.join(REPO, "slurm", "distill.sbatch"), "--config", str(cfg),
                      f"output.dir={out}", env=env, cwd=str(root))
    job_id = re.search(r"Submitted batch job (\d+)", sub.stdout).group(1)

    _wait_for("the first checkpoint", lambda: checkpoint.latest(str(out)) is not None, 240, cluster, job_id, log)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    states: list[str] = []
    info: dict[str, str] = {}

    def finished() -> bool:
        info.clear()
        info.update(cluster.job(job_id))  # the last record seen: MinJobAge purges it soon after the end
        if not states or states[-1] != info.get("JobState"):
            states.append(info.get("JobState", "?"))
        return info.get("JobState") in FINAL_STATES

    _wait_for("the requeued job to finish", finished, 400, cluster, job_id, log)
    elapsed = time.time() - start
    text = log.read_text()
    print(f"\n[test_slurm] preempted job {job_id}: {elapsed:.1f} s wall, states {' -> '.join(states)}")

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    assert info["Restarts"] == "1", info
    assert "PENDING" in states[states.index("RUNNING"):], f"the job was not requeued: {states}"
    assert "got USR1" in text and f"step exited with code {EXIT_PREEMPTED}" in text, text[-4000:]
    assert f"scontrol requeue {job_id}" in text
    assert f"job {job_id} restart 1:" in text, text[-4000:]  # SLURM_RESTART_COUNT=1 in the requeued run
    stopped = re.search(r"resumed from \S+/checkpoints/step_(\d+)", text)
    assert stopped, f"the requeued run did not resume\n{text[-4000:]}"
    k = int(stopped.group(1))
    assert SAVE_INTERVAL <= k < STEPS, f"stopped at step {k}"
    assert (out / "checkpoints" / f"step_{k}" / checkpoint.MARKER).exists()

    # the same end as the uninterrupted run: every step logged once, the same final step and weights
    _, ref_out, _, _ = uninterrupted
    assert _steps_logged(out) == _steps_logged(ref_out) == list(range(1, STEPS + 1))
    assert os.path.basename(checkpoint.latest(str(out))) == os.path.basename(checkpoint.latest(str(ref_out))) \
        == f"step_{STEPS}"
    ref, got = _export(ref_out), _export(out)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), f"{name} differs from the uninterrupted run after preemption"
