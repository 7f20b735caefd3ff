"""``cosock bench``: every transport side by side in one run, netperf-style.

Modules, one job each: ``_workloads`` (the measured loops), ``_worker`` (the program that
runs them inside a guest), ``_world`` (where guests are: a lab or loopback), ``_runner``
(what to measure, interleaved round by round), ``_stats`` (medians, percentiles),
``_apps`` / ``_appbench`` (unmodified HTTP and asyncio programs), ``_report`` (table and
JSON) and ``_plot`` (matplotlib).  ``--migrate``: ``_migrate`` (a stream both ways while a
guest migrates away and back), ``_migpeer`` (its program in the guests), ``_pattern`` (the
self-locating byte pattern and its checker) and ``_migshow`` (tables, JSON and plot).
This package imports nothing on purpose: the workers run inside guests and should start
fast.
"""
