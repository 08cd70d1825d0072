"""DCPO's dual captions: a caption for the winner and one for the loser of each preference pair.

Three modules, each importing only the ones after it:

* :mod:`~diffalign.captioning.dataset` -- :func:`~diffalign.captioning.dataset.add_dual_captions` runs a
  strategy over a Pick-a-Pic parquet file, folder of shards or JSONL manifest;
* :mod:`~diffalign.captioning.strategies` -- the ``perturb``, ``caption`` and
  ``hybrid`` strategies and their registry;
* :mod:`~diffalign.captioning.perturb` -- rule-based and text2text perturbers
  of a caption.

Nothing is re-exported here, so importing the perturbers does not load the
dataset readers; import each name from the module that defines it.
"""
