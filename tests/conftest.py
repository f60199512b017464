import pytest
import torch

torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True)
def _seed():
    torch.set_default_dtype(torch.float64)  # again, in case a test changed it
    torch.manual_seed(0)
