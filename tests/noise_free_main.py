"""``main.py`` with the training noise fixed: every uniform draw of models/gumbel.py is 0.5.

That makes the Gumbel noise of the merger's centre sampling a constant (the top-k is unchanged)
and the pruners' logistic noise zero. Data-parallel tests run this, because the noise is drawn
per process: two processes on half batches and one process on the whole batch would otherwise
see different noise, and their results could not be compared.

    torchrun --standalone --nproc_per_node 2 tests/noise_free_main.py --config ... --set ...
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import gumbel  # noqa: E402

gumbel._uniform_open = lambda shape_like, generator=None: torch.full_like(shape_like, 0.5)

import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main.main())
