"""Curation: people say which detections are the cells they want; a classifier learns it.

- :mod:`seglab.curate.gallery`: the offline annotation gallery (``seglab gallery``): a static,
  self-contained folder of cell crops with yes / no / unsure answers kept in the browser and
  exported as an answers file.
- :mod:`seglab.curate.answers`: answers files (``seglab-answers/1``): load with every check
  against the gallery they were made on, write, merge two annotators' files.
- :mod:`seglab.curate.features`, ``classifier``, ``gate``, ``store``, ``apply``: the morphology
  features, the classifier trained on the answers, its validation gate, storage and the filter.
"""
