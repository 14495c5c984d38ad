import os
from collections.abc import Iterator

import pytest
import torch


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
    return request.param
