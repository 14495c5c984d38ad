import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

# Modules whose tests never run CBAM's compiled kernels. They run first, and on a machine that has
# not built the kernels yet one process builds them in the background meanwhile (a single compiler
# process for about a minute), instead of every worker waiting for the build in its first CBAM test.
KERNEL_FREE = {"test_config.py", "test_data.py", "test_readers.py", "test_report.py", "test_stats.py",
               "test_precision_parity.py", "test_cuda.py"}  # fmt: skip
_builder: subprocess.Popen | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _builder
    items.sort(key=lambda item: item.path.name not in KERNEL_FREE)  # stable: the same order in every worker
    worker = getattr(config, "workerinput", {}).get("workerid", "gw0")
    needed = any(item.path.name not in KERNEL_FREE for item in items)
    if worker == "gw0" and needed and os.environ.get("SMP_CBAM_KERNELS") != "0":
        code = "from smp_cbam.attention import kernels; kernels.available()"
        _builder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _builder is not None:
        _builder.wait()


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tests use small tensors: one intra-op thread is as fast, avoids OpenMP spin contention on a
    shared CPU, and matches the subprocesses that some tests compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["kernels", "eager"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a CBAM test with the compiled CPU kernels, then with the eager fused path."""
    from smp_cbam.attention import kernels

    if request.param == "kernels":
        if os.environ.get("SMP_CBAM_KERNELS") == "0":
            pytest.skip("kernels disabled by SMP_CBAM_KERNELS=0")
        assert kernels.available()
    else:
        monkeypatch.setattr(kernels, "available", lambda: False)
        monkeypatch.setattr(kernels, "extension", lambda: None)
    return request.param
