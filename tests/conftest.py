import pytest
import torch

torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True)
def _seed():
    torch.set_default_dtype(torch.float64)  # again, in case a test changed it
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small tensors and many steps: on a busy 2-core machine
    OpenMP's second thread only adds hand-off cost (a 64×64 float64 FFT measured 22 ms, not 21 µs).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
