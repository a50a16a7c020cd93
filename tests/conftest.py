import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _models_default_to_the_cpu():
    """The suite checks against references computed on the CPU, so a model loaded (or a training run started)
    without a device stays there even on a machine with a GPU, where it would otherwise pick CUDA;
    test_cuda.py asks for "cuda" by name."""
    from blip import factory
    patch = pytest.MonkeyPatch()
    original = factory.default_device
    patch.setattr(factory, "default_device", lambda device=None: original("cpu" if device is None else device))
    yield
    patch.undo()


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and two OpenMP threads crawl on a busy 2-core box); test files
    of tiny training runs use it for every test (pytestmark)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Tiny transformers BLIP models (caption, retrieval, vqa) saved as folders, with the models."""
    from hf_tiny import save_hf
    root = tmp_path_factory.mktemp("hf")
    return {task: (root / task, save_hf(task, root / task, seed=i, scale=5.0))
            for i, task in enumerate(("caption", "retrieval", "vqa"))}
