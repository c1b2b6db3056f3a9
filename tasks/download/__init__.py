"""Stage 1, download: where data comes from and how its bytes arrive verified.

``fetch`` is the stage (the mirror, retries, checksums, atomic writes into the raw cache), ``transport``
the HTTP(S) client with its deadlines and credential rules, ``locations`` the parsing and redaction of
source and registry locations. May import the top level and ``orchestration.caching``.
"""
