"""train-mnist's stages and what they share.

The top level holds only what every stage shares: the typed settings (``settings``), the domain
(``datasets``: images, columns, the dataset catalog), the vocabulary of stages and outcomes
(``vocabulary``), the typed values stages hand each other (``results``), every file name (``artifacts``),
the one atomic writer and hash helper (``storage``) and the one model loader (``model_io``). Each
subpackage is one role of the pipeline, named in its order: ``download``, ``validation``, ``conversion``,
``training``, ``evaluation``, ``publishing``, ``registry``, ``reporting``, ``orchestration``, ``serving``.
A subpackage may import the top level and the packages its docstring names; stages meet only in
``flows/``.
"""
