"""Stage 1, download: where data comes from and how its bytes arrive verified.

``fetch`` is the stage (the mirror, retries, checksums, atomic writes into the raw cache), ``transport``
the HTTP(S) client with its deadlines and credential rules, ``locations`` the parsing and redaction of
source and registry locations, ``watch`` the data-arrival check (has the source changed since the last look?).
May import the top level, ``orchestration.caching`` and ``reporting.events``.
"""
