import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Bounded for CI (2 cores, < 15 min for the whole suite); "thorough" for the
# long soak recorded in the README. Select with HYPOTHESIS_PROFILE.
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("DIAGPASS_CI_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=int(os.environ.get("DIAGPASS_THOROUGH_EXAMPLES", "1000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread: tests are tiny, and OpenMP spin-waiting under any oversubscription
# (Inductor compile workers, a busy machine) slowed 2-thread runs by 50x here.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with empty Dynamo caches and counters."""
    import diagpass

    torch._dynamo.reset()
    diagpass.counters.clear()
    torch.manual_seed(0)  # unseeded draws in a test do not depend on the tests before it
    yield
    torch._dynamo.reset()
