"""How runs are told: each dataset's outcome, the parent run's summary artifact and its failure labels
(``outcomes``), and the log filter that keeps expected failures to one line (``expected_failures``).
May import the top level, ``registry`` and ``publishing.promote``.
"""
