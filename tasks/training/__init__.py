"""Stage 4, training: recipes (``recipes``: the typed training options and each dataset's default),
architectures and optimizers (``architectures``), fitting helpers that need no Prefect (``fitting``),
backups and resuming (``resume``) and the stage itself (``train``). May import the top level and
``conversion.parquet``.
"""
