"""What Prefect needs around the stages: content-keyed cache policies (``caching``), run version names
(``versions``), fanning datasets out to workers as runs of the ``train-mnist/dataset`` deployment
(``fanout``) and the event trigger that starts such a run, with the guard that debounces it (``triggers``).
May import the top level and ``reporting``.
"""
