"""SLURM task variables -> torch.distributed variables (promptkd.distributed.env_from_slurm)."""
from __future__ import annotations

import socket

import pytest

from promptkd import distributed as dist


@pytest.mark.parametrize("nodelist, first", [
    ("n[001-003,7],gpu5", "n001"),
    ("host", "host"),
    ("a1,b2", "a1"),
    ("gpu5,n[001-003]", "gpu5"),
    ("a[1-2],b[3-4]", "a1"),
    ("gpu-a[07,09]", "gpu-a07"),
    ("x[9]", "x9"),
])
def test_first_slurm_host(nodelist, first):
    assert dist._first_slurm_host(nodelist) == first


@pytest.fixture
def names(monkeypatch):
    """Name resolution under test control: only names in the table resolve; no scontrol call."""
    table = {"n001": "10.0.0.1", "10.1.2.3": "10.1.2.3"}
    looked_up = []

    def gethostbyname(host):
        if host not in table:
            raise socket.gaierror(host)
        return table[host]

    def node_addr(node):
        looked_up.append(node)
        return {"fake1": "10.1.2.3"}.get(node, "")

    monkeypatch.setattr(socket, "gethostbyname", gethostbyname)
    monkeypatch.setattr(dist, "_slurm_node_addr", node_addr)
    return looked_up


def slurm_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "2",
           "SLURM_NODEID": "2", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "n[001-003,7],gpu5"}
    env.update(extra)
    return env


def test_task_variables_map_to_rank_world_and_master(names):
    out = dist.env_from_slurm(slurm_env())
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert names == [], "a resolvable first host must not ask scontrol"


@pytest.mark.parametrize("job_id", ["0", "1", "19999", "20000", "39999", "123456", "4294967294"])
def test_master_port_comes_from_the_job_id_and_is_valid(names, job_id):
    port = int(dist.env_from_slurm(slurm_env(SLURM_JOB_ID=job_id))["MASTER_PORT"])
    assert 1024 < port < 65536 and port == 20000 + int(job_id) % 20000
    # every task of the job computes the same port; the next job gets another one
    assert port == int(dist.env_from_slurm(slurm_env(SLURM_JOB_ID=job_id, SLURM_PROCID="0"))["MASTER_PORT"])
    assert port != int(dist.env_from_slurm(slurm_env(SLURM_JOB_ID=str(int(job_id) + 1)))["MASTER_PORT"])


def test_variables_already_set_win(names):
    # torchrun / the deepspeed launcher inside an allocation: RANK is set, SLURM must not override anything
    assert dist.env_from_slurm(slurm_env(RANK="3", WORLD_SIZE="4")) == {}
    out = dist.env_from_slurm(slurm_env(MASTER_ADDR="1.2.3.4", MASTER_PORT="29500"))
    assert "MASTER_ADDR" not in out and "MASTER_PORT" not in out and out["RANK"] == "5"


def test_no_slurm_task_maps_nothing(names):
    assert dist.env_from_slurm({"SLURM_JOB_ID": "7", "PATH": "/bin"}) == {}


@pytest.mark.parametrize("spec, node_id, local", [
    ("2(x3)", "0", "2"), ("2(x3)", "2", "2"), ("4", "9", "4"),
    ("2(x2),1", "1", "2"), ("2(x2),1", "2", "1"), ("8,4(x2)", "0", "8"), ("8,4(x2)", "2", "4"),
])
def test_local_world_size_from_tasks_per_node(names, spec, node_id, local):
    assert dist.env_from_slurm(slurm_env(SLURM_NTASKS_PER_NODE=spec, SLURM_NODEID=node_id))["LOCAL_WORLD_SIZE"] == local


def test_local_world_size_without_ntasks_per_node(names):
    env = slurm_env(SLURM_STEP_TASKS_PER_NODE="3(x2),2", SLURM_TASKS_PER_NODE="9", SLURM_NODEID="2")
    del env["SLURM_NTASKS_PER_NODE"]
    assert dist.env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "2"  # the step's layout, this task's node
    del env["SLURM_STEP_TASKS_PER_NODE"], env["SLURM_TASKS_PER_NODE"]
    assert dist.env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "1"


def test_unresolvable_node_name_uses_its_slurm_node_addr(names):
    # several slurmd per host (or no DNS for node names): the NodeAddr from slurm.conf is reachable
    out = dist.env_from_slurm(slurm_env(SLURM_JOB_NODELIST="fake[1-2]"))
    assert out["MASTER_ADDR"] == "10.1.2.3" and names == ["fake1"]


def test_unresolvable_node_without_node_addr_keeps_the_name(names):
    out = dist.env_from_slurm(slurm_env(SLURM_JOB_NODELIST="a1,b2"))
    assert out["MASTER_ADDR"] == "a1" and names == ["a1"]


def test_nodelist_falls_back_to_slurm_nodelist(names):
    env = slurm_env(SLURM_NODELIST="host")
    del env["SLURM_JOB_NODELIST"]
    assert dist.env_from_slurm(env)["MASTER_ADDR"] == "host"


def test_slurm_node_addr_parses_scontrol(monkeypatch):
    import subprocess

    line = "NodeName=n1 Arch=x86_64 CoresPerSocket=2 NodeAddr=127.0.0.1 NodeHostName=vm Port=6818 State=IDLE\n"
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=line, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert dist._slurm_node_addr("n1") == "127.0.0.1"
    assert calls == [["scontrol", "show", "node", "-o", "n1"]]

    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(subprocess, "run", missing)
    assert dist._slurm_node_addr("n1") == ""


def _srun_lines() -> list[tuple[str, str]]:
    """(file, line) of every command line in slurm/*.sbatch and slurm/common.sh that runs srun."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "slurm"
    files = sorted(root.glob("*.sbatch")) + [root / "common.sh"]
    out = []
    for path in files:
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]  # comments may name srun freely
            if re.search(r"(^|[\s;&|(`$])srun(\s|$)", code):
                out.append((path.name, line.strip()))
    return out


def test_every_srun_kills_the_step_when_a_task_fails():
    # a dead rank must end the others at once, not leave them waiting for the NCCL timeout
    lines = _srun_lines()
    assert lines, "no srun line found: the scripts moved?"
    missing = [f"{name}: {line}" for name, line in lines if "--kill-on-bad-exit=1" not in line]
    assert not missing, missing
