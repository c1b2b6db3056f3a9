"""Serving the production models: ``train-mnist serve`` (``server`` wires ``app``), the Open Inference Protocol
(``protocol``, ``limits``), the model that follows the registry's production pointer (``champion``), what the
server reports (``metrics``, ``monitor`` for live drift, ``notices`` for Prefect events and alerts, ``sampling``)
and ``train-mnist predict`` (``predict``). May import the top level, ``registry``, ``validation``,
``publishing.canary``, ``reporting.events`` and ``download.locations``.
"""
