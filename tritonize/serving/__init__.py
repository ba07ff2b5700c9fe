"""Everything that needs a running tritonserver: starting one (``server``, ``launch``, ``serve``), talking
to it (``client``), load and benchmarks (``loadgen``, ``perfanalyzer``, ``bench``, ``benchreport``),
``validate --load`` (``load_check``) and the demo."""
