"""Active learning: the model chooses which tiles people annotate next.

- :mod:`seglab.active.uncertainty`: per-tile uncertainty from the network outputs (entropy,
  confidence, margin of the cell probability; agreement under test-time augmentation; ensemble
  disagreement), each aggregated per tile in one documented way.
- :mod:`seglab.active.diversity`: k-center greedy core-set and k-means clusters on style vectors,
  random, and the weighted combination that picks a batch.
- :mod:`seglab.active.campaign`: the on-disk campaign (pools, one folder per round, history,
  checkpoints, stop rule), export of a batch for correction and ingest of corrected masks.

Every score is "higher = more worth annotating".
"""
