"""Serving the production models: ``train-mnist serve`` (``app``), the Open Inference Protocol (``protocol``) and
the model that follows the registry's production pointer (``champion``)."""
