"""
bench.py's rows, each beside what it measures: one module per mechanism, each with a ROWS tuple of row
functions (see protocol.py for what a row is), and the decode roofline (roofline.py), which applies to every model.
bench.py adds the generic rows and runs them in order.
"""

from bench_rows import early_exit, hourglass, local, mod, sparse

MECHANISM_ROWS = (*early_exit.ROWS, *hourglass.ROWS, *mod.ROWS, *sparse.ROWS, *local.ROWS)
