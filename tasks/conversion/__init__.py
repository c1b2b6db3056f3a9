"""Stage 3, conversion: validated CSV to Parquet (``convert``), and the one Parquet reader and writer
(``parquet``) that training, evaluation and publishing read their rows with. May import the top level,
``validation.csvfile`` (the one CSV reader) and ``orchestration.caching``.
"""
