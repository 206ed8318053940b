"""Metrics of generated images: the SampleMetric protocol (``base``), one module per metric family (``fid``,
``clip_score``, ``paired``), the features they share (``features``, ``statistics``) and the evaluation that
runs a list of them (``evaluation``) for the SampleMetrics callback and tools/evaluate.py."""
