"""Stages 6 and 7, gate and publish: the accuracy gates (``gate``), the paired comparison with the
production model (``promote``), the fresh-process canary (``canary``), the documents a version carries
(``model_card``), the decision that moves production (``publish``) and an operator's rollback, pin and
unpin (``operations``). May import the top level,
``registry``, ``reporting`` and ``conversion.parquet``.
"""
