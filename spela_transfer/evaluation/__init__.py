"""Evaluation protocols, metrics, the experiment runner and its report.

`runner` trains heads and so imports torch; `protocols`, `metrics` and
`report` do not need it.
"""
