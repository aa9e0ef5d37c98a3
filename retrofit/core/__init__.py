"""What every part of retrofit shares, defined once (no import from methods, search, eval or serve):

* :mod:`retrofit.core.plans`: the Dr.LLM plan vocabulary (actions, parsing of lists and letter strings,
  validation, cost in block passes);
* :mod:`retrofit.core.data`: the local task data (one ``data_dir`` rule, every loader), tokenisation of
  (context, continuation) requests, right padding, continuation log-likelihoods, search-record reading;
* :mod:`retrofit.core.hooks`: new-request tracking by KV-cache identity, forward patching with exact restore,
  and the model snapshot that makes ``attach`` all or nothing;
* :mod:`retrofit.core.storage`: the storage URL rule of every optuna study (a bare path is SQLite).
"""
