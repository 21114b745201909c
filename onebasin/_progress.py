"""Progress bars: the one place that decides whether and how they are drawn.

On a terminal, a tqdm bar redrawn in place. Anywhere else (a log file, a pipe, CI) a bar is drawn once, when
it closes: one line with its final count, rate and postfix, instead of a carriage-return redraw per refresh
that fills the log. Under torchrun only rank 0 draws.
"""

from __future__ import annotations

import math
import sys

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

from .distributed import is_main


class _LogBar(plain_tqdm):
    """A tqdm bar for logs: never redrawn; `close` writes its final state as one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "mininterval": math.inf, "maxinterval": math.inf})

    def refresh(self, *args, **kwargs):  # update, set_postfix and tqdm's monitor thread all draw through here
        return None


def progress_bar(*args, disable: bool = False, file=None, **kwargs):
    """A tqdm bar (arguments as tqdm's: total, desc, unit, initial, ...), off when `disable` or off rank 0,
    redrawn in place only when its stream (`file`, default stderr) is a terminal (else one line at close)."""
    stream = file if file is not None else sys.stderr
    disable = disable or not is_main()
    terminal = getattr(stream, "isatty", lambda: False)()
    return (tqdm if terminal else _LogBar)(*args, disable=disable, file=stream, **kwargs)
