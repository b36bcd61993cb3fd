"""Measuring unlearning methods side by side: baselines, metrics, an executor for many runs, reports.

``prune-edge evaluate-unlearning`` (:mod:`prune_edge.cli_eval`) runs a grid of methods x seeds on one
dataset, architecture and deletion request, with shadow models for the likelihood-ratio attack, and
writes ``results.json``, ``report.md`` and PNG plots into the folder the user names.
"""
