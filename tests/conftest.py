"""Test-wide setup: Triton kernels run on CPU tensors through the interpreter when no GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test run.
    os.environ.setdefault("TRITON_INTERPRET", "1")

