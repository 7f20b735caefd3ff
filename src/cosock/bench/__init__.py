"""``cosock bench``: every transport side by side in one run, netperf-style.

Modules, one job each: ``_workloads`` (the measured loops), ``_worker`` (the program that
runs them inside a guest), ``_world`` (where guests are: a lab or loopback), ``_runner``
(what to measure, interleaved round by round), ``_stats`` (medians, percentiles),
``_apps`` / ``_appbench`` (unmodified HTTP and asyncio programs), ``_report`` (table and
JSON) and ``_plot`` (matplotlib).  This package imports nothing on purpose: the worker
runs inside guests and should start fast.
"""
