"""What Prefect needs around the stages: content-keyed cache policies (``caching``), run version names
(``versions``) and fanning datasets out to workers as runs of the ``train-mnist/dataset`` deployment
(``fanout``). May import the top level and ``reporting``.
"""
