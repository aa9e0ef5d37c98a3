import os
from pathlib import Path

# Triton's interpreter runs the MISA Triton kernel on CPU tensors (tests/test_misa.py). Triton reads this when it
# is imported, so it is set before anything imports it; vLLM and torch keep Triton off on CPU either way.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RETROFIT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core
    machine two torch threads contend and run tiny models many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the evaluation data in {SHARED_DATA} (../shared/data beside the repo); absent here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from retrofit.models import load_model

    try:
        return load_model("default")
    except RuntimeError as e:  # package missing
        pytest.skip(str(e))
