"""Aggregation and reporting: pooled tables, paired statistics, figures and the HTML report.

Steps: `deconver aggregate` (aggregate.py) pools every run's evaluation.csv, complexity JSON and
train_log.csv of a study into `<results>/<study>/aggregate/`; `deconver report` (render.py) turns that
into `reports/<study>/` (inputs.py reads it; contents.py, captions.py, tables.py, stats.py, figures.py and
html.py with templates/ make the tables, figures and page). See docs/report.md.
"""
