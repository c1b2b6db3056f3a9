"""Stage 5, evaluation: the trained model scored on the test split (``evaluate``): accuracy, loss,
per-class precision and recall, the confusion matrix, and each row's prediction, handed on in memory.
May import the top level and ``conversion.parquet``.
"""
