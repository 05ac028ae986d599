"""The QA report: what operators read about a night (docs/report.md).

- :mod:`tasks.report.data` reads the store: the numbers and arrays of a night,
  nothing drawn;
- :mod:`tasks.report.sections` turns them into titled sections of formatted
  tables and figures, the content shared by every rendering;
- :mod:`tasks.report.figures` draws the figures (matplotlib, PNG);
- :mod:`tasks.report.html` writes the static HTML report (``photocal report``);
- :mod:`tasks.report.markdown` writes the same sections as Prefect artifacts.
"""
