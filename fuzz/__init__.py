"""Coverage-guided fuzz targets (atheris) for the wire protocol and the broker.

* :mod:`fuzz.fuzz_frames`: the sans-I/O frame decoder, ``Connection`` in the
  broker role;
* :mod:`fuzz.fuzz_session`: the broker's per-connection handling
  (``SocketSession`` over a fake transport, ``LocalSession``), no sockets;
* :mod:`fuzz.seeds`: regenerates the seed corpora in ``fuzz/corpus/``.

Each target's ``test_one_input(data)`` runs without atheris, so that
``tests/test_fuzz_regressions.py`` replays saved inputs in the ordinary test
suite. ``fuzz/README.md`` explains the input formats and how to run them.
"""
