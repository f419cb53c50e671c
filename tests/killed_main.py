"""``main.py`` that kills itself (SIGKILL, as the out-of-memory killer or a lost node does) when the trainer is about
to compute micro-batch number ``$KILL_AT_MICRO_BATCH`` (counted from 1 in this process): a crash in the middle of a
gradient accumulation, at a point that does not depend on timing.

    KILL_AT_MICRO_BATCH=6 python -m tests.killed_main --config ... --set ...
"""

import os
import signal
import sys


from trainers.training.trainer import Trainer

import main

KILL_AT = int(os.environ.get("KILL_AT_MICRO_BATCH", "0"))
_losses, _calls = Trainer.losses, [0]


def counted_losses(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return _losses(self, *args, **kwargs)


Trainer.losses = counted_losses

if __name__ == "__main__":
    sys.exit(main.main())
