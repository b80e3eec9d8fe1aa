"""seglab: fine-tuning and evaluating cell segmentation on multiplexed fluorescence tissue.

The library behind the numbered notebooks. Each module is one arrow of the
data flow in DESIGN.md (data, models, train, predict, postprocess, metrics,
downstream, runs, report); notebooks call them in order and draw the figures.
"""

__version__ = "0.1.0"


class SeglabError(Exception):
    """An error the user can fix: the message names the file or value and the fix.

    The command line prints these as one paragraph without a traceback.
    """
