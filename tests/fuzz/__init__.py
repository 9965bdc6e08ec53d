"""Property-based checks of the MIRA ops and layers (hypothesis): strategies and oracles.

``cases.py`` draws op inputs (shapes, dtypes, layouts, slice layouts, values); ``oracle.py``
judges one backend against the float64 reference; ``tests/test_properties.py`` runs them on the
``reference`` and ``cpu`` backends in process, ``triton_interp.py`` on the Triton backend under
the interpreter in a child process. Profiles (``profiles.py``): ``ci`` (bounded, derandomised,
what ``make test`` runs) and ``fuzz`` (long, random; ``make fuzz``).
"""
