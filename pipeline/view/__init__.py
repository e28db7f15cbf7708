"""`annotate view DIR`: a local web page over an output directory (app.py), its rows and
summary read with Polars (dataset.py) and its images found through the run's manifest
(pictures.py)."""
