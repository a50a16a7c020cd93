import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Tiny transformers BLIP models (caption, retrieval, vqa) saved as folders, with the models."""
    from hf_tiny import save_hf
    root = tmp_path_factory.mktemp("hf")
    return {task: (root / task, save_hf(task, root / task, seed=i, scale=5.0))
            for i, task in enumerate(("caption", "retrieval", "vqa"))}
