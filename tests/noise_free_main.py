"""``main.py`` with the training noise fixed: every uniform draw of models/gumbel.py is 0.5.

That makes the Gumbel noise of the merger's centre sampling a constant (the top-k is unchanged)
and the pruners' logistic noise zero. Data-parallel tests run this, because the noise is drawn
per process: two processes on half batches and one process on the whole batch would otherwise
see different noise, and their results could not be compared.

    torchrun --standalone --nproc_per_node 2 -m tests.noise_free_main --config ... --set ...
"""

import sys

import torch


from models import gumbel

gumbel._uniform_open = lambda shape_like, generator=None: torch.full_like(shape_like, 0.5)

import main

if __name__ == "__main__":
    sys.exit(main.main())
