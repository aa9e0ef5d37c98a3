"""Evaluation: the ``retrofit`` lm-eval model, offline task configs, compute accounting, static pruning, plots.

``python -m retrofit.eval ...`` = ``retrofit eval ...``. Importing :mod:`retrofit.eval.lm_eval_model` registers the
``retrofit`` model with lm-eval (0.4.13 has no plugin discovery).
"""
