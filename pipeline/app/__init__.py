"""The application: the ``sip`` command (``cli``), the stage registry (``registry``: the stages
in order, their summaries, chains), the benchmarks (``bench``) and the judge self-check
(``judge_check``).

It sits on top of everything (app -> trainer -> stages -> pipeline); no other module of
``pipeline`` imports it.
"""
