"""The backend table: overrides by environment variable and context manager take effect
on the next call, even though the resolution is memoised for speed."""
import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm.backends import registry


def test_environment_override_applies_on_the_next_call(monkeypatch):
    default = registry.backend_for("cpu")
    monkeypatch.setenv("GROUPNORM_BACKEND_CPU", "reference")
    assert registry.backend_for("cpu").__name__ == "groupnorm.reference"
    monkeypatch.delenv("GROUPNORM_BACKEND_CPU")
    assert registry.backend_for("cpu") is default


def test_unknown_backend_name_is_refused_every_time(monkeypatch):
    monkeypatch.setenv("GROUPNORM_BACKEND_CPU", "no-such-backend")
    for _ in range(2):   # not memoised as a success
        with pytest.raises(ValueError, match="unknown groupnorm backend"):
            registry.backend_for("cpu")


def test_context_override_routes_calls(monkeypatch):
    calls = []
    reference = registry.load("reference")
    real = reference.forward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(reference, "forward", spy)
    x = torch.randn(2, 8, 5, 5)
    with registry.use_backend("reference", "cpu"):
        y = groupnorm.group_norm(x, 4)
    assert calls == [1]
    torch.testing.assert_close(y, F.group_norm(x, 4))
    groupnorm.group_norm(x, 4)   # outside the block: the default backend again
    assert calls == [1] or registry.backend_name("cpu") == "reference"


def test_cpu_backend_follows_environment_and_overrides(monkeypatch):
    """The everyday call's memo (registry.cpu_backend) gives backend_for's answer after
    every change: environment variable set and removed, override blocks in this thread
    and in another."""
    import threading

    default = registry.backend_for("cpu")
    assert registry.cpu_backend() is default
    monkeypatch.setenv("GROUPNORM_BACKEND_CPU", "reference")
    assert registry.cpu_backend().__name__ == "groupnorm.reference"
    monkeypatch.delenv("GROUPNORM_BACKEND_CPU")
    assert registry.cpu_backend() is default
    with registry.use_backend("reference", "cpu"):
        assert registry.cpu_backend().__name__ == "groupnorm.reference"
    assert registry.cpu_backend() is default
    entered, leave, seen = threading.Event(), threading.Event(), []

    def other_thread():
        with registry.use_backend("reference", "cpu"):
            seen.append(registry.cpu_backend().__name__)
            entered.set()
            leave.wait(10)

    worker = threading.Thread(target=other_thread)
    worker.start()
    entered.wait(10)
    try:
        assert registry.cpu_backend() is default   # the other thread's block is its own
    finally:
        leave.set()
        worker.join()
    assert seen == ["groupnorm.reference"]


@pytest.mark.parametrize("body,warns", [
    ("import groupnorm_missing_dependency_for_test", False),                         # a dependency: quiet
    ("from groupnorm.backends.numba_cpu.lanes import no_such_name", True),           # our own code: warn
])
def test_a_backend_that_fails_to_import_falls_back_and_says_so_when_the_fault_is_ours(
        tmp_path, monkeypatch, body, warns, recwarn):
    """A backend whose import fails is skipped (None); when the failure is inside
    groupnorm rather than a missing dependency, a RuntimeWarning names it."""
    (tmp_path / "groupnorm_probe_backend.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BACKENDS, "probe", "groupnorm_probe_backend")
    registry.load.cache_clear()
    try:
        assert registry.load("probe") is None
    finally:
        registry.load.cache_clear()
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert any("'probe' backend failed to import" in m and "no_such_name" in m for m in messages) is warns
    assert warns or not messages
