"""Metrics of generated images: the SampleMetric protocol (``base``), one module per metric family (``fid``: FID,
sFID, KID; ``inception_score``; ``precision_recall``; ``clip_score``; ``paired``), the features they share
(``features``, ``statistics``), ADM-style reference batches (``reference_batch``) and the evaluation that runs a
list of them (``evaluation``) for the SampleMetrics callback and tools/evaluate.py."""
