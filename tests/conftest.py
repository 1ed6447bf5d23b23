import os

# Every stage's output checked against its contract (diagpass/ir/invariants.py).
os.environ.setdefault("DIAGPASS_CHECK_INVARIANTS", "1")

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
    """Every test starts with empty Dynamo caches, counters and step cache."""
    import diagpass

    from diagpass.runtime.segment_steps import clear_step_cache

    torch._dynamo.reset()
    diagpass.counters.clear()
    clear_step_cache()  # compiled steps are process-wide: a test's stubbed compile must not leak
    torch.manual_seed(0)  # unseeded draws in a test do not depend on the tests before it
    yield
    torch._dynamo.reset()


# --- the `transformers` marker -------------------------------------------------
# CI runs every test that builds a Hugging Face model a second time, on the
# older transformers line (4.46.3, `-m transformers` in a second venv). The
# marker is added here, not by hand: a test is transformers-dependent if its
# code, a fixture it uses, or a function of its own module it calls (followed
# transitively) uses a global defined in one of these modules (or names
# `transformers`). A test can also be marked explicitly.
_HF_MODULES = (
    "transformers", "diagpass.models.armt", "diagpass.models.rmt", "diagpass.models.hf_layers",
    "diagpass.models.generation", "diagpass.models.official_shapes",
)


def _from_hf_module(obj) -> bool:
    import types

    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    return isinstance(name, str) and any(name == m or name.startswith(m + ".") for m in _HF_MODULES)


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):  # nested functions, lambdas, comprehensions
            names |= _code_names(const)
    return names


def _uses_transformers(fn, seen: set) -> bool:
    fn = getattr(fn, "__wrapped__", fn)
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _code_names(code)
    if "transformers" in names:
        return True
    module_globals = getattr(fn, "__globals__", {})
    for name in names:
        obj = module_globals.get(name)
        if obj is not None and _from_hf_module(obj):
            return True
        if callable(obj) and getattr(obj, "__module__", None) == fn.__module__ and _uses_transformers(obj, seen):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("transformers"):
            continue
        seen: set = set()
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(_uses_transformers(f, seen) for f in [fn, *fixtures]):
            item.add_marker(pytest.mark.transformers)
