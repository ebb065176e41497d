"""``promptkd.distributed.init`` returns on a rank only once every rank's process group is up.

Gloo connects its mesh pair by pair: without a barrier, a fast rank could leave init, stop on bad input
(exit 2) and close its sockets while a slow rank is still connecting, which then dies inside its own init
with a traceback instead of printing the same one-line error (seen in
``tests/integration/test_bad_inputs.py::test_world_size_larger_than_dataset_two_ranks`` under load).
The race itself does not reproduce on demand, so this checks the rule with a stand-in process group.
"""
from __future__ import annotations

import pytest
import torch

from promptkd import distributed as dist


@pytest.mark.parametrize("world", [1, 2, 8])
def test_init_waits_for_every_rank_before_returning(monkeypatch, world):
    import deepspeed

    calls: list[str] = []
    state = {"up": False}

    def init_distributed(**_kw):
        calls.append("init_process_group")
        state["up"] = True

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.distributed, "barrier", lambda **_kw: calls.append("barrier"))
    monkeypatch.setattr(dist, "_prepare_env", lambda: None)  # it would write RANK & co. into this process's env
    monkeypatch.setattr(dist, "_limit_cpu_threads", lambda n: calls.append("threads"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dist.init(60)
    assert calls == ["init_process_group", *(["barrier"] if world > 1 else []), "threads"]
