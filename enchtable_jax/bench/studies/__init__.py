"""One module per study; each exposes `run(quick: bool) -> dict` of figures and `TARGETS` it reports."""
