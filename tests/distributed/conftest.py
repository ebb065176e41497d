"""One 2-rank launch of tests/distributed/scenarios.py for the whole session (every scenario but the pinned ones,
which run in a launch of their own: tests/distributed/test_multirank.py::pinned). The LoRA scenarios
(lora_scenarios.py) run in it too, last."""
import pytest

from tests.fixtures.pins import FUSED_SCENARIO, SCENARIO
from tests.fixtures.ranks import launch_scenarios


@pytest.fixture(scope="session")
def scenario_results(tmp_path_factory):
    """``load(name)``: each rank's result of scenario ``name`` (test_multirank, test_gather, test_device_ranks,
    test_lora_ranks)."""
    return launch_scenarios(tmp_path_factory.mktemp("multirank2"), skip=f"{SCENARIO},{FUSED_SCENARIO}",
                            timeout_s=1200)
