"""Serving the production models: ``train-mnist serve`` (``app``), the Open Inference Protocol (``protocol``),
the model that follows the registry's production pointer (``champion``) and ``train-mnist predict`` (``predict``).
May import the top level, ``registry``, ``validation`` and ``publishing.canary``.
"""
