import sys
from pathlib import Path

import torch

# The tiny random-weight models of the library's tests (tests/tiny_models.py) also serve these tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
