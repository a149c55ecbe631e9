"""Benchmarks of xlx_fast against the eager reference (SPEC §5).

- :mod:`.harness`: cases, the agreement check, timing, result rows
- :mod:`.ceilings`: the device's matmul and copy ceilings, measured in the same run
- :mod:`.machine`: what ran it (CPU/GPU, versions, native build, commit)
- :mod:`.report`: table, JSON, plot
- :mod:`.cases`: one module per op family; shared by ``xlx-fast bench`` and ``benchmarks/``
- :mod:`.loadgen`: open-loop Poisson load on a server (HTTP) or a scheduler (in process)
- :mod:`.serving`: latency under load of the serving schedulers (``xlx-fast bench-serve``)
"""
