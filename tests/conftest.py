import sys
from pathlib import Path

import torch

# tests/tiny_models.py is a helper module shared by the test files.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
