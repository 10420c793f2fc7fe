"""The judge self-check: labelled sets (``labelled_sets``), running the checks and the report
(``checks``, `sip judge-check`), and the small run merged into the judge stage's card
(``self_check``, ``judging.self_check``)."""
